"""Test helpers for an `mlflow server` on 127.0.0.1: a free port, REST calls, a bounded start and a clean stop."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path


from conftest import free_port  # noqa: F401  (one definition; the server helpers below use it)


def api(base: str, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(f"{base}/api/2.0/mlflow/{path}", data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json"}, method="POST" if body else "GET")
    return json.load(urllib.request.urlopen(req, timeout=30))


def wait_for_server(uri: str, timeout: float = 120, proc: subprocess.Popen | None = None,
                    log: Path | None = None) -> None:
    """Return once `uri`/health answers; a RuntimeError naming the URI after `timeout` seconds or as soon as
    `proc` (the server) exits, with the end of its `log`."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"mlflow server for {uri} exited with status {proc.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError) as e:
            last = str(getattr(e, "reason", e))
        time.sleep(0.5)
    raise RuntimeError(f"the MLflow tracking server at {uri} is not up after {timeout:.0f} s ({last})")


@contextmanager
def mlflow_server(store: Path, timeout: float = 120):
    """`mlflow server` over a throw-away sqlite store and artifact folder under `store` -> its URI; the server's
    whole process group is ended on exit."""
    store.mkdir(parents=True, exist_ok=True)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log = store / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                                 f"sqlite:///{store}/mlflow.db", "--artifacts-destination", str(store / "artifacts"),
                                 "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}"))
    try:
        wait_for_server(uri, timeout, proc, log)
        yield uri
    finally:
        # the server forks workers (uvicorn): end the group, not just the parent
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
