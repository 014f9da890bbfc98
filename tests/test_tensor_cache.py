"""The decoded-once tensor cache and batch augmentation: the same tensors as the PIL path (TrainPreset), and a
cache that is never trusted when it is torn, corrupt, made from other images or half-written."""
from __future__ import annotations

import builtins
import errno
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers_data import make_manifest
from torch.utils.data import Dataset
from torchvision.transforms import v2 as T

from bincounter import tensor_cache
from bincounter.data import make_loader
from bincounter.model import IMAGENET_MEAN as MEAN, IMAGENET_STD as STD
from bincounter.tensor_cache import CacheError, DeviceAugment, TrainBatches, open_cache
from bincounter.transforms import TrainPreset, geometry, read_image

SIZE = 48  # the images are drawn at 64 px: the cache resizes and crops


@pytest.fixture
def manifest(tmp_path):
    return make_manifest(tmp_path / "img", n=12, size=64)


def pil_geometry(df) -> torch.Tensor:
    """What TrainPreset holds after its deterministic steps, through PIL, as uint8 [N, 3, SIZE, SIZE]."""
    prepare = T.Compose([*geometry(SIZE), T.PILToTensor()])
    return torch.stack([prepare(read_image(p)) for p in df["path"]])


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix not in (".lock",))


def test_the_cache_holds_the_presets_geometry_and_is_built_once(manifest, tmp_path):
    first = open_cache(manifest, SIZE, tmp_path / "tc")
    assert first.built and first.reason == "no cache yet" and first.array.shape == (12, 3, SIZE, SIZE)
    assert torch.equal(first.batch(range(12)), pil_geometry(manifest))
    again = open_cache(manifest, SIZE, tmp_path / "tc")
    assert not again.built and again.path == first.path
    assert leftovers(tmp_path / "tc") == [first.path.with_suffix(".json").name, first.path.name]


@pytest.mark.parametrize("augment", ["light", "strong"])
def test_a_seeded_batch_gets_the_tensors_of_the_pil_path(manifest, tmp_path, augment):
    """Preprocessing defined once: TrainPreset on PIL images one at a time and DeviceAugment on the cached batch
    draw the same parameters and give the same tensors, up to uint8 rounding (PIL rounds after each colour step)."""
    cache = open_cache(manifest, SIZE, tmp_path / "tc")
    aug = DeviceAugment(SIZE, augment, MEAN, STD)
    torch.manual_seed(5)
    old = torch.stack([TrainPreset(SIZE, augment, MEAN, STD)(read_image(p)) for p in manifest["path"]])
    torch.manual_seed(5)
    new = aug.apply(cache.batch(range(12)), aug.draw(12))
    assert new.shape == old.shape and new.dtype == torch.float32
    diff = (old - new).abs()
    # normalised units: one uint8 step is about 0.017
    assert diff.mean() < 0.05 and diff.max() < 0.5 and (diff > 0.1).float().mean() < 0.02, diff.mean()
    torch.manual_seed(6)  # another draw is far away: the comparison above can fail
    other = aug.apply(cache.batch(range(12)), aug.draw(12))
    assert (old - other).abs().mean() > 10 * diff.mean()


class _Index(Dataset):
    def __len__(self):
        return 12

    def __getitem__(self, i):
        return i


def test_batches_come_in_the_data_loaders_order_and_replay_by_seed(manifest, tmp_path):
    cache = open_cache(manifest, SIZE, tmp_path / "tc")
    batches = TrainBatches(cache, manifest["count"], [1, 2, 3, 4, 5], 5, seed=3, device=torch.device("cpu"), mean=MEAN, std=STD)
    assert batches.batches == [b.tolist() for b in make_loader(_Index(), 5, 0, shuffle=True, seed=3)]
    first = list(batches)
    assert len(first) == len(batches) == 3 and [len(y) for _, y in first] == [5, 5, 2]
    assert first[0][1].tolist() == [[1, 2, 3, 4, 5].index(manifest["count"][i]) for i in batches.batches[0]]
    replay = list(TrainBatches(cache, manifest["count"], [1, 2, 3, 4, 5], 5, seed=3, device=torch.device("cpu"), mean=MEAN, std=STD))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, replay))
    it = iter(batches)  # leaving an epoch early (max_steps) stops the background thread
    next(it)
    it.close()
    assert not [t for t in threading.enumerate() if t.name == "bincounter-batches"]


def test_a_bad_image_in_the_cache_build_names_it_and_leaves_nothing(manifest, tmp_path):
    Path(manifest["path"][4]).write_bytes(b"no longer a jpeg")
    with pytest.raises(ValueError, match="img00004.jpg: not an image"):
        open_cache(manifest, SIZE, tmp_path / "tc")
    assert leftovers(tmp_path / "tc") == []


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "no record", "garbled record"])
def test_a_torn_or_corrupt_cache_is_rebuilt_not_trusted(manifest, tmp_path, damage):
    good = open_cache(manifest, SIZE, tmp_path / "tc")
    expected = good.batch(range(12)).clone()
    path, record = good.path, good.path.with_suffix(".json")
    del good
    if damage == "truncated":
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)
    elif damage == "flipped byte":
        with open(path, "r+b") as f:
            f.seek(path.stat().st_size - 100)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0xFF]))
    elif damage == "no record":
        record.unlink()
    else:
        record.write_text('{"key": ')
    again = open_cache(manifest, SIZE, tmp_path / "tc")
    assert again.built, damage
    assert {"truncated": "truncated or corrupt", "flipped byte": "truncated or corrupt",
            "no record": "record is missing", "garbled record": "record is missing"}[damage] in again.reason
    assert torch.equal(again.batch(range(12)), expected)


def test_a_cache_of_other_images_is_never_used(manifest, tmp_path):
    mine = open_cache(manifest, SIZE, tmp_path / "tc")
    others = make_manifest(tmp_path / "other", n=12, size=64, seed=1)  # same ids and counts, other pictures
    theirs = open_cache(others, SIZE, tmp_path / "tc")
    assert theirs.built and theirs.path != mine.path
    assert torch.equal(theirs.batch(range(12)), pil_geometry(others))
    assert open_cache(manifest, SIZE + 8, tmp_path / "tc").built  # another size: another cache
    # the files of one set of images put where the other's belong: their record gives them away
    theirs.path.write_bytes(mine.path.read_bytes())
    theirs.path.with_suffix(".json").write_bytes(mine.path.with_suffix(".json").read_bytes())
    again = open_cache(others, SIZE, tmp_path / "tc")
    assert again.built and "other images" in again.reason
    assert torch.equal(again.batch(range(12)), pil_geometry(others))


def test_two_builders_at_once_make_one_whole_file(manifest, tmp_path, monkeypatch):
    slow_read = tensor_cache.read_image

    def read_slowly(path):  # keeps the first build going while the second arrives
        time.sleep(0.05)
        return slow_read(path)

    monkeypatch.setattr(tensor_cache, "read_image", read_slowly)
    results, errors = [], []

    def build():
        try:
            results.append(open_cache(manifest, SIZE, tmp_path / "tc", threads=1))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(r.built for r in results) == [False, True]  # the second waited, then used the first's file
    assert torch.equal(results[0].batch(range(12)), results[1].batch(range(12)))
    assert torch.equal(results[0].batch(range(12)), pil_geometry(manifest))
    assert len(leftovers(tmp_path / "tc")) == 2  # the cache and its record, no temporary files


def test_a_full_disk_is_a_clear_error_and_leaves_nothing_to_trust(manifest, tmp_path, monkeypatch):
    folder = tmp_path / "tc"
    # not enough room, known before decoding
    monkeypatch.setattr(tensor_cache.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(CacheError, match=r"needs 0\.\d+ GB, only 0\.00 GB free"):
        open_cache(manifest, SIZE, folder)
    assert leftovers(folder) == []
    monkeypatch.undo()

    # the disk fills while writing: the temporary file goes, no cache and no record remain
    real_open = builtins.open

    class FillsUp:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 10_000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    def fake_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return FillsUp(f) if "w" in mode and str(path).endswith(".tmp") else f

    monkeypatch.setattr(tensor_cache, "open", fake_open, raising=False)
    with pytest.raises(CacheError, match="the disk is full .*nothing was kept"):
        open_cache(manifest, SIZE, folder)
    assert leftovers(folder) == []
    monkeypatch.undo()
    assert open_cache(manifest, SIZE, folder).built  # with room again, it builds


def test_device_augment_draws_its_strengths_from_the_augments_table(monkeypatch):
    from bincounter import transforms
    none = dict(degrees=0, shift=0, zoom=0, jitter=0, hue=0, grey=0.0, trivial=False)
    monkeypatch.setitem(transforms.AUGMENTS, "none", none)
    aug = DeviceAugment(SIZE, "none", MEAN, STD)
    x = torch.randint(0, 256, (3, 3, SIZE, SIZE), dtype=torch.uint8)
    torch.manual_seed(0)
    params = aug.draw(3)
    flipped = [p[1] is not None for p in params]
    want = x.float() / 255
    want = torch.stack([w.flip(-1) if f else w for w, f in zip(want, flipped)])
    assert torch.allclose(aug.apply(x, params), T.Normalize(list(MEAN), list(STD))(want), atol=1e-5)
