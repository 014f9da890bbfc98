"""Models-from-code entry: MLflow runs this file to get the model object; nothing is unpickled. The pyfunc
wrapper decodes a request's `image` cells and answers through predict.predict, in forward passes of
serving.MAX_BATCH: per-row answers (the contract in bincounter/serving.py); a bad image costs only its own row."""
from __future__ import annotations

import base64
import binascii
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

from bincounter.predict import predict
from bincounter.serving import INPUT_COLUMN, MAX_BATCH, BinCounter, Settings
from bincounter.transforms import ImageError


def _as_bytes(value, i: int) -> bytes:
    """One `image` cell -> image bytes. Raises ImageError naming row `i`."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        # base64 text may come as bytes; image files always hold bytes outside the base64 alphabet (JPEG/PNG
        # signatures), so valid base64 can only be such text
        try:
            return base64.b64decode(bytes(value), validate=True)
        except (binascii.Error, ValueError):
            return bytes(value)
    if isinstance(value, str):
        try:  # MLflow's own encoder wraps base64 lines at 76 characters
            return base64.b64decode("".join(value.split()), validate=True)
        except (binascii.Error, ValueError) as e:
            raise ImageError(f"row {i}: text that is not base64 ({len(value)} characters; {e})",
                             "not_an_image") from None
    raise ImageError(f"row {i}: expected image bytes or base64 text, got {type(value).__name__}", "not_an_image")


class BinCounterModel(PythonModel):
    """The pyfunc wrapper (see the module's docstring) around a loaded BinCounter or Ensemble."""

    def load_context(self, context):
        self.counter = BinCounter.from_dir(Path(context.artifacts["model_dir"]))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame) or INPUT_COLUMN not in model_input.columns:
            cols = list(model_input.columns) if isinstance(model_input, pd.DataFrame) else type(model_input).__name__
            raise MlflowException(f"expected a column {INPUT_COLUMN!r} of image bytes, got {cols}",
                                  error_code=INVALID_PARAMETER_VALUE)
        cells = model_input[INPUT_COLUMN]
        if len(cells) == 1 and isinstance(cells.iloc[0], (list, np.ndarray)):
            cells = list(cells.iloc[0])  # MLflow makes `{"inputs": {"image": [...]}}` one row holding the list
        if len(cells) == 0:
            raise MlflowException("no images in the request", error_code=INVALID_PARAMETER_VALUE)
        images, cell_errors = [], []
        for i, v in enumerate(cells):
            try:
                images.append(_as_bytes(v, i))
                cell_errors.append(None)
            except ImageError as e:
                images.append(b"")  # decodes to an error of its own, overridden by this one below
                cell_errors.append(str(e))
        out = predict(self.counter, images, settings=Settings(batch_size=MAX_BATCH))
        out["error"] = pd.array([c or e for c, e in zip(cell_errors, out["error"])], dtype="string")
        if out["error"].notna().all():
            bad = out["error"].tolist()
            raise MlflowException(f"none of the {len(images)} images could be read: " + "; ".join(bad[:5])
                                  + (f"; and {len(bad) - 5} more" if len(bad) > 5 else ""),
                                  error_code=INVALID_PARAMETER_VALUE)
        return out


mlflow.models.set_model(BinCounterModel())
