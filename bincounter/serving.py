"""The served model: an MLflow pyfunc (models-from-code) that turns image bytes into counts, and how it is logged.

Contract: a row per image with `count`, `confidence`, `review`, `p_<count>` (null where the image is bad) and
`error` (null where good); only a request malformed as a whole, or with no readable image, is refused (400).
Input: a DataFrame with a column `image` of JPEG/PNG bytes or their base64 text (the signature types it `any`,
so that MLflow's server hands the text over undecoded and text that is not base64 is an error of its own row,
not of the request). Output dtypes survive nulls (Int64, Float64, string): JSON `null`, Spark nulls.
The artifact holds only a state dict and `model_config.json` (counters.py loads them); the code is this package,
shipped with the model through `code_paths`; MLflow runs pyfunc_model.py to get `BinCounterModel`, which answers
through predict.predict, the one prediction path, in forward passes of counters.MAX_BATCH; a bad image costs
only its own row.
"""
from __future__ import annotations

import base64
import binascii
import json
import shutil
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, Schema
from mlflow.types.schema import AnyType

from bincounter.counters import CONFIG_FILE, MAX_BATCH, BinCounter, Settings
from bincounter.model import WEIGHTS_FILE, get_arch
from bincounter.predict import predict
from bincounter.transforms import ImageError

INPUT_COLUMN = "image"
PACKAGE_DIR = Path(__file__).resolve().parent


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


def signature(classes: list[int]) -> ModelSignature:
    """In: `image` (any: bytes or base64 text, see the module docstring). Out: the per-row contract; `count` and
    the probabilities are optional (null for a bad image), as is `error` (null for a good one)."""
    out = [ColSpec("long", "count", required=False), ColSpec("double", "confidence", required=False),
           ColSpec("boolean", "review", required=False),  # a person should look: below the review threshold
           *[ColSpec("double", f"p_{c}", required=False) for c in classes], ColSpec("string", "error", required=False)]
    return ModelSignature(inputs=Schema([ColSpec(AnyType(), INPUT_COLUMN)]), outputs=Schema(out))


def log_model(model: torch.nn.Module, config: dict, example_image: bytes, name: str = "model", **kwargs):
    """Log `model` as the pyfunc `name` in the active run: state dict + config as artifacts, this package as
    code, a signature and an input example made from `example_image`. -> the ModelInfo."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "model_dir"
        d.mkdir()
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, d / WEIGHTS_FILE)
        return _log_dir(d, config, example_image, [config["arch"]], name, **kwargs)


def log_ensemble(member_dirs: list[Path], config: dict, example_image: bytes, name: str = "model", **kwargs):
    """Log an ensemble as the pyfunc `name`: the members' model folders (copied in `config["members"]`'s order)
    and the ensemble's config. -> the ModelInfo."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "model_dir"
        for i, src in enumerate(member_dirs):
            shutil.copytree(src, d / "members" / str(i))
        archs = [json.loads((m / CONFIG_FILE).read_text()).get("arch", "resnet18") for m in member_dirs]
        return _log_dir(d, config, example_image, archs, name, **kwargs)


def _log_dir(d: Path, config: dict, example_image: bytes, archs: list[str], name: str, **kwargs):
    (d / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(PACKAGE_DIR / "pyfunc_model.py"),
        artifacts={"model_dir": str(d)},
        code_paths=[str(PACKAGE_DIR)],
        signature=signature(config["classes"]),
        input_example=pd.DataFrame({INPUT_COLUMN: [example_image]}),
        pip_requirements=_requirements(archs),
        **kwargs,
    )


def _requirements(archs: list[str]) -> list[str]:
    """Pins of what the served model imports (timm for the EfficientNet-Lites); local build tags (+cu130)
    dropped, since serving images install from PyPI. mlflow by its own version: mlflow-skinny installs have no
    `mlflow` distribution. The weights travel in the model, so no weights wheel is needed."""
    from importlib.metadata import version
    extra = sorted({p for arch in archs for p in get_arch(arch).requires})
    packages = ["torch", "torchvision", "pillow", "pandas", "numpy", *extra]
    pins = [f"{p}=={version(p).split('+')[0]}" for p in packages]
    return [f"mlflow=={mlflow.__version__}", *pins]
