"""`mlflow models serve` of the registered champion, over real HTTP: counts for good requests, a clear 4xx for
each kind of bad one, and a server that keeps serving."""
from __future__ import annotations

import base64
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import free_port
from helpers_model import CLASSES, build_tiny_model, tiny_model  # noqa: F401 (fixture)
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from bincounter import counters, serving
from bincounter.model import IMAGENET_MEAN, IMAGENET_STD
from bincounter.transforms import MAX_BYTES

SERVED = "bin-counter-served"  # not `bin-counter`: other test modules register that name in the same store


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    """`mlflow models serve -m models:/<SERVED>@champion` on a free loopback port, one uvicorn worker."""
    tiny = build_tiny_model(store / "tiny-model")
    mv = mlflow.register_model(tiny.model_uri, SERVED)
    MlflowClient().set_registered_model_alias(SERVED, "champion", mv.version)
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")  # uvicorn is in the venv
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{SERVED}@champion",
                                 "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow models serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url + "/ping", timeout=2).close()
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail(f"no /ping after 180 s:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.5)
        yield url, tiny
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the mlflow CLI and the uvicorn it started
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def post(url: str, body, content_type: str = "application/json") -> tuple[int, dict | str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + "/invocations", data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def split_request(images: list[bytes], column: str = "image") -> dict:
    return {"dataframe_split": {"columns": [column], "data": [[base64.b64encode(b).decode()] for b in images]}}


def png_bomb(side: int = 20000) -> bytes:
    """A valid 1-bit PNG declaring side x side pixels: about 50 KB on the wire, 400 MP decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    z = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def good_images(tiny, n: int = 2) -> list[bytes]:
    return [p.read_bytes() for p in sorted(tiny.images.glob("*.jpg"))[:n]]


def test_counts_a_dataframe_split_request(server):
    url, tiny = server
    status, out = post(url, split_request(good_images(tiny)))
    assert status == 200, out
    preds = out["predictions"]
    assert len(preds) == 2
    for p in preds:
        probs = [p[f"p_{c}"] for c in CLASSES]
        assert p["count"] in CLASSES and p["count"] == CLASSES[probs.index(max(probs))]
        assert p["confidence"] == pytest.approx(max(probs)) and sum(probs) == pytest.approx(1, abs=1e-4)


def test_inputs_and_instances_requests_count_the_same(server):
    url, tiny = server
    image = good_images(tiny, 1)
    text = base64.b64encode(image[0]).decode()
    _, split = post(url, split_request(image))
    for body in ({"inputs": {"image": [text]}}, {"instances": [{"image": text}]}):
        status, out = post(url, body)
        assert status == 200, out
        assert out["predictions"][0]["count"] == split["predictions"][0]["count"]


def _bad_requests(tiny) -> dict:
    jpeg = good_images(tiny, 1)[0]
    return {
        "not an image": (split_request([b"GIF? no, plain text"]), "application/json", "not an image"),
        "truncated jpeg": (split_request([jpeg[: len(jpeg) // 2]]), "application/json", "truncated"),
        "empty body": (b"", "application/json", "valid JSON"),
        "no rows": ({"dataframe_split": {"columns": ["image"], "data": []}}, "application/json", "no images"),
        "wrong column": (split_request([jpeg], column="photo"), "application/json", "missing inputs ['image']"),
        "not base64": ({"dataframe_split": {"columns": ["image"], "data": [["not-base64!"]]}}, "application/json", "base64"),
        "decompression bomb": (split_request([png_bomb()]), "application/json", "decompression bomb"),
        "oversized": (split_request([b"\xff\xd8\xff" + bytes(MAX_BYTES)]), "application/json",
                      f"over the {MAX_BYTES}-byte limit"),
        "not json": (b"{images: [", "application/json", "valid JSON"),
        "wrong content type": (b"hello", "text/plain", "content types"),
    }


@pytest.mark.parametrize("case", ["not an image", "truncated jpeg", "empty body", "no rows", "wrong column",
                                  "not base64", "decompression bomb", "oversized", "not json", "wrong content type"])
def test_a_bad_request_gets_a_clear_4xx_and_the_server_keeps_serving(server, case):
    url, tiny = server
    body, content_type, message = _bad_requests(tiny)[case]
    status, out = post(url, body, content_type)
    assert 400 <= status < 500, (status, out)
    assert message in (out["message"] if isinstance(out, dict) else out)
    status, out = post(url, split_request(good_images(tiny, 1)))
    assert status == 200 and len(out["predictions"]) == 1


class _Exploit:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["BINCOUNTER_EXPLOIT_MARKER"]),))


def test_the_served_model_holds_no_pickle_and_refuses_pickled_code(store, tmp_path, monkeypatch):
    tiny = build_tiny_model(store / "tiny-model")
    local = Path(mlflow.artifacts.download_artifacts(tiny.model_uri, dst_path=str(tmp_path / "model")))
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model" and "python_model" not in flavor
    assert not [p for p in local.rglob("*") if p.suffix in (".pkl", ".pickle")]
    model_dir = next(local.rglob(counters.CONFIG_FILE)).parent
    counters.BinCounter.from_dir(model_dir)  # the real weights load with weights_only=True

    marker = tmp_path / "pwned"
    monkeypatch.setenv("BINCOUNTER_EXPLOIT_MARKER", str(marker))
    (model_dir / "weights.pt").write_bytes(pickle.dumps(_Exploit(), protocol=2))
    with pytest.raises(pickle.UnpicklingError):
        counters.BinCounter.from_dir(model_dir)
    assert not marker.exists()


# the code file every logged model carries (bincounter/pyfunc_model.py as logged since the first model): it names
# bincounter.serving.BinCounterModel, so the wrapper must stay there
OLD_CODE_FILE = """\"\"\"Models-from-code entry: MLflow runs this file to get the model object; nothing is unpickled.\"\"\"
import mlflow

from bincounter.serving import BinCounterModel

mlflow.models.set_model(BinCounterModel())
"""


def test_a_model_with_the_first_code_file_still_loads_and_counts(store, tmp_path):
    tiny = build_tiny_model(store / "tiny-model")
    local = Path(mlflow.artifacts.download_artifacts(tiny.model_uri, dst_path=str(tmp_path / "model")))
    code = next(local.rglob("pyfunc_model.py"))
    code.write_text(OLD_CODE_FILE)
    model = mlflow.pyfunc.load_model(str(local))
    photo = next(tiny.images.glob("*.jpg")).read_bytes()
    out = model.predict(pd.DataFrame({"image": [photo]}))
    assert out["error"].isna().all() and int(out["count"].iloc[0]) in CLASSES


def test_batched_inference_equals_one_image_at_a_time_and_keeps_bad_rows_apart(monkeypatch):
    """The parallel, chunked path gives each image the probabilities a lone forward gives it; bad images get
    their own message in their own row and never move the others."""
    import io

    import torch
    from PIL import Image

    from bincounter.model import build_model, probabilities
    from bincounter.synthetic import draw_bin
    from bincounter.transforms import EvalPreset, decode_image

    monkeypatch.setattr(serving, "MAX_BATCH", 4)  # several chunks, the next decoded while one runs
    torch.manual_seed(0)
    counter = counters.BinCounter(build_model("resnet18", 5), {"arch": "resnet18", "classes": CLASSES, "image_size": 32},
                                 decode_threads=3)
    images = []
    for i in range(11):
        b = io.BytesIO()
        draw_bin(1 + i % 5, i, 48).save(b, "JPEG")
        images.append(b.getvalue())
    images[2], images[7], images[8] = b"", b"text, not a photo", images[7][:200]
    probs, errors = counter.probabilities(images, [f"img{i}" for i in range(11)])
    assert [i for i, e in enumerate(errors) if e] == [2, 7, 8]
    assert errors[2].startswith("img2: empty") and "img7: not an image" in errors[7] and errors[8].startswith("img8:")
    assert np.isnan(probs[[2, 7, 8]]).all()
    with torch.inference_mode():
        for i in (0, 1, 3, 4, 5, 6, 9, 10):
            alone = probabilities(counter.model, EvalPreset(32, IMAGENET_MEAN, IMAGENET_STD)(decode_image(images[i]))[None])[0].numpy()
            assert probs[i] == pytest.approx(alone, abs=1e-5), i


def five_bad(jpeg: bytes) -> list[bytes]:
    """The issue's five bad images: empty, text, a truncated JPEG, a fake PNG header; and bytes of no format."""
    return [b"", b"a text file, not a photo", jpeg[: len(jpeg) // 2], b"\x89PNG\r\n\x1a\n" + bytes(40), b"\x00" * 64]


def test_a_served_batch_with_bad_images_answers_every_row(server):
    """50 images, 5 bad, through `mlflow models serve`: 200, 45 counts, 5 errors in their own rows, JSON nulls."""
    url, tiny = server
    good = good_images(tiny, 10)
    images = [good[i % 10] for i in range(45)]
    bad_at = [3, 11, 20, 37, 49]
    for k, i in enumerate(bad_at):
        images.insert(i, five_bad(good[0])[k])
    status, out = post(url, split_request(images))
    assert status == 200, out
    preds = out["predictions"]
    assert len(preds) == 50
    assert [i for i, p in enumerate(preds) if p["error"] is not None] == bad_at
    assert all(preds[i]["count"] is None and preds[i]["confidence"] is None and preds[i]["p_1"] is None for i in bad_at)
    assert all(p["count"] in CLASSES and p["error"] is None for i, p in enumerate(preds) if i not in bad_at)
    assert preds[3]["error"].startswith("row 3: empty") and "row 11: not an image" in preds[11]["error"]
    assert "row 20: JPEG 64x64 does not decode" in preds[20]["error"] and "truncated" in preds[20]["error"]
    assert preds[37]["error"].startswith("row 37: not an image (48 bytes starting b'\\x89PNG")
    _, alone = post(url, split_request(images[:1]))  # a good row counts as it does alone
    assert preds[0] == pytest.approx(alone["predictions"][0], abs=1e-5)


def test_text_that_is_not_base64_is_an_error_of_its_own_row(server):
    url, tiny = server
    good = base64.b64encode(good_images(tiny, 1)[0]).decode()
    status, out = post(url, {"dataframe_split": {"columns": ["image"], "data": [[good], ["not-base64!"], [good]]}})
    assert status == 200, out
    assert [p["error"] for p in out["predictions"]][::2] == [None, None]
    assert out["predictions"][1]["error"].startswith("row 1: text that is not base64")


def test_the_pyfunc_answers_per_row_with_dtypes_that_hold_nulls(tiny_model):
    """In-process, as spark_udf calls it: a DataFrame of bytes and base64 text in, nullable columns out."""
    model = mlflow.pyfunc.load_model(tiny_model.model_uri)
    good = good_images(tiny_model, 2)
    cells = [good[0], base64.b64encode(good[1]).decode(), b"", "@@@@", 7, base64.b64encode(good[0])]
    out = model.predict(pd.DataFrame({"image": cells}))
    assert len(out) == 6 and list(out.columns[:2]) == ["count", "confidence"] and out.columns[-1] == "error"
    assert {f"p_{c}" for c in CLASSES} <= set(out.columns)
    assert str(out["count"].dtype) == "Int64" and str(out["confidence"].dtype) == "Float64"
    assert str(out["error"].dtype) == "string"
    ok = out["error"].isna().to_numpy()
    assert ok.tolist() == [True, True, False, False, False, True]
    assert out["count"].isna().to_numpy().tolist() == (~ok).tolist()
    assert out.loc[~ok, [f"p_{c}" for c in CLASSES]].isna().all().all()
    assert out["error"][2].startswith("row 2: empty") and out["error"][3].startswith("row 3: text that is not base64")
    assert out["error"][4] == "row 4: expected image bytes or base64 text, got int"
    assert out["count"][5] == out["count"][0] and out["confidence"][5] == pytest.approx(out["confidence"][0])

    with pytest.raises(MlflowException, match=r"none of the 2 images could be read: row 0: empty .*; row 1: not an"):
        model.predict(pd.DataFrame({"image": [b"", b"text"]}))

    sig = model.metadata.signature
    assert sig.inputs.input_names() == ["image"]
    outputs = {c["name"]: c for c in sig.outputs.to_dict()}
    assert outputs["error"] == {"name": "error", "type": "string", "required": False}
    assert outputs["count"] == {"name": "count", "type": "long", "required": False}
