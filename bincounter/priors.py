"""Prior correction: a model learns the mix of counts it was trained on (`train_mix`), which need not be the mix
of the bins it counts (a skewed source, a warehouse of its own). With a `target_mix`, the calibrated probabilities
are divided by the training mix, multiplied by the target mix and renormalised (`prior_weights`, `apply_prior`):
p(c) ∝ p_calibrated(c) · target(c) / train(c). `train` is no correction.

A target_mix is `train`, `natural` (ABID's mix of counts 1-5, abid.NATURAL_MIX) or explicit shares of every count
like `1:0.12,2:0.22,3:0.26,4:0.23,5:0.17`.
"""
from __future__ import annotations

import math

import numpy as np

from bincounter import abid

TRAIN_MIX = "train"  # target_mix: no prior correction (what models logged before train_mix get)
NATURAL = "natural"  # target_mix: ABID's natural mix of counts 1-5 (abid.NATURAL_MIX)
MIX_TOLERANCE = 1e-3  # explicit target shares must sum to one within this
MIX_EXAMPLE = "1:0.12,2:0.22,3:0.26,4:0.23,5:0.17"


def parse_mix(spec: str) -> str | dict[int, float]:
    """A target_mix as given -> `train`, `natural` or {count: share}. What can be checked without a model: the
    form `count:share,...`, each count once, shares positive and finite, summing to one (MIX_TOLERANCE).
    Raises ValueError naming target_mix, what is wrong and the valid forms."""
    text = str(spec).strip()
    if text in (TRAIN_MIX, NATURAL):
        return text
    valid = f"expected {TRAIN_MIX}, {NATURAL} or shares of every count like {MIX_EXAMPLE}"
    mix: dict[int, float] = {}
    for part in text.split(","):
        count, _, share = part.partition(":")
        try:
            c, v = int(count), float(share)
        except ValueError:
            raise ValueError(f"target_mix: {valid}; got {spec!r} ({part.strip()!r} is not count:share)") from None
        if c in mix:
            raise ValueError(f"target_mix: count {c} is given twice in {spec!r}")
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"target_mix: the share of count {c} is {share.strip()}; shares must be positive "
                             f"(a share of 0 would rule the count out whatever the photo shows: give a small one)")
        mix[c] = v
    total = sum(mix.values())
    if abs(total - 1) > MIX_TOLERANCE:
        raise ValueError(f"target_mix: the shares in {spec!r} sum to {total:.4g}, not 1 (tolerance {MIX_TOLERANCE})")
    return mix


def resolve_mix(spec: str, classes: list[int]) -> np.ndarray | None:
    """A target_mix and the model's counts -> the target shares in the classes' order, or None for `train` (no
    correction). `natural`: abid.NATURAL_MIX over the model's counts, renormalised; refused when the model knows
    counts outside 1-5 (give shares then). Explicit shares must name every count the model knows and no other."""
    mix = parse_mix(spec)
    known = ", ".join(map(str, classes))
    if mix == TRAIN_MIX:
        return None
    if mix == NATURAL:
        outside = [c for c in classes if c not in abid.NATURAL_MIX]
        if outside:
            raise ValueError(f"target_mix: {NATURAL} is ABID's mix of counts {min(abid.NATURAL_MIX)}-"
                             f"{max(abid.NATURAL_MIX)}, but the model also counts {', '.join(map(str, outside))}; "
                             f"give shares of its counts ({known}) like {MIX_EXAMPLE}, or {TRAIN_MIX}")
        shares = np.array([abid.NATURAL_MIX[c] for c in classes])
        return shares / shares.sum()
    unknown = sorted(set(mix) - set(classes))
    if unknown:
        raise ValueError(f"target_mix: the model does not count {', '.join(map(str, unknown))}; "
                         f"its counts are {known}")
    missing = [c for c in classes if c not in mix]
    if missing:
        raise ValueError(f"target_mix: no share for count {', '.join(map(str, missing))}; give a share for every "
                         f"count the model knows ({known})")
    return np.array([mix[c] for c in classes], dtype=np.float64)


def train_mix(counts, classes: list[int], balanced: bool = False) -> list[float]:
    """The mix of counts a model learned from, in the classes' order: the shares of the training bins' counts, or
    equal shares of the counts present when training drew every count equally often (`balanced`)."""
    counts = np.asarray(counts)
    n = np.array([np.sum(counts == c) for c in classes], dtype=np.float64)
    if balanced:
        n = (n > 0).astype(np.float64)
    if n.sum() == 0:
        raise ValueError(f"train_mix: no training bin has one of the counts {classes}")
    return [float(x) for x in n / n.sum()]


def prior_weights(train: list[float] | None, spec: str, classes: list[int]) -> np.ndarray | None:
    """target(c) / train(c) per class for `apply_prior`, or None: no correction (target_mix `train`). Refuses a
    target other than `train` for a model without its training mix (logged before train_mix existed) or one
    that saw no training bin of some count (its probabilities hold nothing to re-weight there)."""
    target = resolve_mix(spec, classes)
    if target is None:
        return None
    if train is None:
        raise ValueError(f"target_mix: this model was logged without its training mix (train_mix), so its "
                         f"probabilities cannot be moved to another mix; use target_mix={TRAIN_MIX}")
    train = np.asarray(train, dtype=np.float64)
    if train.shape != target.shape:
        raise ValueError(f"train_mix: {len(train)} shares for the model's {len(classes)} counts")
    if (train <= 0).any():
        unseen = [c for c, t in zip(classes, train) if t <= 0]
        raise ValueError(f"target_mix: the model saw no training bin of count {', '.join(map(str, unseen))}, so "
                         f"its probabilities cannot be moved to another mix; use target_mix={TRAIN_MIX}")
    return target / train


def apply_prior(probs: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """Probabilities [N, C] -> p · weights, renormalised per row (rows of NaN stay NaN); None: unchanged."""
    if weights is None:
        return probs
    p = np.asarray(probs, dtype=np.float64) * np.asarray(weights, dtype=np.float64)[None, :]
    return p / p.sum(1, keepdims=True)


def format_mix(classes: list[int], shares) -> str:
    """Counts and their shares -> `1:0.117,2:0.219,...` (the form target_mix takes)."""
    return ",".join(f"{c}:{s:.3g}" for c, s in zip(classes, shares))


def describe_mix(spec: str, classes: list[int]) -> str:
    """A target_mix for the logs: `train`, `natural (1:0.117,2:0.219,...)` (the shares as applied), or the shares."""
    target = resolve_mix(spec, classes)
    if target is None:
        return TRAIN_MIX
    return f"{spec} ({format_mix(classes, target)})" if spec == NATURAL else spec

