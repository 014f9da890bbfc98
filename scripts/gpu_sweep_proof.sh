#!/usr/bin/env bash
# The GPU sweep's call, proven on this CPU as far as one can be (docs/benchmarks.md, "The GPU sweep"): a fresh
# venv holding only packages the GPU image has (/work/.library/device/KINDS.md) at this venv's versions, the
# bundle's wheels (PIN in bench/gpu_bundle.py) for this Python installed the way the GPU machine installs them
# (bench/gpu_sweep.py --wheels: pip, no index, no dependencies, --target), then
#   1. bench/gpu_sweep.py --tiny on the bundled real sample (.gpu_sweep/abid-sample, from `make gpu-bundle`);
#   2. the model logging and loading that bench/cuda_smoke.py does on CUDA, on the CPU (log_trained_model, the
#      pyfunc loaded back and predicting), in the same file tracking store the sweep uses.
# Usage: scripts/gpu_sweep_proof.sh [python] [work folder]   (python: 3.12 is the image's; this machine's
# torch wheels are for 3.11, so 3.11 is what runs here, with PIN's wheels downloaded for 3.11)
set -euo pipefail
PY=${1:-/root/.pyenv/versions/3.11.7/bin/python3}
WORK=${2:-/tmp/gpuproof}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SRC=$ROOT/.venv/lib/python3.11/site-packages  # where this project's venv has torch's CUDA libraries
VER=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
test -f "$ROOT/.gpu_sweep/abid-sample/labels.csv" || { echo "no .gpu_sweep/abid-sample: run make gpu-bundle"; exit 1; }

mkdir -p "$WORK"
if [ ! -x "$WORK/venv/bin/python" ]; then
  "$PY" -m venv "$WORK/venv"
  # the image's packages that the sweep touches, at this project's versions (the image's may differ)
  "$ROOT/.venv/bin/pip" freeze | grep -i -E "^(torch|torchvision|timm|safetensors|numpy|pandas|pillow|scipy|\
scikit-learn|joblib|threadpoolctl|matplotlib|contourpy|cycler|fonttools|kiwisolver|pyparsing|python-dateutil|six|\
tqdm|networkx|cloudpickle|pyyaml|requests|urllib3|certifi|idna|charset.normalizer|packaging|click|anyio|h11|\
jinja2|markupsafe|protobuf|psutil|zipp|uvicorn|filelock|fsspec|hf.xet|sympy|mpmath|pyarrow|typing.extensions|\
annotated-doc|rich|markdown-it-py|mdurl|pygments)==" >"$WORK/image.txt"
  # huggingface_hub as the image has it (KINDS.md: 1.33.0, on httpx), not this venv's 2.x
  echo -e "huggingface_hub==1.33.0\nhttpx\nhttpcore" >>"$WORK/image.txt"
  "$WORK/venv/bin/pip" install -q --no-deps -r "$WORK/image.txt"
  # torch's CUDA libraries, as the image has them: linked, not copied (3 GB)
  for x in "$SRC"/nvidia "$SRC"/nvidia_*.dist-info "$SRC"/cuda "$SRC"/cuda_*.dist-info "$SRC"/triton \
           "$SRC"/triton-*.dist-info; do
    ln -sfn "$x" "$WORK/venv/lib/python$VER/site-packages/$(basename "$x")"
  done
fi

cd "$ROOT"
"$ROOT/.venv/bin/python" -c "
import sys; sys.path.insert(0, 'bench')
from pathlib import Path
import gpu_bundle
print(len(gpu_bundle.download_wheels(Path('$WORK/wheels'), '$VER')), 'wheels for CPython $VER')"
rm -rf "$WORK/site" "$WORK/out"
env -u PYTHONPATH -u MLFLOW_TRACKING_URI -u MLFLOW_EXPERIMENT_NAME OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 \
  "$WORK/venv/bin/python" bench/gpu_sweep.py --wheels "$WORK/wheels" --site "$WORK/site" --tiny --trials 2 \
  --out "$WORK/out"

# 2. cuda_smoke's model logging and loading, on the CPU, with the bundle's packages only
env -u MLFLOW_TRACKING_URI PYTHONPATH="$WORK/site" MLFLOW_ALLOW_FILE_STORE=true OMP_NUM_THREADS=1 \
  "$WORK/venv/bin/python" - <<'EOF'
import sys
import tempfile
from pathlib import Path

import mlflow
import pandas as pd

sys.path[:0] = [".", "tests"]
from helpers_data import make_manifest  # noqa: E402

from bincounter.manifest import stratified_split  # noqa: E402
from bincounter.train_log import log_trained_model  # noqa: E402
from bincounter.training import TrainConfig, train_run  # noqa: E402

with tempfile.TemporaryDirectory() as tmp:
    mlflow.set_tracking_uri(Path(tmp, "mlruns").as_uri())
    mlflow.set_experiment("cuda-smoke-on-cpu")
    df = make_manifest(Path(tmp) / "img", n=40, size=64)
    parts = stratified_split(df, (0.6, 0.2, 0.2), seed=0)
    cfg = TrainConfig(arch="efficientnet_lite0", weights="imagenet", image_size=64, epochs=1, batch_size=8,
                      max_steps=2)
    with mlflow.start_run():
        result = train_run(cfg, parts["train"], parts["val"])
        info = log_trained_model(result, cfg, parts["val"]["path"].iloc[0])
    served = mlflow.pyfunc.load_model(info.model_uri).predict(
        pd.DataFrame({"image": [Path(p).read_bytes() for p in parts["test"]["path"]]}))
    assert len(served) == len(parts["test"]) and served["count"].isin(cfg.classes).all(), served
    print(f"cuda_smoke's model path on the CPU: logged {info.model_uri}, loaded, {len(served)} predictions")
EOF
echo "gpu_sweep_proof: OK (Python $VER)"
