"""evaluate per source (steps/evaluate.py): when the scored table holds bins of several sources, every source's
figures beside the overall ones, by the same functions, under MLflow-legal names, and `per_source.csv` with
bootstrap standard errors; one source: nothing new. And evaluate's `target_mix`."""
from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest
from helpers_model import CLASSES, tiny_model  # noqa: F401 (fixture)

from bincounter import calibration, metrics

SOURCES = ("abid-sample", "abid more/v2")  # the second needs its name made legal: `abid_more_v2`


def manifest(tiny, path, sources):
    """The tiny model's bins (two per count) as a manifest, the i-th bin from sources[i % len(sources)]."""
    files = sorted(tiny.images.glob("*.jpg"))
    rows = [{"image_id": p.stem, "count": int(p.stem.split("-")[0]), "path": str(p), "sha256": "", "width": 64,
             "height": 64, "source": sources[i % len(sources)]} for i, p in enumerate(files)]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def evaluate(model_uri: str, manifest_path, *extra: str):
    from steps import evaluate

    args = evaluate.get_args_parser().parse_args(["--model_uri", model_uri, "--manifest", str(manifest_path), *extra])
    return mlflow.get_run(evaluate.main(args))


def artifact(run, name: str) -> pd.DataFrame:
    return pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=name))


def test_two_sources_get_their_own_figures_beside_the_overall_ones(tiny_model, tmp_path):
    run = evaluate(tiny_model.model_uri, manifest(tiny_model, tmp_path / "m.csv", SOURCES))
    m = run.data.metrics
    preds = artifact(run, "predictions.csv")
    assert sorted(preds["source"].unique()) == sorted(SOURCES)
    for source, prefix in zip(SOURCES, ("abid-sample", "abid_more_v2")):
        rows = preds[preds["source"] == source]
        # the figures of the source's bins alone, by the functions evaluate uses for all bins
        expect = metrics.count_metrics(rows["count"], rows["predicted"])
        probs, y, right, conf, review = calibration.table_arrays(rows, CLASSES)
        expect.update(calibration.trust_metrics(probs, y, right, conf, review, CLASSES,
                                                calibration.DEFAULT_CHECK_THRESHOLD))
        for k in ("accuracy", "rmse", "mae", "ece", "check_auc_off2", "check_false_alarm",
                  "check_false_alarm_at_catch_90", "selective_accuracy_25"):
            assert m[f"{prefix}/test_{k}"] == pytest.approx(expect[k], nan_ok=True), (prefix, k)
        assert m[f"{prefix}/test_size"] == len(rows) == 5
        for c in rows["count"].unique():
            of_c = rows[rows["count"] == c]
            assert m[f"{prefix}/test_accuracy_count_{c}"] == pytest.approx((of_c["predicted"] == c).mean())
        assert 0 <= m[f"{prefix}/test_accuracy_se"] <= 0.5
    # one source's figures differ from the other's: they are not the overall ones copied
    assert any(m[f"abid-sample/test_{k}"] != m[f"abid_more_v2/test_{k}"] for k in ("rmse", "mae", "ece", "nll"))
    # the overall figures are still those of all bins
    assert m["test_accuracy"] == pytest.approx(metrics.count_metrics(preds["count"], preds["predicted"])["accuracy"])
    assert m["test_size"] == len(preds) == 10
    table = artifact(run, "per_source.csv")
    assert table["source"].tolist() == ["(all)", *sorted(SOURCES)]
    assert dict(zip(table["source"], table["metric_prefix"].fillna(""))) == {
        "(all)": "", "abid-sample": "abid-sample", "abid more/v2": "abid_more_v2"}
    assert table.loc[0, "accuracy"] == pytest.approx(m["test_accuracy"])
    assert table.loc[0, "ece"] == pytest.approx(m["test_ece"])
    assert {"accuracy_se", "rmse_se", "mae_se", "check_auc_off2", "accuracy_count_1"} <= set(table.columns)
    # a standard error shrinks with more bins: all ten against five
    assert table.loc[0, "accuracy_se"] < table.loc[1:, "accuracy_se"].max() or table["accuracy_se"].eq(0).all()


def test_one_source_changes_nothing(tiny_model, tmp_path):
    run = evaluate(tiny_model.model_uri, manifest(tiny_model, tmp_path / "m.csv", ("abid-sample",)))
    assert not [k for k in run.data.metrics if "/" in k]
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert "per_source.csv" not in names and "predictions.csv" in names
    assert "source" not in artifact(run, "predictions.csv").columns
    assert run.data.params["target_mix_applied"] == "train" and run.data.params["train_mix"] == "unknown"


def test_the_bootstrap_standard_error_is_the_binomial_one():
    rng = np.random.default_rng(1)
    right = rng.random(400) < 0.3
    se = metrics.bootstrap_se(lambda idx: {"accuracy": float(right[idx].mean())}, len(right))
    p = right.mean()
    assert se["accuracy"] == pytest.approx(np.sqrt(p * (1 - p) / len(right)), rel=0.15)


@pytest.mark.parametrize("names, expected", [
    (["abid-sample", "abid-more", "abid-thumbs"], ["abid-more", "abid-sample", "abid-thumbs"]),
    (["a b", "a/b", "a_b"], ["a_b", "a_b_2", "a_b_3"]),  # made unique
    (["../up", "", "x.y", "é"], ["unknown", "up", "unknown_2", "x_y"]),
])
def test_metric_prefixes_are_mlflow_legal_and_distinct(names, expected):
    from mlflow.utils.validation import _validate_metric_name

    prefixes = metrics.metric_prefixes(names)
    assert sorted(prefixes.values()) == sorted(expected)
    for p in prefixes.values():
        _validate_metric_name(f"{p}/test_accuracy")  # raises on a name MLflow refuses


def test_evaluate_scores_under_the_target_mix_it_is_given(tiny_model, tmp_path):
    from bincounter.train_log import log_trained_model
    from bincounter.train_config import TrainConfig

    with mlflow.start_run() as train:
        log_trained_model({"model": tiny_model.torch_model, "best_epoch": 1},
                          TrainConfig(arch="resnet18", weights="none", image_size=32, classes=CLASSES),
                          str(next(tiny_model.images.glob("*.jpg"))), train_mix=[0.2] * 5)
    uri = f"runs:/{train.info.run_id}/model"
    path = manifest(tiny_model, tmp_path / "m.csv", SOURCES)
    ones = "1:0.96,2:0.01,3:0.01,4:0.01,5:0.01"
    run = evaluate(uri, path, "--target_mix", ones)
    assert run.data.params["target_mix"] == ones and run.data.params["target_mix_applied"] == ones
    assert run.data.params["train_mix"] == "1:0.2,2:0.2,3:0.2,4:0.2,5:0.2"
    preds = artifact(run, "predictions.csv")
    assert (preds["predicted"] == 1).all()  # every bin answered as a one: the figures are the mix's
    assert run.data.metrics["test_accuracy"] == pytest.approx(0.2)
    assert run.data.metrics["abid-sample/test_accuracy_count_1"] == 1
    natural = evaluate(uri, path, "--target_mix", "natural")
    assert natural.data.params["target_mix_applied"].startswith("natural (1:0.117,2:0.219,3:0.257,")
    # a model logged before train_mix: refused before anything is scored, saying why
    with pytest.raises(ValueError, match="logged without its training mix"):
        evaluate(tiny_model.model_uri, path, "--target_mix", "natural")
    with pytest.raises(ValueError, match="does not count 7; its counts are 1, 2, 3, 4, 5"):
        evaluate(uri, path, "--target_mix", "1:0.5,7:0.5")
