"""The synthetic bin generator: determinism, shapes of the outputs, balance, argument checks."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from PIL import Image

from bincounter import synthetic
from bincounter.synthetic import contact_sheet, draw_bin, item_seed, synthetic_items


def test_draw_bin_is_deterministic():
    assert draw_bin(3, 7).tobytes() == draw_bin(3, 7).tobytes()
    assert draw_bin(3, 7, size=96).tobytes() == draw_bin(3, 7, size=96).tobytes()


def test_draw_bin_differs_with_seed_and_count():
    a = draw_bin(3, 7).tobytes()
    assert draw_bin(3, 8).tobytes() != a
    assert draw_bin(4, 7).tobytes() != a


@pytest.mark.parametrize("size", [32, 64, 255, 256])
def test_draw_bin_size_and_mode(size):
    im = draw_bin(2, 1, size=size)
    assert isinstance(im, Image.Image)
    assert im.mode == "RGB"
    assert im.size == (size, size)


def test_default_size_is_256():
    assert draw_bin(1, 0).size == (256, 256)


def test_draw_bin_looks_like_a_yellowish_bin():
    # An empty bin is mostly fabric: red and green clearly above blue on average.
    r, g, b = np.asarray(draw_bin(0, 3), np.float32).reshape(-1, 3).mean(axis=0)
    assert r > b + 30 and g > b + 20


@pytest.mark.parametrize("count", [0, 1, 10, 25, 60])
def test_any_count_draws(count):
    assert draw_bin(count, 11, size=128).size == (128, 128)


@pytest.mark.parametrize("count", [1, 5, 12, 30])
def test_items_stay_mostly_visible(count):
    # The placement invariant behind "the count is knowable from the picture": no item's bounding box
    # covers more than _MAX_PAIR_OVERLAP of another's, and each item is at most _MAX_COVERED covered.
    for seed in range(5):
        rng = np.random.default_rng(seed)
        items = synthetic._layout(rng, count, (10, 12, 240, 220), 256)
        assert len(items) == count
        boxes = [(p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max()) for _, _, p in items]
        covered = np.zeros(count)
        for j in range(count):
            for i in range(j):
                a, b = boxes[i], boxes[j]
                inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
                area_a = (a[2] - a[0]) * (a[3] - a[1])
                area_b = (b[2] - b[0]) * (b[3] - b[1])
                assert inter <= synthetic._MAX_PAIR_OVERLAP * min(area_a, area_b) + 1e-6
                covered[i] += inter / area_a
        assert covered.max() <= synthetic._MAX_COVERED + 1e-6
        # Every item lies inside the interior.
        assert all(10 <= b[0] and 12 <= b[1] and b[2] <= 240 and b[3] <= 220 for b in boxes)


@pytest.mark.parametrize("kwargs, message", [
    (dict(count=-1, seed=0), "count must be >= 0"),
    (dict(count=1, seed=0, size=31), "size must be >= 32"),
    (dict(count=1, seed=-5), "seed must be >= 0"),
])
def test_draw_bin_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        draw_bin(**kwargs)


def test_synthetic_items_ids_and_balance():
    items = synthetic_items(23, 1, 5, seed=4)
    assert [iid for iid, _ in items] == [f"syn4-{i:06d}" for i in range(23)]
    hist = Counter(c for _, c in items)
    assert set(hist) == {1, 2, 3, 4, 5}
    assert max(hist.values()) - min(hist.values()) <= 1
    assert sum(hist.values()) == 23


def test_synthetic_items_is_deterministic_and_shuffled_by_seed():
    assert synthetic_items(50, 0, 9, seed=1) == synthetic_items(50, 0, 9, seed=1)
    a = [c for _, c in synthetic_items(50, 0, 9, seed=1)]
    b = [c for _, c in synthetic_items(50, 0, 9, seed=2)]
    assert a != b and sorted(a) == sorted(b)


def test_synthetic_items_edge_cases():
    assert synthetic_items(0, 1, 5, seed=0) == []
    assert {c for _, c in synthetic_items(7, 3, 3, seed=0)} == {3}


@pytest.mark.parametrize("args, message", [
    ((-1, 1, 5, 0), "num_images must be >= 0"),
    ((10, 5, 1, 0), "0 <= count_min <= count_max"),
    ((10, -1, 5, 0), "0 <= count_min <= count_max"),
    ((10, 1, 5, -3), "seed must be >= 0"),
])
def test_synthetic_items_rejects_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        synthetic_items(*args)


def test_item_seed():
    assert item_seed(1, 2) == item_seed(1, 2)
    seeds = {item_seed(s, i) for s in range(3) for i in range(200)}
    assert len(seeds) == 600  # distinct across indexes and across sets
    assert all(isinstance(x, int) and 0 <= x < 2**63 for x in seeds)
    with pytest.raises(ValueError, match="seed >= 0 and index >= 0"):
        item_seed(-1, 0)


def test_contact_sheet_size():
    ims = [draw_bin(c, c, size=64) for c in range(10)]
    sheet = contact_sheet(ims, [f"count {c}" for c in range(10)], cols=4, thumb=50)
    assert sheet.mode == "RGB"
    assert sheet.size == (4 * 50, 3 * (50 + 16))
    # Fewer images than columns: the sheet is only as wide as the images.
    assert contact_sheet(ims[:3], ["a", "b", "c"]).size == (3 * 128, 128 + 16)


def test_contact_sheet_accepts_other_sizes_and_modes():
    ims = [Image.new("L", (300, 100), 128), Image.new("RGB", (20, 40), (255, 0, 0))]
    assert contact_sheet(ims, ["wide", "small"], cols=8, thumb=64).size == (128, 80)


def test_contact_sheet_rejects_bad_arguments():
    with pytest.raises(ValueError, match="one caption per image"):
        contact_sheet([draw_bin(1, 1, size=32)], [])
    with pytest.raises(ValueError, match="cols >= 1"):
        contact_sheet([draw_bin(1, 1, size=32)], ["x"], cols=0)


def test_contact_sheet_of_nothing_is_one_blank_cell():
    assert contact_sheet([], [], thumb=64).size == (64, 64 + 16)
