"""How far to trust a count: the temperature, the trust figures and the thresholds (bincounter/calibration.py),
and how they travel: fitted by train on validation, kept in the model's config, applied wherever probabilities
leave the model, measured by evaluate."""
from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from helpers_data import make_split_run
from helpers_model import CLASSES, tiny_model  # noqa: F401 (fixture)

from bincounter import calibration


def softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def overconfident(n: int, temperature: float, seed: int = 0):
    """Probabilities softmax(z) of a model whose true distribution is softmax(z / temperature), and labels drawn
    from the true one -> (probs, y)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 3, size=(n, 5))
    true = softmax(z / temperature)
    y = np.array([rng.choice(5, p=p) for p in true])
    return softmax(z), y


def test_the_fitted_temperature_is_the_one_that_made_the_data():
    probs, y = overconfident(4000, temperature=2.5)
    t, why = calibration.fit_temperature(probs, y)
    assert why is None and t == pytest.approx(2.5, rel=0.1)
    cal = calibration.apply_temperature(probs, t)
    assert calibration.ece(cal, y) < calibration.ece(probs, y) / 2
    assert calibration.nll(cal, y) < calibration.nll(probs, y)
    # a timid model is sharpened
    t, _ = calibration.fit_temperature(*overconfident(4000, temperature=0.5, seed=1))
    assert t == pytest.approx(0.5, rel=0.1)


def test_apply_temperature_keeps_distributions_and_bad_rows():
    probs = np.array([[0.7, 0.2, 0.1], [np.nan, np.nan, np.nan], [1.0, 0.0, 0.0]])
    out = calibration.apply_temperature(probs, 2.0)
    assert np.isnan(out[1]).all()
    assert np.allclose(out[[0, 2]].sum(1), 1)
    assert out[0, 0] < 0.7 and out[0, 0] == pytest.approx(0.7 ** 0.5 / sum(p ** 0.5 for p in (0.7, 0.2, 0.1)))
    assert calibration.apply_temperature(probs[:1], 1.0).tolist() == probs[:1].tolist()


def test_too_little_validation_data_keeps_temperature_one_and_says_why():
    probs, y = overconfident(20, 2.0)
    t, why = calibration.fit_temperature(probs, y)
    assert t == 1.0 and "only 20 validation images" in why
    probs, _ = overconfident(100, 2.0)
    t, why = calibration.fit_temperature(probs, np.zeros(100, dtype=int))
    assert t == 1.0 and "one count only" in why
    trust = calibration.fit(*overconfident(20, 2.0), classes=CLASSES)
    assert trust.temperature == 1.0 and "left at their defaults" in trust.note
    assert trust.check_threshold == calibration.DEFAULT_CHECK_THRESHOLD and trust.review_confidence == 0


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0, -1.5])
def test_a_temperature_that_is_not_finite_and_positive_is_refused_with_a_warning(value):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t, why = calibration.checked_temperature(value)
    assert t == 1.0 and "not a finite positive number" in why
    assert any("temperature" in str(w.message) for w in caught)


def test_trust_figures_on_known_cases():
    perfect = np.eye(5)[[0, 1, 2, 3, 4]]
    y = np.arange(5)
    assert calibration.ece(perfect, y) == 0 and calibration.brier(perfect, y) == 0
    assert calibration.nll(perfect, y) == pytest.approx(0, abs=1e-9)
    assert calibration.brier(np.eye(5)[[1, 2, 3, 4, 0]], y) == 2
    # half right at confidence 0.9: |0.5 - 0.9|
    probs = np.tile([0.9, 0.1, 0, 0, 0], (4, 1))
    assert calibration.ece(probs, np.array([0, 0, 1, 1])) == pytest.approx(0.4)
    assert calibration.auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1
    assert calibration.auc(np.array([1.0]), np.array([1.0])) == 0.5
    rng = np.random.default_rng(0)
    a, b = rng.normal(1, 1, 50), rng.normal(0, 1, 70)
    brute = np.mean([(x > z) + 0.5 * (x == z) for x in a for z in b])
    assert calibration.auc(a, b) == pytest.approx(brute)
    conf, right = np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 1, 0, 0])
    assert calibration.selective_accuracy(conf, right, 0.5) == 1
    assert calibration.selective_accuracy(conf, right, 1.0) == 0.5


def test_check_figures_treat_every_count_as_a_record():
    probs = np.array([[0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])
    y = np.array([0, 2])  # counts 1 and 3
    f = calibration.check_figures(probs, y, [1, 2, 3], threshold=0.2)
    # right records: 0.6, 0.8; wrong: 0.3, 0.1, 0.1, 0.1; off by two: 0.1 (bin 1 says 3), 0.1 (bin 2 says 1)
    assert f["check_auc"] == 1 and f["check_auc_off2"] == 1
    assert f["check_catch"] == 0.75 and f["check_catch_off2"] == 1 and f["check_false_alarm"] == 0
    # at a fixed catch: the threshold that flags 90 % of the far-off records (both at 0.3) flags the right 0.2 too
    probs = np.array([[0.2, 0.5, 0.3], [0.3, 0.3, 0.4]])
    assert calibration.false_alarm_at_catch(probs, y, [1, 2, 3]) == 0.5
    assert calibration.false_alarm_at_catch(probs, y, [1, 2, 3], target=0.5) == 0.5  # one of two: still 0.3
    m = calibration.trust_metrics(probs, y, np.array([False, True]), probs.max(1), np.zeros(2, bool), [1, 2, 3], 0.25)
    assert m["check_false_alarm_at_catch_90"] == 0.5 and m["check_false_alarm"] == 0.5


def test_thresholds_meet_their_targets_on_the_data_they_were_chosen_on():
    probs, y = overconfident(600, 1.0, seed=3)
    trust = calibration.fit(probs, y, CLASSES, target_accuracy=0.9, target_catch=0.9, max_review=1)
    p = trust.promise
    assert p["check_catch_off2"] >= 0.9 and p["kept_accuracy"] >= 0.9 and 0 < p["review_rate"] < 1
    assert trust.config().keys() == {"temperature", "review_confidence", "check_threshold", "promise"}
    assert "about" in calibration.describe_check(trust, trust.check_threshold)
    assert "right 9" in calibration.describe_review(trust)  # "right 9x% of the time"
    # a threshold other than the model's promises nothing
    assert "Measured" not in calibration.describe_check(trust, 0.5)
    # a target no confidence reaches flags every count, when max_review lets it
    trust = calibration.fit(np.full((100, 5), 0.2), np.arange(100) % 5, CLASSES, target_accuracy=0.8, max_review=1)
    assert trust.promise["review_rate"] == 1 and "every count is flagged" in calibration.describe_review(trust)


def test_max_review_flags_a_minority_and_says_what_the_rest_are_worth():
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.2, 0.6, 1000)
    right = rng.uniform(size=1000) < confidence  # no threshold keeps counts right 80 % of the time
    choose = calibration.choose_review_confidence
    assert choose(confidence, right, 0.8, max_share=1.0) > confidence.max()  # uncapped: every count flagged
    t = choose(confidence, right, 0.8, max_share=0.3)
    assert (confidence < t).mean() == 0.3  # the least confident 30 %
    assert right[confidence >= t].mean() > right.mean()  # the rest are worth more than the average count
    # a target reached with fewer flags keeps its own threshold under the cap
    assert choose(confidence, right, 0.45, max_share=0.3) == choose(confidence, right, 0.45, max_share=1.0)
    tied = np.repeat([0.3, 0.5], 50)  # a tie at the cut: flag fewer, never half of a tie
    assert (tied < choose(tied, np.zeros(100, bool), 0.8, max_share=0.3)).mean() == 0
    probs, y = overconfident(600, 0.3, seed=5)
    trust = calibration.fit(probs, y, CLASSES, target_accuracy=0.99, max_review=0.25)
    p = trust.promise
    assert p["max_review"] == 0.25 and 0.2 < p["review_rate"] <= 0.25 and p["kept_accuracy"] < 0.99
    assert "short of the 99% target: flagging more than 25% was not allowed" in calibration.describe_review(trust)


def test_a_model_logged_before_calibration_loads_with_temperature_one(tiny_model, tmp_path):
    from bincounter import counters

    counter = counters.load(tiny_model.model_uri)
    assert counter.trust == calibration.Trust()
    images = [p.read_bytes() for p in sorted(tiny_model.images.glob("*.jpg"))]
    raw, _ = counter.probabilities(images)
    assert not counter.table(raw)["review"].any()
    # the same weights with a temperature in the config: softer probabilities, the same counts
    d = Path(mlflow.artifacts.download_artifacts(f"{tiny_model.model_uri}", dst_path=str(tmp_path)))
    model_dir = next(d.rglob(counters.CONFIG_FILE)).parent
    config = json.loads((model_dir / counters.CONFIG_FILE).read_text())
    assert "temperature" not in config
    (model_dir / counters.CONFIG_FILE).write_text(json.dumps({**config, "temperature": 3.0, "review_confidence": 0.5}))
    hot = counters.BinCounter.from_dir(model_dir)
    soft, _ = hot.probabilities(images)
    assert np.allclose(soft, calibration.apply_temperature(raw, 3.0), atol=1e-5)
    assert (soft.max(1) < raw.max(1) + 1e-6).all()
    table = hot.table(soft)
    assert table["review"].tolist() == (table["confidence"] < 0.5).tolist()
    # the counts stay the model's own, for the median answer too (the median of a softer distribution would drift)
    for rule in ("argmax", "median"):
        hot.decision = counter.decision = rule
        assert hot.table(soft)["count"].tolist() == counter.table(raw)["count"].tolist()


def trust_args(**kw) -> argparse.Namespace:
    from steps.train import get_args_parser

    return get_args_parser().parse_args(["--split_run_id", "x", *[f"--{k}={v}" for k, v in kw.items()]])


@pytest.mark.parametrize("calibrate", [True, False])
def test_train_fits_trust_on_validation_and_the_model_carries_it(tmp_path, calibrate):
    from bincounter import counters
    from bincounter.runs import load_split
    from steps import options, train

    split = make_split_run(tmp_path, n=200, size=32)  # 40 validation bins: enough for a fit
    classes, train_df, val_df = load_split(split)
    args = trust_args(weights="none", arch="resnet18", image_size=32, epochs=1, max_steps=2, batch_size=16,
                      calibrate=str(calibrate).lower(), target_accuracy=0.5)
    cfg = options.train_config(vars(args), classes)
    run_id = train.fit_and_log(args, cfg, train_df, val_df)
    run = mlflow.get_run(run_id)
    config = counters.load(f"runs:/{run_id}/model").config
    assert config["temperature"] == run.data.metrics["temperature"]
    assert config["check_threshold"] == run.data.metrics["check_threshold"] and 0 < config["check_threshold"] <= 1
    assert config["promise"]["measured_on"] == "validation split (40 bins)"
    assert config["promise"]["target_accuracy"] == 0.5
    assert run.data.metrics["val_nll"] <= run.data.metrics["val_nll_raw"] + 1e-6  # (up to the search tolerance)
    if calibrate:
        assert config["temperature"] != 1.0 and "bincounter.calibration" not in run.data.tags
    else:
        assert config["temperature"] == 1.0 and "calibrate=false" in run.data.tags["bincounter.calibration"]
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id)}
    assert "reliability_val.png" in names


@pytest.mark.parametrize("bad", ["0", "1.5", "abc"])
def test_targets_out_of_range_are_refused_naming_them(bad, capsys):
    with pytest.raises(SystemExit):
        trust_args(target_catch=bad)
    assert "target_catch" in capsys.readouterr().err


def test_evaluate_says_how_far_to_trust_the_model(tiny_model, tmp_path):
    from steps import evaluate

    rows = [{"image_id": p.stem, "count": int(p.stem.split("-")[0]), "path": str(p), "sha256": "", "width": 64,
             "height": 64, "source": "synthetic"} for p in sorted(tiny_model.images.glob("*.jpg"))]
    manifest = tmp_path / "m.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    args = evaluate.get_args_parser().parse_args(["--model_uri", tiny_model.model_uri, "--manifest", str(manifest)])
    run = mlflow.get_run(evaluate.main(args))
    m = run.data.metrics
    for k in ("test_ece", "test_nll", "test_brier", "test_selective_accuracy_25", "test_selective_accuracy_50",
              "test_check_auc", "test_check_auc_off2", "test_check_catch", "test_check_catch_off2",
              "test_check_false_alarm", "test_check_false_alarm_at_catch_90", "test_review_rate"):
        assert k in m and np.isfinite(m[k]), k
    assert 0 <= m["test_ece"] <= 1 and 0 <= m["test_check_auc"] <= 1
    preds = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="predictions.csv"))
    probs = preds[[f"p_{c}" for c in CLASSES]].to_numpy()
    assert m["test_ece"] == pytest.approx(calibration.ece(probs, preds["count"].to_numpy() - 1), abs=1e-9)
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"reliability.png", "coverage.png"} <= names


def test_the_gate_minimises_calibration_error_and_maximises_the_check_auc():
    from bincounter.registry import lower_is_better

    assert lower_is_better("test_ece") and lower_is_better("test_nll") and lower_is_better("test_brier")
    assert not lower_is_better("test_check_auc") and not lower_is_better("test_accuracy")


def test_refit_trains_on_train_and_validation_with_the_chosen_settings(tmp_path):
    from bincounter.train_log import CALIBRATION_BINS
    from steps import options, train

    split = make_split_run(tmp_path, n=100, size=32)
    base = ["--split_run_id", split, "--weights=none", "--arch=resnet18", "--image_size=32", "--max_steps=1",
            "--batch_size=8", "--lr=0.003", "--label_smoothing=0.1", "--target_mix=natural"]
    source = train.main(train.get_args_parser().parse_args([*base, "--epochs=3", "--patience=1"]))
    best = int(mlflow.get_run(source).data.metrics["best_epoch"])
    args = train.get_args_parser().parse_args(["--split_run_id", split, "--refit_of", source, "--epochs=9",
                                               "--calibration_frac=0.5"])
    run = mlflow.get_run(train.main(args))
    assert run.data.tags["bincounter.refit_of"] == source and run.info.run_name.startswith("refit train resnet18")
    p = run.data.params
    assert (p["refit_epochs"], p["patience"], p["hp_lr"], p["label_smoothing"]) == (str(best), "0", "0.003", "0.1")
    assert len(mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_loss")) == best
    rows = {d.dataset.name: json.loads(d.dataset.profile)["num_rows"] for d in run.inputs.dataset_inputs}
    assert rows == {"train": 60 + 10, "val": 10}  # 20 validation bins: half join training, half calibrate
    # the refit keeps its last epoch, whatever validation says
    assert run.data.metrics["best_epoch"] == best
    # it answers for the mix its source does, from the mix of the bins it trained on (train + 10 validation bins)
    from bincounter import counters
    config = counters.load(f"runs:/{run.info.run_id}/model").config
    assert config["target_mix"] == "natural" and p["train_mix"] == "1:0.2,2:0.2,3:0.2,4:0.2,5:0.2"
    # an ensemble with this refit calibrates only on the validation bins it kept back
    from bincounter.manifest import read_manifest
    from bincounter.runs import download
    from steps import ensemble

    val = read_manifest(download(split, "splits/val.csv", tmp_path / "val"))
    held = pd.read_csv(download(run.info.run_id, CALIBRATION_BINS, tmp_path / "held"), dtype={"image_id": str})
    mask = ensemble.unseen(val, [{"run_id": source}, {"run_id": run.info.run_id}])
    assert mask.sum() == 10 and set(val["image_id"][mask]) == set(held["image_id"])

    refuse = lambda **kw: options.refit_args(train.get_args_parser().parse_args(  # noqa: E731
        [f"--{k}={v}" for k, v in {"split_run_id": split, **kw}.items()]), train.get_args_parser())
    with pytest.raises(ValueError, match="is a 'split' run, expected a 'train' run"):
        refuse(refit_of=split)
    with pytest.raises(ValueError, match="is itself a refit"):
        refuse(refit_of=run.info.run_id)
    with pytest.raises(ValueError, match="refit on the split whose validation chose the settings"):
        refuse(refit_of=source, split_run_id=make_split_run(tmp_path / "other", n=20, size=32))


def test_an_ensemble_averages_calibrated_members_and_serves_like_any_model(tmp_path, tiny_model):
    import subprocess
    import sys

    from bincounter import counters
    from conftest import ROOT
    from steps import ensemble

    split = make_split_run(tmp_path, n=150, size=32)
    # a second member with its own input settings: another resolution and temperature
    with mlflow.start_run() as other:
        from bincounter.train_config import TrainConfig
        from bincounter.train_log import log_trained_model

        cfg = TrainConfig(arch="resnet18", weights="none", image_size=48, classes=CLASSES)
        log_trained_model({"model": tiny_model.torch_model, "best_epoch": 1}, cfg,
                          str(next(tiny_model.images.glob("*.jpg"))), calibration.Trust(temperature=2.0))
    members = f"{tiny_model.run_id},runs:/{other.info.run_id}/model"
    args = ensemble.get_args_parser().parse_args(["--members", members, "--split_run_id", split])
    run = mlflow.get_run(ensemble.main(args))
    assert run.data.tags["bincounter.members"] == f"{tiny_model.run_id},{other.info.run_id}"
    assert run.data.metrics["members"] == 2 and "temperature" in run.data.metrics

    uri = f"runs:/{run.info.run_id}/model"
    counter = counters.load(uri)
    assert isinstance(counter, counters.Ensemble)
    assert [m["run_id"] for m in counter.config["members"]] == [tiny_model.run_id, other.info.run_id]
    assert [m.config["image_size"] for m in counter.members] == [32, 48]
    images = [p.read_bytes() for p in sorted(tiny_model.images.glob("*.jpg"))][:4] + [b"not an image"]
    probs, errors = counter.probabilities(images)
    a, _ = counters.load(tiny_model.model_uri).probabilities(images)
    b, _ = counters.load(f"runs:/{other.info.run_id}/model").probabilities(images)
    expected = calibration.apply_temperature((a + b) / 2, counter.trust.temperature)
    assert np.allclose(probs[:4], expected[:4], atol=1e-5) and np.isnan(probs[4]).all()
    assert errors[:4] == [None] * 4 and errors[4]
    # a fresh process serves it through the pyfunc, one bad row among good ones
    code = ("import sys, mlflow, pandas as pd; m = mlflow.pyfunc.load_model(sys.argv[1]); "
            "print(m.predict(pd.DataFrame({'image': [open(sys.argv[2], 'rb').read(), b'x']})).to_json(orient='records'))")
    out = subprocess.run([sys.executable, "-c", code, uri, str(next(tiny_model.images.glob("*.jpg")))],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    good, bad = json.loads(out.splitlines()[-1])
    assert good["count"] in CLASSES and good["error"] is None and bad["count"] is None and bad["error"]


def test_an_ensemble_refuses_members_it_cannot_use(tmp_path, tiny_model):
    from steps import ensemble

    split = make_split_run(tmp_path, n=20, size=32)
    run = lambda members: ensemble.main(ensemble.get_args_parser().parse_args(  # noqa: E731
        ["--members", members, "--split_run_id", split]))
    with pytest.raises(ValueError, match="at least two models"):
        run(tiny_model.run_id)
    with pytest.raises(ValueError, match="listed twice"):
        run(f"{tiny_model.run_id},{tiny_model.model_uri}")
    with pytest.raises(ValueError, match=f"members: runs:/{split}/model does not load"):
        run(f"{tiny_model.run_id},{split}")
    with mlflow.start_run() as three:
        from bincounter.train_config import TrainConfig
        from bincounter.train_log import log_trained_model

        import torchvision
        net = torchvision.models.resnet18(num_classes=3)
        log_trained_model({"model": net, "best_epoch": 1}, TrainConfig(arch="resnet18", image_size=32,
                          classes=[1, 2, 3]), str(next(tiny_model.images.glob("*.jpg"))))
    with pytest.raises(ValueError, match=r"counts \[1, 2, 3\], but"):
        run(f"{tiny_model.run_id},{three.info.run_id}")


PROMISE = {"measured_on": "validation split (40 bins)", "target_accuracy": 0.8, "target_catch": 0.9,
           "review_rate": 0.5, "kept_accuracy": 0.8, "check_auc": 0.8, "check_auc_off2": 0.9, "check_catch": 0.7,
           "check_catch_off2": 0.9, "check_false_alarm": 0.25}


def test_reconcile_uses_the_models_threshold_and_says_what_it_promises(tiny_model, tmp_path, capsys):
    from bincounter import cli
    from bincounter.train_config import TrainConfig
    from bincounter.train_log import log_trained_model

    with mlflow.start_run() as run:
        log_trained_model({"model": tiny_model.torch_model, "best_epoch": 1},
                          TrainConfig(arch="resnet18", weights="none", image_size=32, classes=CLASSES),
                          str(next(tiny_model.images.glob("*.jpg"))),
                          calibration.Trust(review_confidence=0.3, check_threshold=0.35, promise=PROMISE))
    expected = tmp_path / "expected.csv"
    ids = sorted(p.stem for p in tiny_model.images.glob("*.jpg"))
    pd.DataFrame({"image_id": ids, "expected_quantity": [(int(i[0]) % 5) + 1 for i in ids]}).to_csv(expected, index=False)
    model = f"runs:/{run.info.run_id}/model"
    out, report = tmp_path / "r.csv", tmp_path / "r.html"
    assert cli.main(["reconcile", "--images", str(tiny_model.images), "--expected", str(expected), "--model", model,
                     "--output", str(out), "--report", str(report)]) == 0
    console = capsys.readouterr().out
    assert "below 0.35. Measured on the model's validation split (40 bins): of records off by two or more, about " \
           "90% are flagged; of all wrong records, about 70%; and about 25% of right records are flagged too." in console
    df = pd.read_csv(out)
    checked = df[df["status"] == "checked"]
    assert checked["flagged"].tolist() == (checked["p_expected"] < 0.35).tolist()
    assert {f"p_{c}" for c in CLASSES} <= set(df.columns)
    page = report.read_text()
    assert "about 90% are flagged" in page and page.count("<svg") == checked["flagged"].sum()
    flagged = checked[checked["flagged"]].sort_values("p_expected")
    positions = [page.index(f"alt='{i}'") for i in flagged["image_id"].astype(str)]
    assert positions == sorted(positions)  # least likely record first

    # --threshold wins, and the promise is not claimed for it
    assert cli.main(["reconcile", "--images", str(tiny_model.images), "--expected", str(expected), "--model", model,
                     "--threshold", "0.9", "--output", str(out)]) == 0
    assert "Measured" not in capsys.readouterr().out
    checked = pd.read_csv(out).query("status == 'checked'")
    assert checked["flagged"].tolist() == (checked["p_expected"] < 0.9).tolist()


def test_a_threshold_out_of_range_is_refused_before_the_model_loads(tmp_path, capsys):
    from bincounter import cli

    with pytest.raises(SystemExit) as e:  # the model URI would fail to load: the threshold is refused first
        cli.main(["reconcile", "--images", str(tmp_path), "--expected", str(tmp_path), "--model", "runs:/nope/model",
                  "--threshold", "1.5"])
    assert e.value.code == 2 and "--threshold: expected a probability between 0 and 1, got '1.5'" in capsys.readouterr().err
