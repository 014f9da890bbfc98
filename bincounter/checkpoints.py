"""A training's state after every epoch: saved atomically as the train run's artifact `checkpoint/last.pt` and,
inside a SageMaker job, in the job's checkpoint folder (restored when a spot job restarts); loaded to resume."""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import mlflow
import torch

from bincounter.manifest import atomic_write_bytes

CHECKPOINT = "checkpoint/last.pt"  # artifact path inside the train run


def job_checkpoint_dir() -> Path | None:
    """A SageMaker job's checkpoint folder (synced to the job's CheckpointConfig S3 URI and restored when a spot
    job restarts): SM_CHECKPOINT_DIR, else /opt/ml/checkpoints when it exists; None outside a job."""
    d = os.environ.get("SM_CHECKPOINT_DIR")
    if d:
        return Path(d)
    return Path("/opt/ml/checkpoints") if Path("/opt/ml/checkpoints").is_dir() else None


class Checkpointer:
    """Saves the training state atomically after every epoch, locally and as the run's artifact; inside a
    SageMaker job also into its checkpoint folder (<dir>/<run id>/last.pt), which `load` prefers."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        job_dir = job_checkpoint_dir()
        self.job_file = job_dir / run_id / "last.pt" if job_dir else None

    def load(self) -> dict | None:
        """The run's last checkpoint, or None when it has none."""
        if self.job_file and self.job_file.is_file():  # written before the artifact: never older than it
            return torch.load(self.job_file, map_location="cpu", weights_only=True)
        client = mlflow.MlflowClient()
        if not any(f.path == CHECKPOINT for f in client.list_artifacts(self.run_id, "checkpoint")):
            return None
        # temporary folders, removed at once: a checkpoint is ~100-350 MB and trainings are many
        with tempfile.TemporaryDirectory(prefix="bincounter-ckpt-") as tmp:
            path = mlflow.artifacts.download_artifacts(run_id=self.run_id, artifact_path=CHECKPOINT, dst_path=tmp)
            return torch.load(path, map_location="cpu", weights_only=True)

    def save(self, state: dict) -> None:
        buf = _to_bytes(state)
        if self.job_file:
            atomic_write_bytes(self.job_file, buf)
        with tempfile.TemporaryDirectory(prefix="bincounter-ckpt-") as tmp:
            path = Path(tmp) / Path(CHECKPOINT).name
            path.write_bytes(buf)  # a private folder: the artifact store sees only the finished file
            mlflow.log_artifact(str(path), Path(CHECKPOINT).parent.name)



def _to_bytes(obj) -> bytes:
    b = io.BytesIO()
    torch.save(obj, b)
    return b.getvalue()
