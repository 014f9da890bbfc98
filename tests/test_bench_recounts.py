"""bench/recounts.py's parts that decide its table: the wrong records it plants, and the paired figures."""
import sys

import numpy as np
import pandas as pd

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import recounts  # noqa: E402


def test_wrong_records_are_the_share_asked_each_off_by_one_or_more_within_the_counts():
    df = pd.DataFrame({"image_id": [f"b{i}" for i in range(50)], "count": [1 + i % 5 for i in range(50)]})
    expected = recounts.wrong_records(df, [1, 2, 3, 4, 5], 0.2, np.random.default_rng(0))
    wrong = [i for i, c in zip(df["image_id"], df["count"]) if expected[i] != c]
    assert len(wrong) == 10 and set(expected.values()) <= {1, 2, 3, 4, 5}
    assert recounts.wrong_records(df, [1, 2, 3, 4, 5], 0.2, np.random.default_rng(0)) == expected  # seeded


def test_figures_are_paired_against_the_control():
    rng = np.random.default_rng(0)
    control = np.vstack([rng.random(400) < 0.4, rng.integers(0, 3, 400) ** 2])
    better = control.copy()
    better[0, :40] = 1  # 40 more bins right
    f = recounts.figures(better, control, np.random.default_rng(1))
    assert f["gain"] == (better[0].mean() - control[0].mean()) > 0 and 0 < f["gain_se"] < f["accuracy_se"]
    same = recounts.figures(control, control, np.random.default_rng(1))
    assert same["gain"] == 0 and same["gain_se"] == 0 and same["rmse_change"] == 0
    assert "| 0 | 0 | none |" in recounts.table([{**same, "seed": 0, "n": 0, "choice": "none"}])
