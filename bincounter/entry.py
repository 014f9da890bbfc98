"""Entry points fail in one line: `if __name__ == "__main__": run(main, get_args_parser())` in every step.

A wrong parameter (a ValueError, or MLflow saying that a run, model or artifact does not exist or that a value
is invalid) prints `<step>: error: <parameter>: <what is wrong>` on stderr, ends the open MLflow run FAILED and
exits 1, without a traceback. Anything else is a bug and keeps its traceback. With BINCOUNTER_TRACEBACK=1 every
error shows its traceback.
"""
from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Mapping

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

TRACEBACK_ENV = "BINCOUNTER_TRACEBACK"
# MLflow's codes for "what you asked for is not there / not valid": the caller's parameter, not a bug
USER_ERROR_CODES = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND", "INVALID_STATE"}
_RUN_ID = re.compile(r"\b[0-9a-f]{32}\b")


def is_user_error(e: BaseException) -> bool:
    return isinstance(e, ValueError) or (isinstance(e, MlflowException) and e.error_code in USER_ERROR_CODES)


def _step_of(run_id: str) -> str | None:
    try:
        return MlflowClient().get_run(run_id).data.tags.get("bincounter.step")
    except Exception:  # noqa: BLE001 - only a hint for the message: the run may not exist, or no store answer
        return None


def one_line(e: BaseException, params: Mapping | None) -> str:
    """The error and the step's parameters (e.g. `vars(args)`) -> the error as one line that names the parameter
    it is about (when the message does not already) and what kind of run a run id given in it is (`run_id
    0a1b...: ... (run 0a1b... is a 'split' run)`)."""
    msg = " ".join((e.message if isinstance(e, MlflowException) else str(e)).split())
    params = params or {}
    named = any(re.search(rf"\b{re.escape(name)}\b", msg) for name in params)
    for name, value in params.items():
        if not isinstance(value, str) or len(value) < 3:  # a short value turns up in messages by chance
            continue
        ids = _RUN_ID.findall(value)
        if value in msg or any(i in msg for i in ids):
            if not named:
                msg = f"{name} {value}: {msg}"
            # what the run is, unless the message or the parameter's own name (split_run_id) says it already
            steps = {i: _step_of(i) for i in ids}
            msg += "".join(f" (run {i} is a '{s}' run)" for i, s in steps.items()
                           if s and f"'{s}'" not in msg and s not in name)
            break
    return msg


def run(main: Callable, parser=None, argv: list[str] | None = None):
    """Parse the arguments with the step's argparse parser (its own errors: one line, exit 2), call `main(args)`
    (or `main()` without a parser) and turn a user error into one line on stderr, the open run FAILED and exit
    status 1. -> main's result."""
    if parser is not None:
        parser.error = lambda message: parser.exit(2, f"{parser.prog}: error: {message} (--help lists the options)\n")
    args = parser.parse_args(argv) if parser is not None else None
    try:
        return main(args) if parser is not None else main()
    except Exception as e:
        if not is_user_error(e) or os.environ.get(TRACEBACK_ENV, "").lower() in ("1", "true", "yes"):
            raise
        if mlflow.active_run():  # a run opened here (under `mlflow run`, the run it created and we joined)
            mlflow.end_run("FAILED")
        prog = parser.prog if parser is not None else getattr(main, "__module__", "step").rsplit(".", 1)[-1]
        print(f"{prog}: error: {one_line(e, vars(args) if args is not None else None)}", file=sys.stderr)
        sys.exit(1)
