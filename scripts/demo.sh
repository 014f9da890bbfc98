#!/usr/bin/env bash
# make demo: the whole pipeline on generated bins, offline, sized for a 2-core CPU; then one request
# against the served champion. Uses MLFLOW_TRACKING_URI (default sqlite:///mlflow.db).
set -euo pipefail
cd "$(dirname "$0")/.."
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}
export GIT_PYTHON_REFRESH=quiet
EXPERIMENT=${EXPERIMENT:-bin-counter-demo}
MODEL=bin-counter-demo  # scripts/demo.params model_name: apart from the real-data bin-counter
PORT=${PORT:-5001}
SEED=${SEED:-42}

params=()
while read -r kv; do params+=(-P "$kv"); done < <(grep -v '^#' scripts/demo.params | grep .)
mlflow run . --env-manager local --experiment-name "$EXPERIMENT" "${params[@]}" -P cache_dir=data -P seed="$SEED"

python - <<'PY'
from bincounter.registry import champion_evaluation
found = champion_evaluation("bin-counter-demo")
if found is None or found[1] is None:
    raise SystemExit("demo: no evaluated champion")
version, ev = found
m = ev.data.metrics
print(f"== champion bin-counter-demo v{version.version} on {int(m['test_size'])} held-out generated bins:")
for k in ("accuracy", "rmse", "mae", "within1_accuracy"):
    print(f"  {k:17s} {m['test_' + k]:.3f}   (majority baseline {m['baseline_' + k]:.3f})")
PY

echo "== serving models:/$MODEL@champion on 127.0.0.1:$PORT"
mlflow models serve -m models:/$MODEL@champion --env-manager local -h 127.0.0.1 -p "$PORT" \
  >mlflow-serve.log 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 1 90); do curl -sf "http://127.0.0.1:$PORT/ping" >/dev/null && break; sleep 1; done
python - "$PORT" <<'PY'
import base64, io, json, sys, urllib.request
from bincounter.synthetic import draw_bin
imgs = []
for count in (1, 3, 5):
    buf = io.BytesIO(); draw_bin(count, seed=1000 + count, size=256).save(buf, "JPEG"); imgs.append(buf.getvalue())
body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(b).decode()] for b in imgs]}}
req = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/invocations", json.dumps(body).encode(),
                             {"Content-Type": "application/json"})
preds = json.load(urllib.request.urlopen(req, timeout=60))["predictions"]
for true, p in zip((1, 3, 5), preds):
    print(f"  generated bin with {true} items -> count {p['count']} (confidence {p['confidence']:.2f})")
PY
cat <<TXT

Done. Next:
  mlflow ui --backend-store-uri $MLFLOW_TRACKING_URI      # compare runs (experiment $EXPERIMENT), registry: $MODEL @champion
    then open http://127.0.0.1:5000/#/experiments/$(python -c "import mlflow; print(mlflow.get_experiment_by_name('$EXPERIMENT').experiment_id)")/runs?workflowType=machine_learning&viewStateShareKey=bincounter
  mlflow models serve -m models:/$MODEL@champion --env-manager local -p $PORT
  bincounter predict photos/*.jpg --model models:/$MODEL@champion
TXT
