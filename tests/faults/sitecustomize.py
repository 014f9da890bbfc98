"""Fault injection for the kill tests, kept out of the library: Python imports this module at start-up in every
process whose PYTHONPATH holds this folder (conftest.kill_env), `mlflow run`'s step processes included.

BINCOUNTER_TEST_KILL_AFTER_EPOCH=n: SIGKILL right after training saved epoch n's checkpoint.
BINCOUNTER_TEST_KILL_AFTER_TRIAL=n: SIGKILL right after hpo saved trials.json with n trials in it.
"""
import json
import os
import signal


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


if os.environ.get("BINCOUNTER_TEST_KILL_AFTER_EPOCH"):
    from bincounter import checkpoints

    _save = checkpoints.Checkpointer.save

    def _save_then_kill(self, state: dict) -> None:
        _save(self, state)
        if state["epoch"] == int(os.environ["BINCOUNTER_TEST_KILL_AFTER_EPOCH"]):
            _kill()

    checkpoints.Checkpointer.save = _save_then_kill

if os.environ.get("BINCOUNTER_TEST_KILL_AFTER_TRIAL"):
    import mlflow

    _log_text = mlflow.log_text

    def _log_then_kill(text: str, artifact_file: str, *args, **kwargs):
        out = _log_text(text, artifact_file, *args, **kwargs)
        if artifact_file == "trials.json" and len(json.loads(text)["trials"]) == int(
                os.environ["BINCOUNTER_TEST_KILL_AFTER_TRIAL"]):
            _kill()
        return out

    mlflow.log_text = _log_then_kill
