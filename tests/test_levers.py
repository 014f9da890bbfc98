"""The levers for few training images: each a train parameter that does what it says (bench/few_real.py says
whether it helps)."""
import math

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import last_run, run_entry
from helpers_data import make_split_run
from test_train import TINY

from bincounter.model import IMAGENET_MEAN, IMAGENET_STD, build_model, probabilities
from bincounter.levers import CountLoss, balanced_sampler, lr_factor
from bincounter.transforms import TrainPreset

CLASSES = [1, 2, 3, 4, 5]


def test_ordinal_weight_makes_a_far_miss_cost_more_than_a_near_one():
    y = torch.tensor([0])  # true count 1
    near = torch.tensor([[2.0, 4.0, 0.0, 0.0, 0.0]])  # mass on count 2
    far = torch.tensor([[2.0, 0.0, 0.0, 0.0, 4.0]])  # the same mass on count 5: equal cross-entropy
    plain, ordinal = CountLoss(CLASSES), CountLoss(CLASSES, ordinal_weight=1.0)
    assert plain(near, y) == pytest.approx(plain(far, y).item())
    assert ordinal(far, y) > ordinal(near, y) > plain(near, y)
    p = near.softmax(1)[0]
    expected = float(p @ torch.tensor(CLASSES, dtype=torch.float32))
    assert ordinal(near, y) - plain(near, y) == pytest.approx((expected - 1) ** 2, rel=1e-5)


def test_label_smoothing_penalises_overconfidence():
    y = torch.tensor([2])
    confident = torch.tensor([[0.0, 0.0, 20.0, 0.0, 0.0]])
    assert CountLoss(CLASSES)(confident, y) < 1e-6
    assert CountLoss(CLASSES, label_smoothing=0.1)(confident, y) > 0.5


def test_balanced_sampler_draws_every_count_about_equally_and_repeats_by_seed():
    labels = [0] * 900 + [1] * 100
    draws = list(balanced_sampler(labels, seed=7))
    assert len(draws) == len(labels)
    share_rare = np.mean([labels[i] == 1 for i in draws])
    assert 0.45 < share_rare < 0.55  # shuffling would give 0.10
    assert list(balanced_sampler(labels, seed=7)) == draws
    assert list(balanced_sampler(labels, seed=8)) != draws


def test_warmup_rises_linearly_then_decays_like_torch_cosine():
    assert [lr_factor(e, 10, 3) for e in range(3)] == pytest.approx([0.25, 0.5, 0.75])
    assert lr_factor(3, 10, 3) == 1.0
    decay = [lr_factor(e, 10, 3) for e in range(3, 10)]
    assert decay == sorted(decay, reverse=True) and decay[-1] > 0
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    torch_lrs = []
    for _ in range(10):
        torch_lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        cosine.step()
    assert [lr_factor(e, 10, 0) for e in range(10)] == pytest.approx(torch_lrs)


def test_strong_augmentation_draws_wider_and_unknown_names_are_refused():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 96, 3), dtype=np.uint8))
    spread = {}
    for name in ("light", "strong"):
        t = TrainPreset(48, name, IMAGENET_MEAN, IMAGENET_STD)
        torch.manual_seed(0)
        outs = torch.stack([t(img) for _ in range(16)])
        assert outs.shape == (16, 3, 48, 48)
        spread[name] = outs.std(0).mean().item()
    assert spread["strong"] > spread["light"]
    with pytest.raises(ValueError, match="augment must be one of"):
        TrainPreset(48, "wild", IMAGENET_MEAN, IMAGENET_STD)


def test_tta_averages_the_image_and_its_mirror():
    torch.manual_seed(0)
    model = build_model("resnet18", 5).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        both = probabilities(model, x, tta=True)
        assert torch.allclose(both, probabilities(model, torch.flip(x, dims=[3]), tta=True), atol=1e-6)
        plain = probabilities(model, x)
        assert not torch.allclose(both, plain, atol=1e-4)
        assert torch.allclose(both.sum(1), torch.ones(3), atol=1e-5)


@pytest.mark.parametrize("override", [["--augment", "wild"], ["--decision", "mean"]])
def test_unknown_lever_choices_are_refused_by_the_parser(capsys, override):
    """(Bad lever numbers: test_train's bad-parameter test.)"""
    from steps import train

    with pytest.raises(SystemExit):
        train.get_args_parser().parse_args(["--split_run_id", "x", *override])
    err = capsys.readouterr().err
    assert "invalid choice" in err and override[0].lstrip("-") in err and repr(override[1]) in err


def test_levers_through_mlflow_run_reach_the_model_and_evaluate(tmp_path):
    split = make_split_run(tmp_path, n=40, size=48)
    levers = dict(ordinal_weight=0.5, label_smoothing=0.1, balanced="true", augment="strong", warmup_epochs=1,
                  tta="true", decision="median")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    run_entry("train", dict(split_run_id=split, **{**TINY, "epochs": 3}, **levers), env_extra={"TMPDIR": str(tmp)})
    train = last_run("train")
    assert train.info.status == "FINISHED"
    assert not list(tmp.glob("bincounter-ckpt-*"))  # checkpoint copies are removed, not left to fill the disk
    lrs = [m.value for m in sorted(mlflow.MlflowClient().get_metric_history(train.info.run_id, "lr"),
                                   key=lambda m: m.step)]
    assert lrs == pytest.approx([0.0005, 0.001, 0.5 * 0.001 * (1 + math.cos(math.pi / 2))])
    counter = mlflow.pyfunc.load_model(f"runs:/{train.info.run_id}/model").unwrap_python_model().counter
    assert counter.tta is True and counter.decision == "median"  # serving as validated
    results = {}
    for tta in ("true", "false"):
        run_entry("evaluate", dict(model_uri=f"runs:/{train.info.run_id}/model", split_run_id=split, tta=tta))
        ev = last_run("evaluate")
        assert ev.data.params["tta"] == tta
        results[tta] = mlflow.artifacts.load_text(f"runs:/{ev.info.run_id}/predictions.csv")
    assert results["true"] != results["false"]  # the override reaches the predictions


def test_median_decision_answers_the_middle_of_an_unsure_distribution():
    from bincounter.model import decide

    probs = np.array([[0.40, 0.05, 0.10, 0.05, 0.40],  # unsure between the ends: argmax 1, median 3
                      [0.10, 0.60, 0.10, 0.10, 0.10],  # sure: both 2
                      [0.05, 0.05, 0.10, 0.30, 0.50],  # cumulative 0.2, 0.5 at count 4
                      [np.nan] * 5])  # an unreadable image
    assert decide(probs, "argmax").tolist() == [0, 1, 4, 0]
    assert decide(probs, "median").tolist() == [2, 1, 3, 0]
    with pytest.raises(ValueError, match="decision must be one of"):
        decide(probs, "mean")


def test_few_real_bench_yardstick_and_table_on_generated_bins(tmp_path):
    """bench/few_real.py's hand-made-features yardstick runs on a split run and its table shows every row."""
    import sys

    from conftest import ROOT
    sys.path.insert(0, str(ROOT / "bench"))
    import few_real

    split = make_split_run(tmp_path, n=60, size=48)
    probe = few_real.feature_probe(split)
    for way in ("argmax", "median"):
        assert 0 <= probe[way]["accuracy"] <= 1 and probe[way]["rmse"] >= 0
    ways = {w: {"accuracy": 0.5, "rmse": 1.0, "mae": 0.5, "within1_accuracy": 0.9} for w in few_real.WAYS}
    trained = {"config": "levers", "train_run_id": "abc", "epochs_run": 3, "best_epoch": 2, "minutes": 1.0,
               "baseline": ways["argmax"], **ways}
    text = few_real.table([trained, {**probe, "minutes": 0.1}])
    assert "| majority baseline |" in text and "| levers | 3 (2) |" in text
    assert f"| {probe['config']} | - | {probe['argmax']['accuracy']:.3f}" in text


@pytest.mark.parametrize("arch, blocks, trained, kept", [
    ("resnet18", 1, ["layer4."], ["conv1.", "bn1.", "layer1.", "layer2.", "layer3."]),
    ("efficientnet_lite0", 2, ["blocks.5.", "blocks.6.", "conv_head.", "bn2."],
     ["conv_stem.", "bn1.", "blocks.0.", "blocks.3.", "blocks.4."]),
])
def test_trainable_blocks_train_only_the_last_blocks_and_the_head(tmp_path, arch, blocks, trained, kept):
    """Frozen blocks keep their weights and BatchNorm statistics; the last `trainable_blocks` and the head move."""
    from helpers_data import make_manifest

    from bincounter.manifest import stratified_split
    from bincounter.train_config import TrainConfig
    from bincounter.training import train_run

    weights = "imagenet"
    if arch.startswith("resnet"):  # no ImageNet download here: a state-dict file is pretrained weights too
        weights = str(tmp_path / "start.pt")
        torch.save(build_model(arch, 1000).state_dict(), weights)
    start = build_model(arch, 5, weights).state_dict()
    parts = stratified_split(make_manifest(tmp_path / "img", n=20, size=40), (0.6, 0.2, 0.2), seed=0)
    cfg = TrainConfig(arch=arch, weights=weights, image_size=32, epochs=1, max_steps=2, batch_size=4, lr=0.01,
                      trainable_blocks=blocks)
    with mlflow.start_run():
        end = train_run(cfg, parts["train"], parts["val"], checkpoint=False)["model"].state_dict()
    moved = {k for k in start if not torch.equal(start[k], end[k])}
    head = "fc." if arch.startswith("resnet") else "classifier."
    for prefix in trained + [head]:
        assert any(k.startswith(prefix) for k in moved), f"{prefix} did not train"
    for prefix in kept:  # weights and running statistics alike
        keys = [k for k in start if k.startswith(prefix)]
        assert keys and not any(k in moved for k in keys), f"{prefix} moved: {sorted(set(keys) & moved)[:3]}"


@pytest.mark.parametrize("arch, most", [("resnet50", 4), ("efficientnet_lite1", 7)])
def test_trainable_blocks_out_of_range_lists_the_valid_range(arch, most):
    from bincounter.train_config import TrainConfig

    TrainConfig(arch=arch, trainable_blocks=most).validate()
    with pytest.raises(ValueError, match=rf"trainable_blocks must be in 0\.\.{most} for {arch}"):
        TrainConfig(arch=arch, trainable_blocks=most + 1).validate()
    with pytest.raises(ValueError, match="trainable_blocks must be in"):
        TrainConfig(arch=arch, trainable_blocks=-1).validate()
    with pytest.raises(ValueError, match="need pretrained weights"):
        TrainConfig(arch=arch, weights="none", trainable_blocks=1).validate()


DDP_SCRIPT = '''
import os, sys, pathlib, torch, mlflow
sys.path[:0] = [{root!r}, {tests!r}]
from helpers_data import make_manifest
from bincounter.manifest import stratified_split
from bincounter.train_config import TrainConfig
from bincounter.training import train_run
rank = int(os.environ["RANK"])
parts = stratified_split(make_manifest(pathlib.Path({tmp!r}) / f"img{{rank}}", n=40, size=72), (0.6, 0.2, 0.2), seed=0)
cfg = TrainConfig(arch="resnet18", weights={weights!r}, image_size=64, epochs=2, max_steps=2, batch_size=4,
                  trainable_blocks=1)
mlflow.set_tracking_uri({uri!r})
if rank == 0:
    mlflow.start_run()
print("rank", rank, "best epoch", train_run(cfg, parts["train"], parts["val"], checkpoint=False)["best_epoch"])
'''


@pytest.mark.slow
def test_trainable_blocks_under_distributed_data_parallel(tmp_path):
    """Slow (two torchrun processes, about a minute): DDP syncs the parameters that take gradients when it is
    made, so the frozen blocks must be frozen by then (without it: 'Expected to have finished reduction')."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    weights = tmp_path / "start.pt"
    torch.save(build_model("resnet18", 1000).state_dict(), weights)
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"), tmp=str(tmp_path),
                                        weights=str(weights), uri=f"sqlite:///{tmp_path}/mlflow.db"))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "rank 0 best epoch" in p.stdout and "rank 1 best epoch" in p.stdout


def _steps(n: int, size: int = 16):
    """n batches of 4 random images and class indices, the same for the same n."""
    g = torch.Generator().manual_seed(n)
    return [(torch.rand(4, 3, size, size, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(n)]


def _tiny_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(4, 5))


def test_ema_keeps_the_moving_average_of_every_step_and_batchnorm_statistics():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from bincounter.training import train_one_epoch

    net, decay = _tiny_net(), 0.6
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    seen = []  # the weights and statistics after each step
    opt.register_step_post_hook(lambda *_: seen.append({k: v.detach().clone() for k, v in net.state_dict().items()}))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train_one_epoch(net, _steps(3), CountLoss(CLASSES), opt, scaler, torch.device("cpu"), ema=ema)
    assert len(seen) == 3
    for key in ("0.weight", "4.bias", "1.running_mean"):
        # the first step is copied as it is (n_averaged 0), then e = decay * e + (1 - decay) * w; the batch
        # statistics move in the forward pass, before the step, so the post-step copy holds them too
        want = seen[0][key].float()
        for s in seen[1:]:
            want = decay * want + (1 - decay) * s[key].float()
        assert torch.allclose(ema.module.state_dict()[key].float(), want, atol=1e-6), key
        assert not torch.allclose(want, seen[-1][key].float()), f"{key}: the average is not the last step"


def test_ema_model_is_what_training_validates_and_keeps(tmp_path):
    from helpers_data import make_manifest

    from bincounter.manifest import stratified_split
    from bincounter.train_config import TrainConfig
    from bincounter.training import train_run

    parts = stratified_split(make_manifest(tmp_path / "img", n=20, size=40), (0.6, 0.2, 0.2), seed=0)
    kept = {}
    for ema in (0.0, 0.9):
        cfg = TrainConfig(arch="resnet18", weights="none", image_size=32, epochs=1, max_steps=3, batch_size=4,
                          lr=0.05, ema=ema)
        with mlflow.start_run():
            kept[ema] = train_run(cfg, parts["train"], parts["val"], checkpoint=False)["model"].state_dict()
    # the same three steps from the same start (seed 42, as train_run seeds): their average stays nearer the start
    raw, avg = kept[0.0]["fc.weight"], kept[0.9]["fc.weight"]
    torch.manual_seed(42)
    first = build_model("resnet18", 5, "none").state_dict()["fc.weight"]
    assert not torch.allclose(raw, avg)
    assert (avg - first).norm() < (raw - first).norm()


def test_mixup_blends_pairs_by_a_seeded_weight_and_scores_both_labels():
    from bincounter.levers import mix
    from bincounter.training import train_one_epoch

    x = torch.arange(4 * 3 * 2 * 2, dtype=torch.float32).reshape(4, 3, 2, 2)
    mixed, perm, lam = mix(x, 0.4, torch.Generator().manual_seed(3))
    assert 0 <= lam <= 1 and sorted(perm.tolist()) == [0, 1, 2, 3]
    assert torch.allclose(mixed, lam * x + (1 - lam) * x[perm])
    again = mix(x, 0.4, torch.Generator().manual_seed(3))
    assert again[2] == lam and torch.equal(again[1], perm)
    assert mix(x, 0.4, torch.Generator().manual_seed(4))[2] != lam

    # the loss of a mixed batch is lam x loss(own labels) + (1 - lam) x loss(the partners' labels)
    batches = _steps(1)
    g = torch.Generator().manual_seed(5)
    want_x, want_perm, want_lam = mix(batches[0][0], 0.4, g)
    net = _tiny_net()
    with torch.no_grad():
        out = net.eval()(want_x)
    ce = CountLoss(CLASSES)
    want = want_lam * ce(out, batches[0][1]) + (1 - want_lam) * ce(out, batches[0][1][want_perm])
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    got = train_one_epoch(net.eval(), batches, ce, opt, torch.amp.GradScaler("cpu", enabled=False),
                          torch.device("cpu"), mixup=0.4, generator=torch.Generator().manual_seed(5))
    assert got["loss"] == pytest.approx(want.item(), rel=1e-5)


def test_trivial_augment_replaces_the_colour_jitter_and_stays_off_the_tensor_cache():
    from torchvision.transforms import v2 as T

    from bincounter.train_config import TrainConfig
    from bincounter.transforms import augmentations

    kinds = [type(t) for t in augmentations("trivial")]
    assert T.TrivialAugmentWide in kinds and T.ColorJitter not in kinds and T.RandomHorizontalFlip in kinds
    assert T.TrivialAugmentWide not in [type(t) for t in augmentations("light")]
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    torch.manual_seed(0)
    views = [TrainPreset(32, "trivial", IMAGENET_MEAN, IMAGENET_STD)(img) for _ in range(4)]
    assert all(v.shape == (3, 32, 32) for v in views) and not torch.equal(views[0], views[1])
    TrainConfig(augment="trivial").validate()
    with pytest.raises(ValueError, match="augment=trivial has no batch kernel for the tensor cache"):
        TrainConfig(augment="trivial", data_path="tensor").validate()


def test_progressive_resizing_rises_to_the_full_size_by_the_middle_epoch_and_trains_at_it():
    from bincounter.levers import epoch_size
    from bincounter.train_config import TrainConfig
    from bincounter.training import train_one_epoch

    cfg = TrainConfig(image_size=224, epochs=8, start_size=160)
    assert [epoch_size(cfg, e) for e in range(1, 9)] == [160, 176, 192, 208, 224, 224, 224, 224]
    assert [epoch_size(TrainConfig(image_size=224, epochs=8), e) for e in (1, 8)] == [224, 224]
    assert epoch_size(TrainConfig(image_size=224, epochs=1, start_size=96), 1) == 96
    net, sizes = _tiny_net(), []
    net.register_forward_pre_hook(lambda m, a: sizes.append(tuple(a[0].shape[-2:])))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    train_one_epoch(net, _steps(2, size=16), CountLoss(CLASSES), opt, torch.amp.GradScaler("cpu", enabled=False),
                    torch.device("cpu"), size=8)
    assert sizes == [(8, 8), (8, 8)]


def test_bench_train_times_each_epoch_size_of_progressive_resizing():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import train as bench_train

    args = bench_train.get_args_parser().parse_args(
        ["--arch", "resnet18", "--image_size", "64", "--batch_size", "2", "--steps", "1", "--repeats", "1",
         "--levers", "0", "--no_compile", "--start_size", "32", "--epochs", "4"])
    rows = {r["lever"]: r for r in bench_train.levers(args, torch.device("cpu"))["rows"]}
    assert {"at 32 px", "at 48 px", "start_size=32 (4 epochs)"} <= set(rows)  # epochs at 32, 48, 64, 64
    rates = [rows[k]["img_s"] for k in ("at 32 px", "at 48 px", "train's step (channels_last)")]
    # the schedule's rate is the epochs' harmonic mean: within the slowest and the fastest epoch's
    assert min(rates) <= rows["start_size=32 (4 epochs)"]["img_s"] <= max(rates)
