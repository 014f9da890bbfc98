"""Prior correction (bincounter/calibration.py, counters.BinCounter): a model's answers moved from the mix of counts
it was trained on (`train_mix`, in its config) to a target mix (`target_mix`: train, natural or explicit shares),
after the temperature, in the one inference path; models logged before keep their answers."""
from __future__ import annotations

import collections

import mlflow
import numpy as np
import pytest
from conftest import LABELS
from helpers_data import make_split_run
from helpers_model import CLASSES, tiny_model  # noqa: F401 (fixture)

from bincounter import abid, calibration, priors
from bincounter.model import decide

UNIFORM = [0.2] * 5


def random_probs(n: int = 40, seed: int = 0) -> np.ndarray:
    z = np.random.default_rng(seed).normal(0, 1.5, size=(n, 5))
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


# -- the maths ---------------------------------------------------------------------------------------------------

def test_from_a_uniform_training_mix_the_target_multiplies_and_renormalises():
    probs = random_probs()
    target = "1:0.1,2:0.2,3:0.4,4:0.2,5:0.1"
    out = priors.apply_prior(probs, priors.prior_weights(UNIFORM, target, CLASSES))
    expected = probs * np.array([0.1, 0.2, 0.4, 0.2, 0.1])
    assert np.allclose(out, expected / expected.sum(1, keepdims=True))
    assert np.allclose(out.sum(1), 1)
    # a known row by hand: equal probabilities become the target itself
    flat = priors.apply_prior(np.full((1, 5), 0.2), priors.prior_weights(UNIFORM, target, CLASSES))
    assert np.allclose(flat, [[0.1, 0.2, 0.4, 0.2, 0.1]])


def test_a_target_equal_to_the_training_mix_changes_nothing():
    probs = random_probs(seed=1)
    train = [0.1, 0.3, 0.3, 0.2, 0.1]
    w = priors.prior_weights(train, "1:0.1,2:0.3,3:0.3,4:0.2,5:0.1", CLASSES)
    assert np.allclose(w, 1) and np.allclose(priors.apply_prior(probs, w), probs)
    assert priors.prior_weights(train, "train", CLASSES) is None
    assert priors.apply_prior(probs, None) is probs


def test_a_skewed_training_mix_is_divided_out():
    # a model trained where ones were half the bins says 1 too readily: moved to equal shares, the ones lose
    probs = np.array([[0.5, 0.125, 0.125, 0.125, 0.125], [np.nan] * 5])
    w = priors.prior_weights([0.5, 0.125, 0.125, 0.125, 0.125], "1:0.2,2:0.2,3:0.2,4:0.2,5:0.2", CLASSES)
    out = priors.apply_prior(probs, w)
    assert np.allclose(out[0], 0.2) and np.isnan(out[1]).all()


def test_the_training_mix_is_the_shares_of_the_training_counts_or_equal_when_balanced():
    counts = [1] * 6 + [2] * 3 + [5]
    assert priors.train_mix(counts, [1, 2, 3, 4, 5]) == [0.6, 0.3, 0.0, 0.0, 0.1]
    # balanced training draws every count present equally often
    assert priors.train_mix(counts, [1, 2, 3, 4, 5], balanced=True) == pytest.approx([1 / 3, 1 / 3, 0, 0, 1 / 3])
    # a count never trained on cannot be re-weighted
    with pytest.raises(ValueError, match="saw no training bin of count 3, 4"):
        priors.prior_weights(priors.train_mix(counts, CLASSES), "natural", CLASSES)


def test_natural_is_the_label_index_mix_and_adapts_to_counts_within_one_to_five():
    assert sum(abid.NATURAL_MIX.values()) == pytest.approx(1)
    assert [round(abid.NATURAL_MIX[c], 3) for c in CLASSES] == [0.117, 0.219, 0.257, 0.229, 0.178]
    assert np.allclose(priors.resolve_mix("natural", CLASSES), [abid.NATURAL_MIX[c] for c in CLASSES])
    three = priors.resolve_mix("natural", [1, 2, 3])
    assert three.sum() == pytest.approx(1) and three[0] / three[2] == pytest.approx(41_147 / 90_058)
    with pytest.raises(ValueError, match=r"model also counts 0; give shares of its counts \(0, 1, 2, 3, 4, 5\)"):
        priors.resolve_mix("natural", [0, 1, 2, 3, 4, 5])


@pytest.mark.skipif(not (LABELS / "expected_quantity.csv").exists(), reason=f"no label index at {LABELS}")
def test_the_natural_mix_constant_is_what_the_label_index_says():
    counts = collections.Counter(abid.read_label_index(LABELS / "expected_quantity.csv").values())
    assert {c: counts[c] for c in range(1, 6)} == abid.NATURAL_COUNTS
    total = sum(counts[c] for c in range(1, 6))
    assert abid.NATURAL_MIX == {c: counts[c] / total for c in range(1, 6)}


@pytest.mark.parametrize("spec, message", [
    ("1:0.5,2:0.6", "sum to 1.1, not 1"),
    ("1:-0.1,2:0.3,3:0.3,4:0.3,5:0.2", "share of count 1 is -0.1; shares must be positive"),
    ("1:0,2:0.3,3:0.3,4:0.3,5:0.1", "share of count 1 is 0"),
    ("1:0.2,2:0.2,3:0.2,4:0.2,6:0.2", "does not count 6; its counts are 1, 2, 3, 4, 5"),
    ("1:0.25,2:0.25,3:0.25,4:0.25", r"no share for count 5; give a share for every count the model knows "
                                    r"\(1, 2, 3, 4, 5\)"),
    ("1:0.5,1:0.5", "count 1 is given twice"),
    ("uniform", "expected train, natural or shares of every count like 1:0.12"),
    ("1=0.5,2=0.5", "is not count:share"),
])
def test_bad_mixes_are_refused_saying_why(spec, message):
    with pytest.raises(ValueError, match=message) as e:
        priors.resolve_mix(spec, CLASSES)
    assert str(e.value).startswith("target_mix: ")


def test_a_mix_within_the_tolerance_passes_and_one_outside_it_does_not():
    assert priors.parse_mix("1:0.2,2:0.2,3:0.2,4:0.2,5:0.2009")[5] == 0.2009
    with pytest.raises(ValueError, match="sum to"):
        priors.parse_mix("1:0.2,2:0.2,3:0.2,4:0.2,5:0.202")


# -- through a logged model ----------------------------------------------------------------------------------------

def log_with_mix(tiny, train_mix, target_mix="train", temperature=1.0) -> str:
    from bincounter.train_log import log_trained_model
    from bincounter.train_config import TrainConfig

    with mlflow.start_run() as run:
        log_trained_model({"model": tiny.torch_model, "best_epoch": 1},
                          TrainConfig(arch="resnet18", weights="none", image_size=32, classes=CLASSES),
                          str(next(tiny.images.glob("*.jpg"))), calibration.Trust(temperature=temperature),
                          train_mix, target_mix)
    return f"runs:/{run.info.run_id}/model"


def images_of(tiny) -> list[bytes]:
    return [p.read_bytes() for p in sorted(tiny.images.glob("*.jpg"))]


EXTREME = "1:0.96,2:0.01,3:0.01,4:0.01,5:0.01"  # a warehouse of single items


def test_the_config_carries_the_mixes_and_the_answers_move_after_the_temperature(tiny_model):
    from bincounter import counters

    uri = log_with_mix(tiny_model, UNIFORM, EXTREME, temperature=2.0)
    counter = counters.load(uri)
    assert counter.config["train_mix"] == UNIFORM and counter.config["target_mix"] == EXTREME
    images = images_of(tiny_model)
    counter.target_mix = "train"
    at_train, _ = counter.probabilities(images)
    table_train = counter.table(at_train)
    counter.target_mix = EXTREME
    moved, _ = counter.probabilities(images)
    # the prior comes after the temperature: p ∝ p_model^(1/T) · target / train
    w = np.array([0.96, 0.01, 0.01, 0.01, 0.01]) / 0.2
    assert np.allclose(moved, priors.apply_prior(at_train, w), atol=1e-6)
    raw = calibration.apply_temperature(at_train, 0.5)  # the model's own distribution (T = 2 undone)
    for rule in ("argmax", "median"):
        counter.decision = rule
        table = counter.table(moved)
        # the count is decided on the model's own distribution with the prior: it moves, towards 1
        expected = priors.apply_prior(raw, w)
        assert table["count"].tolist() == [CLASSES[i] for i in decide(expected, rule)]
        assert np.allclose(table["confidence"], moved[np.arange(len(moved)), decide(expected, rule)])
    # with the extreme mix, every bin of the tiny (barely trained) model is a one, and fewer were before
    assert (counter.table(moved)["count"] == 1).all() and not (table_train["count"] == 1).all()


def test_a_model_logged_before_prior_correction_answers_as_before_and_refuses_a_mix(tiny_model, tmp_path):
    from bincounter import counters

    counter = counters.load(tiny_model.model_uri)
    assert "train_mix" not in counter.config and counter.target_mix == "train" and counter.train_mix is None
    images = images_of(tiny_model)
    probs, _ = counter.probabilities(images)
    calibrated, _ = counter.calibrated(images)
    assert np.array_equal(probs, calibrated)
    with pytest.raises(ValueError, match="logged without its training mix"):
        counter.target_mix = "natural"
    assert counter.target_mix == "train"  # a refused mix leaves the counter as it was
    # the same weights with a training mix but target train: the very same answers
    same = counters.load(log_with_mix(tiny_model, [0.5, 0.2, 0.1, 0.1, 0.1]))
    again, _ = same.probabilities(images)
    assert np.allclose(again, probs, atol=1e-6)
    assert same.table(again)["count"].tolist() == counter.table(probs)["count"].tolist()


def test_a_config_with_a_mix_the_model_cannot_take_is_refused_when_logged(tiny_model):
    with pytest.raises(ValueError, match="logged without its training mix"):
        log_with_mix(tiny_model, None, "natural")
    with pytest.raises(ValueError, match="does not count 6"):
        log_with_mix(tiny_model, UNIFORM, "1:0.5,6:0.5")


def test_an_ensemble_moves_its_mean_once_after_its_own_temperature(tiny_model, tmp_path):
    from bincounter import counters

    a = counters.load(log_with_mix(tiny_model, UNIFORM, EXTREME, temperature=2.0))
    b = counters.load(log_with_mix(tiny_model, [0.1, 0.2, 0.4, 0.2, 0.1], EXTREME))
    config = {"classes": CLASSES, "temperature": 1.5, "members": [{"uri": "a"}, {"uri": "b"}]}
    ens = counters.Ensemble([a, b], config)
    # no mixes in the ensemble's config: the members' mean training mix, the first member's target
    assert ens.train_mix == pytest.approx([0.15, 0.2, 0.3, 0.2, 0.15]) and ens.target_mix == EXTREME
    images = images_of(tiny_model)
    probs, errors = ens.probabilities(images)
    # the members' calibrated distributions (their own priors NOT applied), the mean, its temperature, one prior
    mean = np.mean([a.calibrated(images)[0], b.calibrated(images)[0]], axis=0)
    w = np.array([0.96, 0.01, 0.01, 0.01, 0.01]) / np.array([0.15, 0.2, 0.3, 0.2, 0.15])
    assert np.allclose(probs, priors.apply_prior(calibration.apply_temperature(mean, 1.5), w), atol=1e-6)
    assert errors == [None] * len(images)
    assert (ens.table(probs)["count"] == 1).all()
    ens.target_mix = "train"
    plain, _ = ens.probabilities(images)
    assert np.allclose(plain, calibration.apply_temperature(mean, 1.5), atol=1e-6)
    # the ensemble's own config wins; an old member without a training mix: no correction, and none can be set
    own = counters.Ensemble([a, b], {**config, "train_mix": UNIFORM, "target_mix": "natural"})
    assert own.train_mix == UNIFORM and own.target_mix == "natural"
    old = counters.Ensemble([a, counters.load(tiny_model.model_uri)], config)
    assert old.train_mix is None and old.target_mix == "train"
    with pytest.raises(ValueError, match="logged without its training mix"):
        old.target_mix = EXTREME


# -- where it is set: train, evaluate, the CLI ----------------------------------------------------------------------

def test_train_keeps_its_training_mix_and_target_in_the_model_config(tmp_path):
    from bincounter import counters
    from bincounter.manifest import read_manifest
    from bincounter.runs import download, load_split
    from steps import options, train

    split = make_split_run(tmp_path, n=50, size=32)
    classes, train_df, val_df = load_split(split)
    args = train.get_args_parser().parse_args(
        ["--split_run_id", split, "--weights=none", "--arch=resnet18", "--image_size=32", "--epochs=1",
         "--max_steps=1", "--batch_size=16", "--target_mix=natural"])
    run_id = train.fit_and_log(args, options.train_config(vars(args), classes), train_df, val_df)
    config = counters.load(f"runs:/{run_id}/model").config
    counts = read_manifest(download(split, "splits/train.csv", tmp_path / "t"))["count"]
    assert config["train_mix"] == pytest.approx([float(np.mean(counts == c)) for c in classes])
    assert config["target_mix"] == "natural"
    assert mlflow.get_run(run_id).data.params["train_mix"] == priors.format_mix(classes, config["train_mix"])


def test_train_refuses_a_mix_before_training(capsys):
    from steps import options, train

    parse = lambda *a: train.get_args_parser().parse_args(["--split_run_id", "x", *a])  # noqa: E731
    with pytest.raises(SystemExit):
        parse("--target_mix=1:0.5,2:0.6")
    assert "--target_mix: the shares in '1:0.5,2:0.6' sum to 1.1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="does not count 0; its counts are 1, 2, 3, 4, 5"):
        options.train_config(vars(parse("--target_mix=0:0.2,1:0.2,2:0.2,3:0.2,4:0.2", "--weights=none")), CLASSES)
    with pytest.raises(ValueError, match="natural is ABID's mix of counts 1-5, but the model also counts 0"):
        options.train_config(vars(parse("--target_mix=natural", "--weights=none")), [0, 1, 2])
    assert parse().target_mix == "train"  # the default: answers as trained


def test_predict_takes_a_target_mix_and_refuses_a_bad_one_before_the_model_loads(tiny_model, tmp_path, capsys):
    from bincounter import cli

    uri = log_with_mix(tiny_model, UNIFORM)
    out = tmp_path / "p.csv"
    assert cli.main(["predict", str(tiny_model.images), "--model", uri, "--target_mix", EXTREME,
                     "--output", str(out)]) == 0
    import pandas as pd
    assert (pd.read_csv(out)["count"] == 1).all()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # the URI would not load: the mix is refused first
        cli.main(["predict", str(tiny_model.images), "--model", "runs:/nope/model", "--target_mix", "1:2"])
    assert e.value.code == 2 and "--target_mix: the shares in '1:2' sum to 2" in capsys.readouterr().err
    # counts the model does not know: refused once it has loaded, naming its counts
    assert cli.main(["predict", str(tiny_model.images), "--model", uri, "--target_mix", "1:0.5,9:0.5"]) == 1
    assert "its counts are 1, 2, 3, 4, 5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["predict", str(tiny_model.images), "--endpoint", "e", "--target_mix", "natural"])
    assert "--target_mix applies to a local --model" in capsys.readouterr().err


def test_reconcile_checks_records_under_the_target_mix(tiny_model, tmp_path, capsys):
    import pandas as pd

    from bincounter import cli

    uri = log_with_mix(tiny_model, UNIFORM)
    ids = sorted(p.stem for p in tiny_model.images.glob("*.jpg"))
    expected = tmp_path / "expected.csv"
    pd.DataFrame({"image_id": ids, "expected_quantity": [1] * len(ids)}).to_csv(expected, index=False)
    p_expected = {}
    for mix in ("train", EXTREME):
        out = tmp_path / f"{len(p_expected)}.csv"
        assert cli.main(["reconcile", "--images", str(tiny_model.images), "--expected", str(expected), "--model",
                         uri, "--target_mix", mix, "--output", str(out)]) == 0
        p_expected[mix] = pd.read_csv(out).set_index("image_id")["p_expected"]
    # a warehouse of single items makes a record of one item far more likely
    assert (p_expected[EXTREME] > p_expected["train"]).all()
