"""The served model under concurrent load: `mlflow models serve` answering good and bad requests from several
clients at once, against the in-process model (predict.predict) on the same good images one at a time.

Requests are `dataframe_split` JSON with one base64 image each: real ABID photos (../shared/abid-sample) if they
are there, else generated bins; about 10% are bad (not an image, truncated JPEG, wrong column, empty body, bad
JSON), at least one of each kind. Good requests must all answer 200 with the count the in-process model gives;
bad ones must all get a 4xx. The model: by default the tests' tiny resnet18 (tests/helpers_model.py), trained
and logged in a temporary sqlite store; `--model` serves another URI (from $MLFLOW_TRACKING_URI); `--url` loads a
server already running (`--model` then names what it serves, for the baseline). Torch gets one thread per
process (`--threads`, server workers and baseline alike): on 2 shared cores, two OpenMP threads in one process
stall each other whenever another process holds a core (measured here: 10 ms -> 520 ms per image).
Prints a table, writes bench/results/serve_load.json; exits 1 if a good request failed or a bad one got no 4xx.

    python bench/serve_load.py --requests 1000 --clients 8
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the tests' tiny model and HTTP helpers, not copies

from bincounter import counters  # noqa: E402
from bincounter.predict import predict  # noqa: E402
from bincounter.synthetic import draw_bin  # noqa: E402
from helpers_model import build_tiny_model  # noqa: E402
from conftest import free_port  # noqa: E402
from test_serving import post, split_request  # noqa: E402

SAMPLE_IMAGES = ROOT.parent / "shared" / "abid-sample" / "bin-images"
BAD_KINDS = ("not an image", "truncated jpeg", "wrong column", "empty body", "bad json")
DISTINCT_IMAGES = 200  # real photos held in memory; good requests cycle through them


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=1000, help="timed requests, good and bad")
    p.add_argument("--clients", type=int, default=8, help="concurrent client threads")
    p.add_argument("--bad_frac", type=float, default=0.1, help="share of bad requests")
    p.add_argument("--model", default="", help="model URI to serve (default: train the tiny test model)")
    p.add_argument("--url", default="", help="a server already running (needs --model for the baseline)")
    p.add_argument("--workers", type=int, default=0, help="uvicorn workers; 0 = mlflow's default (CPU count)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process, server workers and baseline alike; 0 = torch's default")
    p.add_argument("--images", default=str(SAMPLE_IMAGES), help="folder of JPEGs; generated bins if missing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_load.json"))
    return p


def load_images(folder: str, n: int, seed: int) -> tuple[list[bytes], str]:
    """Up to n JPEGs (a seeded pick of the folder's, else generated bins) -> (bytes, where they came from)."""
    files = sorted(Path(folder).glob("*.jpg")) if Path(folder).is_dir() else []
    if files:
        pick = random.Random(seed).sample(files, min(n, len(files)))
        return [f.read_bytes() for f in pick], f"{folder} (real photos)"
    out = []
    for i in range(n):
        buf = io.BytesIO()
        draw_bin(1 + i % 5, seed * 1000 + i, 256).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out, "generated bins (bincounter.synthetic)"


def bad_body(kind: str, jpeg: bytes) -> bytes:
    if kind == "not an image":
        return json.dumps(split_request([b"plain text, not a picture"])).encode()
    if kind == "truncated jpeg":
        return json.dumps(split_request([jpeg[: len(jpeg) // 2]])).encode()
    if kind == "wrong column":
        return json.dumps(split_request([jpeg], column="photo")).encode()
    if kind == "empty body":
        return b""
    return b'{"dataframe_split": {"columns": ["image"], "data": [["'  # cut off: not valid JSON


def make_plan(n: int, bad_frac: float, images: list[bytes], seed: int) -> list[dict]:
    """n requests in a seeded order: {"kind": "good" | a bad kind, "image": index into images, "body"}."""
    n_bad = min(n // 2, max(len(BAD_KINDS), round(bad_frac * n)))
    kinds = ["good"] * (n - n_bad) + [BAD_KINDS[i % len(BAD_KINDS)] for i in range(n_bad)]
    random.Random(seed).shuffle(kinds)
    plan, bodies = [], {}
    for i, kind in enumerate(kinds):
        img = i % len(images)
        if kind == "good":
            if img not in bodies:  # encoded once: the clients should spend their CPU on nothing but HTTP
                bodies[img] = json.dumps(split_request([images[img]])).encode()
            body = bodies[img]
        else:
            body = bad_body(kind, images[img])
        plan.append({"kind": kind, "image": img, "body": body})
    return plan


def start_server(model_uri: str, workers: int, log_path: Path) -> tuple[subprocess.Popen, str]:
    """`mlflow models serve` in a session of its own (so that its uvicorn workers stop with it) -> (proc, url)."""
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port)] + (["-w", str(workers)] if workers else [])
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")  # uvicorn is in the venv
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url + "/ping", timeout=2).close()
            return proc, url
        except OSError:
            if time.time() > deadline:
                stop_server(proc)
                raise RuntimeError(f"no /ping after 180 s:\n{log_path.read_text()[-3000:]}") from None
            time.sleep(0.5)


def stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def send(url: str, req: dict) -> tuple[int, float, object]:
    """One request -> (HTTP status, or 0 when the connection failed; seconds; the answer)."""
    start = time.perf_counter()
    try:
        status, out = post(url, req["body"])
    except OSError as e:  # refused, reset, timed out: a failure with no status
        status, out = 0, f"{type(e).__name__}: {e}"
    return status, time.perf_counter() - start, out


def latency(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1000
    return {"n": len(ms), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1), "mean_ms": round(float(ms.mean()), 1)}


def run_load(url: str, plan: list[dict], clients: int, expected: dict[int, int]) -> dict:
    """Send the plan from `clients` threads; check every answer. `expected`: image index -> in-process count."""
    with ThreadPoolExecutor(clients) as pool:  # warm-up, untimed: first requests pay for lazy setup
        list(pool.map(lambda r: send(url, r), [r for r in plan if r["kind"] == "good"][:clients]))
        start = time.perf_counter()
        results = list(pool.map(lambda r: send(url, r), plan))
        wall = time.perf_counter() - start
    good_s, bad_s, failures, by_kind = [], [], [], {}
    for i, (req, (status, secs, out)) in enumerate(zip(plan, results)):
        statuses = by_kind.setdefault(req["kind"], {})
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        if req["kind"] == "good":
            good_s.append(secs)
            preds = out.get("predictions") if isinstance(out, dict) else None
            if status != 200 or not preds or len(preds) != 1:
                failures.append({"request": i, "kind": "good", "status": status, "answer": str(out)[:300]})
            elif preds[0]["count"] != expected[req["image"]]:
                failures.append({"request": i, "kind": "good", "status": status,
                                 "answer": f"count {preds[0]['count']}, in-process {expected[req['image']]}"})
        else:
            bad_s.append(secs)
            if not 400 <= status < 500:
                failures.append({"request": i, "kind": req["kind"], "status": status, "answer": str(out)[:300]})
    return {"wall_s": round(wall, 2), "requests_per_s": round(len(plan) / wall, 1),
            "good": {**latency(good_s), "failed": sum(f["kind"] == "good" for f in failures)},
            "bad": {**latency(bad_s), "not_4xx": sum(f["kind"] != "good" for f in failures)},
            "statuses_by_kind": by_kind, "failures": failures[:20]}


def run_baseline(counter: counters.BaseCounter, plan: list[dict], images: list[bytes]) -> tuple[dict, dict[int, int]]:
    """The good requests' images through predict.predict (the served model's own path), one per call, in order
    -> (timing, counts)."""
    predict(counter, [images[0]])  # warm-up
    secs, counts = [], {}
    start = time.perf_counter()
    for req in plan:
        if req["kind"] != "good":
            continue
        t = time.perf_counter()
        row = predict(counter, [images[req["image"]]]).iloc[0]
        secs.append(time.perf_counter() - t)
        if not pd.isna(row["error"]):
            raise RuntimeError(f"the in-process model refused a good image: {row['error']}")
        counts[req["image"]] = int(row["count"])
    wall = time.perf_counter() - start
    return {"wall_s": round(wall, 2), "requests_per_s": round(len(secs) / wall, 1), "good": latency(secs)}, counts


def print_table(res: dict) -> None:
    s, b = res["served"], res["baseline"]
    print(f"\nserve_load: {res['requests']} requests from {res['clients']} clients to {res['server_workers']} "
          f"server workers, {res['torch_threads']} torch thread(s) each; {res['model']}\nimages: {res['images']}; "
          f"load average at the end {' '.join(f'{x:.1f}' for x in res['load_average'])} on {res['cpus']} CPUs\n")
    print(f"{'':28} {'n':>5} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'failed':>7}")
    print(f"{'served, all':28} {res['requests']:>5} {s['requests_per_s']:>7} {'':>8} {'':>8} {'':>8} "
          f"{s['good']['failed'] + s['bad']['not_4xx']:>7}")
    for name, row, bad in (("served, good", s["good"], s["good"]["failed"]),
                           ("served, bad (4xx expected)", s["bad"], s["bad"]["not_4xx"]),
                           ("in-process, sequential", b["good"], 0)):
        rate = b["requests_per_s"] if name.startswith("in-process") else ""
        print(f"{name:28} {row['n']:>5} {rate:>7} {row['p50_ms']:>8} {row['p99_ms']:>8} {row['mean_ms']:>8} {bad:>7}")
    print("\nstatus by kind: " + "; ".join(f"{k} {v}" for k, v in s["statuses_by_kind"].items()))
    for f in s["failures"]:
        print(f"FAILED request {f['request']} ({f['kind']}): HTTP {f['status']}: {f['answer']}")


def main(args: argparse.Namespace) -> int:
    if args.url and not args.model:
        raise SystemExit("serve_load: --url needs --model (what the server serves) for the baseline")
    out = Path(args.out).resolve()
    if args.threads:  # the server inherits OMP_NUM_THREADS; this process (baseline, tiny training) follows it too
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        model_uri = args.model
        if not model_uri:  # a store of its own: nothing lands in the user's mlflow.db or ./mlruns
            os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
            os.chdir(tmp)  # the sqlite store's default artifact root is ./mlruns
            import mlflow
            mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
            model_uri = build_tiny_model(Path(tmp) / "tiny").model_uri
        images, origin = load_images(args.images, min(DISTINCT_IMAGES, args.requests), args.seed)
        plan = make_plan(args.requests, args.bad_frac, images, args.seed)
        counter = counters.load(model_uri)
        base, expected = run_baseline(counter, plan, images)  # before the server: nothing else on the CPUs
        proc, url = (None, args.url) if args.url else start_server(model_uri, args.workers, Path(tmp) / "serve.log")
        try:
            served = run_load(url, plan, args.clients, expected)
        finally:
            if proc:
                stop_server(proc)
    res = {"requests": args.requests, "clients": args.clients, "server_workers": args.workers or os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg(),
           "model": f"{model_uri} ({counter.config['arch']}, {counter.config['image_size']} px)",
           "images": origin, "cpus": os.cpu_count(), "served": served, "baseline": base,
           "ok": served["good"]["failed"] == 0 and served["bad"]["not_4xx"] == 0}
    print_table(res)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"\nwrote {out}")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
