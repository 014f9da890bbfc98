"""The one prediction path (bincounter/predict.py): how a model answers is said in predict.Settings and reaches
every member of an ensemble as it reaches one model; batch_size is images per forward pass; evaluate, the
served model, `bincounter predict` and `bincounter reconcile` give the same table for the same photos."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from helpers_model import CLASSES, tiny_model  # noqa: F401 (fixture)

from bincounter import calibration, cli, counters, serving
from bincounter.model import WEIGHTS_FILE
from bincounter.predict import predict
from bincounter.counters import Settings

P = [f"p_{c}" for c in CLASSES]
MEMBERS = ({"temperature": 2.0}, {"temperature": 1.2, "tta": True})  # what each member's config says
ENSEMBLE_T = 1.5  # every temperature here softens: the raw probabilities are the sharper ones


def images_of(tiny) -> list[bytes]:
    return [p.read_bytes() for p in sorted(tiny.images.glob("*.jpg"))]


def probs(counter, images: list[bytes], **settings) -> np.ndarray:
    return predict(counter, images, settings=Settings(**settings))[P].to_numpy(dtype=float)


@pytest.fixture
def ensemble(tiny_model, tmp_path) -> counters.Ensemble:
    """A logged ensemble of two members made from the tiny model (the second with its head nudged), each with
    its own temperature (and the second with test-time augmentation in its config), loaded as any model."""
    src = counters.model_dir(tiny_model.model_uri, tmp_path / "download")
    dirs = []
    for i, own in enumerate(MEMBERS):
        d = tmp_path / f"member{i}"
        shutil.copytree(src, d)
        config = json.loads((d / counters.CONFIG_FILE).read_text())
        (d / counters.CONFIG_FILE).write_text(json.dumps({**config, **own}))
        if i:
            state = torch.load(d / WEIGHTS_FILE, weights_only=True)
            state["fc.weight"] += 0.05 * torch.randn(state["fc.weight"].shape, generator=torch.Generator().manual_seed(0))
            torch.save(state, d / WEIGHTS_FILE)
        dirs.append(d)
    config = {"classes": CLASSES, "decision": "argmax", "temperature": ENSEMBLE_T,
              "members": [{"uri": f"member{i}", "run_id": ""} for i in range(len(MEMBERS))]}
    with mlflow.start_run() as run:
        serving.log_ensemble(dirs, config, images_of(tiny_model)[0])
    return counters.load(f"runs:/{run.info.run_id}/model")


def test_tta_and_the_temperature_change_an_ensemble_as_they_change_one_model(tiny_model, ensemble):
    images = images_of(tiny_model)
    one, other = ensemble.members
    assert isinstance(ensemble, counters.Ensemble) and [m.trust.temperature for m in ensemble.members] == [2.0, 1.2]
    for counter in (one, ensemble):
        # test-time augmentation on and off: different probabilities
        assert not np.allclose(probs(counter, images, tta=True), probs(counter, images, tta=False), atol=1e-4)
        # the temperature on and off: different probabilities, the raw ones sharper (every temperature softens)
        calibrated, raw = probs(counter, images, calibrated=True), probs(counter, images, calibrated=False)
        assert not np.allclose(calibrated, raw, atol=1e-4)
        assert raw.max(1).mean() > calibrated.max(1).mean() + 0.01
    # the ensemble is its members' mean under the same settings, then its own temperature; raw: none anywhere
    for tta in (True, False):
        mean = np.mean([probs(m, images, tta=tta) for m in (one, other)], axis=0)
        assert np.allclose(probs(ensemble, images, tta=tta), calibration.apply_temperature(mean, ENSEMBLE_T), atol=1e-5)
    raw_mean = np.mean([probs(m, images, calibrated=False) for m in (one, other)], axis=0)
    assert np.allclose(probs(ensemble, images, calibrated=False), raw_mean, atol=1e-5)
    # tta left open: each member as it was logged (the first without, the second with)
    own = np.mean([probs(one, images, tta=False), probs(other, images, tta=True)], axis=0)
    assert np.allclose(probs(ensemble, images), calibration.apply_temperature(own, ENSEMBLE_T), atol=1e-5)
    # nothing was set on the loaded models
    assert ensemble.trust.temperature == ENSEMBLE_T and [m.trust.temperature for m in (one, other)] == [2.0, 1.2]
    assert (one.tta, other.tta) == (False, True)


def forward_sizes(monkeypatch) -> list[int]:
    """Record the images of every forward pass a BinCounter makes."""
    sizes: list[int] = []
    forward = counters.BinCounter.forward

    def counted(self, x, tta):
        sizes.append(len(x))
        return forward(self, x, tta)
    monkeypatch.setattr(counters.BinCounter, "forward", counted)
    return sizes


def test_batch_size_is_the_images_per_forward_pass(tiny_model, monkeypatch):
    counter = counters.load(tiny_model.model_uri)
    sizes = forward_sizes(monkeypatch)
    images = images_of(tiny_model) * 13  # 130
    big = predict(counter, images, settings=Settings(batch_size=100))
    assert sizes == [100, 30]  # more than the served model's 64 when asked
    sizes.clear()
    small = predict(counter, images, settings=Settings(batch_size=7))
    assert sizes == [7] * 18 + [4]
    assert np.allclose(big[P].to_numpy(dtype=float), small[P].to_numpy(dtype=float), atol=1e-5)
    sizes.clear()
    predict(counter, images)  # the served model's
    assert sizes == [counters.MAX_BATCH, counters.MAX_BATCH, 130 - 2 * counters.MAX_BATCH]
    with pytest.raises(ValueError, match="batch_size must be a whole number of images, 1 or more, got 0"):
        Settings(batch_size=0)
    with pytest.raises(ValueError, match="decision must be one of"):
        Settings(decision="mode")
    with pytest.raises(ValueError, match="target_mix: .* sum to"):
        Settings(target_mix="1:0.5,2:0.6")
    with pytest.raises(ValueError, match="logged without its training mix"):  # the model's counts: when it answers
        predict(counter, images[:1], settings=Settings(target_mix="natural"))


def test_evaluate_the_served_model_predict_and_reconcile_give_the_same_table(tiny_model, tmp_path, monkeypatch):
    from steps import evaluate

    files = sorted(tiny_model.images.glob("*.jpg"))
    counts = {p.stem: int(p.stem.split("-")[0]) for p in files}
    pd.DataFrame([{"image_id": p.stem, "count": counts[p.stem], "path": str(p), "sha256": "", "width": 64,
                   "height": 64, "source": "synthetic"} for p in files]).to_csv(tmp_path / "m.csv", index=False)
    pd.DataFrame({"image_id": list(counts), "expected_quantity": list(counts.values())}).to_csv(
        tmp_path / "expected.csv", index=False)
    sizes = forward_sizes(monkeypatch)
    run_id = evaluate.main(evaluate.get_args_parser().parse_args(
        ["--model_uri", tiny_model.model_uri, "--manifest", str(tmp_path / "m.csv"), "--batch_size", "3"]))
    assert sizes == [3, 3, 3, 1]  # evaluate's batch_size: images per forward pass
    evaluated = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="predictions.csv"),
                            dtype={"image_id": str}).set_index("image_id")
    assert cli.main(["predict", str(tiny_model.images), "--model", tiny_model.model_uri,
                     "--output", str(tmp_path / "predict.csv")]) == 0
    predicted = pd.read_csv(tmp_path / "predict.csv").rename(columns={"count": "predicted"})
    predicted = predicted.set_index(predicted["image"].map(lambda p: Path(p).stem).rename("image_id"))
    assert cli.main(["reconcile", "--images", str(tiny_model.images), "--expected", str(tmp_path / "expected.csv"),
                     "--model", tiny_model.model_uri, "--output", str(tmp_path / "reconcile.csv")]) == 0
    reconciled = pd.read_csv(tmp_path / "reconcile.csv", dtype={"image_id": str}).set_index("image_id")

    shown = ["predicted", "confidence", "review", *P]
    assert len(evaluated) == len(files) and evaluated["error"].isna().all()
    pd.testing.assert_frame_equal(predicted.loc[evaluated.index, shown], evaluated[shown], check_exact=False,
                                  atol=1e-6)
    pd.testing.assert_frame_equal(reconciled.loc[evaluated.index, ["predicted", "confidence", *P]],
                                  evaluated[["predicted", "confidence", *P]], check_exact=False, atol=1e-6)
    assert reconciled["expected_quantity"].to_dict() == counts
    # the served model answers through the same function
    served = mlflow.pyfunc.load_model(tiny_model.model_uri).predict(pd.DataFrame({"image": images_of(tiny_model)}))
    pd.testing.assert_frame_equal(served, predict(counters.load(tiny_model.model_uri), images_of(tiny_model)))
