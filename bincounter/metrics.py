"""Counting metrics and the plots people would rather see than read."""
from __future__ import annotations

from collections.abc import Callable

import matplotlib

matplotlib.use("Agg")  # no screen here or on servers
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from bincounter.manifest import metric_key  # the one rule for a name in a metric name

RESAMPLES = 500  # bootstrap resamples for a standard error (as bench/few_real.py's tables)
PREFIX_CHARS = 100  # longest metric prefix kept from a source's name (MLflow's names end at 250 characters)


def count_metrics(y_true, y_pred) -> dict[str, float]:
    """True and predicted counts -> accuracy, rmse, mae, within1_accuracy (|pred - true| <= 1)."""
    t, p = np.asarray(y_true, dtype=float), np.asarray(y_pred, dtype=float)
    if len(t) == 0:
        raise ValueError("no predictions to score")
    err = p - t
    return {
        "accuracy": float(np.mean(err == 0)),
        "rmse": float(np.sqrt(np.mean(err ** 2))),
        "mae": float(np.mean(np.abs(err))),
        "within1_accuracy": float(np.mean(np.abs(err) <= 1)),
    }


def bootstrap_se(figures: Callable[[np.ndarray], dict[str, float]], n: int, resamples: int = RESAMPLES,
                 seed: int = 0) -> dict[str, float]:
    """The bootstrap standard error of each figure: `figures(idx)` computes them on the rows `idx` of n rows;
    `resamples` draws of n rows with replacement (seeded) -> {figure: standard deviation over the draws} (NaN
    draws left out). The procedure of bench/few_real.py's trust tables."""
    rng = np.random.default_rng(seed)
    boots = [figures(rng.integers(0, n, n)) for _ in range(resamples)]
    return {k: float(np.nanstd([b[k] for b in boots])) for k in boots[0]}


def metric_prefixes(names) -> dict[str, str]:
    """Group names (e.g. the manifest's sources) -> MLflow-legal metric prefixes, one per distinct name: letters,
    digits, `_` and `-` kept, every other run of characters `_` (no `/`, `.` or space: MLflow groups a metric by
    what comes before its first `/`, and refuses names like `../x`), at most PREFIX_CHARS; an empty result is
    `unknown`; two names that come out the same get `_2`, `_3`, ... in sorted order."""
    out: dict[str, str] = {}
    taken: set[str] = set()
    for name in sorted({str(n) for n in names}):
        base = metric_key(name)[:PREFIX_CHARS]
        prefix, k = base, 1
        while prefix in taken:
            k += 1
            prefix = f"{base}_{k}"
        out[name] = prefix
        taken.add(prefix)
    return out


def majority_baseline(train_counts, y_true) -> tuple[int, dict[str, float]]:
    """Always answer the most common training count -> (that count, its metrics on y_true)."""
    values, freq = np.unique(np.asarray(train_counts), return_counts=True)
    majority = int(values[np.argmax(freq)])
    return majority, count_metrics(y_true, np.full(len(y_true), majority))


def confusion(y_true, y_pred, classes: list[int]) -> np.ndarray:
    """Rows: true count, columns: predicted count (predictions outside `classes` are dropped)."""
    index = {c: i for i, c in enumerate(classes)}
    m = np.zeros((len(classes), len(classes)), dtype=int)
    for t, p in zip(y_true, y_pred):
        if t in index and p in index:
            m[index[t], index[p]] += 1
    return m


def per_class_table(y_true, y_pred, classes: list[int]) -> pd.DataFrame:
    """Precision, recall, F1 and support per count."""
    m = confusion(y_true, y_pred, classes)
    tp = np.diag(m).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.nan_to_num(tp / m.sum(0))
        recall = np.nan_to_num(tp / m.sum(1))
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    return pd.DataFrame({"count": classes, "precision": precision, "recall": recall, "f1": f1,
                         "support": m.sum(1)})


def plot_confusion(m: np.ndarray, classes: list[int], title: str = "Confusion matrix"):
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(m, cmap="Blues")
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, str(m[i, j]), ha="center", va="center",
                    color="white" if m[i, j] > m.max() / 2 else "black", fontsize=8)
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted count")
    ax.set_ylabel("true count")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_curves(history: list[dict]):
    """history: one dict per epoch with train_/val_ loss and accuracy -> a two-panel learning-curve figure."""
    h = pd.DataFrame(history)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, metric in zip(axes, ["loss", "accuracy"]):
        for split in ["train", "val"]:
            if f"{split}_{metric}" in h:
                ax.plot(h["epoch"], h[f"{split}_{metric}"], marker="o", label=split)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.legend()
    fig.tight_layout()
    return fig


def plot_histogram(counts_by_split: dict[str, pd.Series], title: str = "Images per count"):
    """{split: Series of counts} -> grouped bar chart."""
    table = pd.DataFrame({k: v.value_counts() for k, v in counts_by_split.items()}).fillna(0).sort_index()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    table.plot.bar(ax=ax)
    ax.set_xlabel("count")
    ax.set_ylabel("images")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_samples(paths: list[str], captions: list[str], colors: list[str], cols: int = 6, title: str = ""):
    """A grid of images with a coloured caption under each (green right, red wrong). Images are read with the
    one decoder (transforms.read_image) and its limits; one that fails shows its reason in its cell."""
    import textwrap

    from bincounter.transforms import ImageError, read_image

    rows = max(1, -(-len(paths) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2 * cols, 2.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, path, cap, col in zip(axes.flat, paths, captions, colors):
        try:
            img = read_image(path)
            img.thumbnail((160, 160))
            ax.imshow(img)
        except ImageError as e:
            ax.text(0.5, 0.5, textwrap.fill(str(e), 32), ha="center", va="center", fontsize=6, transform=ax.transAxes,
                    clip_on=True)  # clipped to its cell: a long path must not push the layout about
        ax.set_title(cap, fontsize=8, color=col)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_reliability(raw: list[dict], calibrated: list[dict] | None = None, title: str = "test"):
    """Reliability diagram: per confidence bin (calibration.reliability rows), the accuracy of the most likely
    count against its mean confidence, before and after calibration, the marker's area the bin's share of images;
    the diagonal is a perfectly honest model."""
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="honest")
    for rows, label, marker in ((raw, "raw", "o"), (calibrated, "calibrated", "s")):
        if rows:  # marker area: the bin's share of images (a bin of one image says little)
            n = sum(r["n"] for r in rows)
            line, = ax.plot([r["confidence"] for r in rows], [r["accuracy"] for r in rows], label=label)
            ax.scatter([r["confidence"] for r in rows], [r["accuracy"] for r in rows], marker=marker,
                       s=[8 + 300 * r["n"] / n for r in rows], color=line.get_color())
    ax.legend()
    return _unit_square(fig, ax, "confidence of the most likely count", "share right", f"Reliability ({title})")


def plot_coverage(coverage, accuracy, review_coverage: float | None = None, title: str = "test"):
    """Accuracy of the k most confident counts against the share k/N they cover; a dotted line marks the share
    the model's review threshold keeps."""
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    ax.plot(coverage, accuracy)
    if review_coverage is not None:
        ax.axvline(review_coverage, color="grey", linestyle=":", label="not flagged for review")
        ax.legend()
    return _unit_square(fig, ax, "share of bins counted (most confident first)", "accuracy",
                        f"Coverage and accuracy ({title})")


def _unit_square(fig, ax, xlabel: str, ylabel: str, title: str):
    """Both axes 0..1 (shares and probabilities), labelled -> the laid-out figure."""
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def log_figure(fig, artifact_file: str) -> None:
    """Log `fig` into the active run and close it (pyplot keeps every open figure: a long process would pile
    them up)."""
    import mlflow

    mlflow.log_figure(fig, artifact_file)
    plt.close(fig)
