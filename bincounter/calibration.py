"""How far to trust a count: temperature scaling fitted on validation, the figures that say how honest the
probabilities are, and the review thresholds an operator acts on.

The temperature acts on the model's output distribution, p ∝ p_model^(1/T). For one forward that is the same as
dividing the logits by T; it is also well defined for test-time augmentation and ensembles, whose outputs are
averages of distributions. T > 1 softens an overconfident model, T < 1 sharpens a timid one.

Two thresholds are chosen on validation and travel in the model's config:
- `review_confidence`: a count whose confidence is below it gets `review=True`. Chosen as the lowest confidence
  at which the counts kept (not flagged) are right at least `target_accuracy` of the time on validation, flagging
  at most `max_review` of the counts there: where the target needs more, the least confident `max_review` are
  flagged, and the promise says how often the others were right (a flag on every count tells nobody anything).
- `check_threshold`: the inventory check flags a record when the model gives its quantity a probability below
  it. Chosen so that `target_catch` of the wrong records that are off by two or more are flagged on validation.
The inventory check seen as a detector: every bin and every count c is a record "this bin holds c", right when c
is the true count and wrong otherwise; p(c) is its score.

Prior correction: a model learns the mix of counts it was trained on (`train_mix`), which need not be the mix of
the bins it counts (a skewed source, a warehouse of its own). With a `target_mix`, the calibrated probabilities
are divided by the training mix, multiplied by the target mix and renormalised (`prior_weights`, `apply_prior`):
p(c) ∝ p_calibrated(c) · target(c) / train(c). `train` is no correction.
"""
from __future__ import annotations

import argparse
import math
import warnings
from dataclasses import asdict, dataclass, field

import mlflow
import numpy as np

from bincounter import abid
from bincounter.model import decide
from bincounter.runs import fraction, str2bool

MIN_IMAGES = 30  # fewer validation images than this: no temperature is fitted (one scalar, but a noisy one)
MIN_KEPT = 10  # the review threshold keeps at least this many validation counts (the top few are pure noise)
ECE_BINS = 10
TARGET_ACCURACY = 0.8  # review: the counts not flagged are right this often (train's target_accuracy) ...
MAX_REVIEW = 0.3  # ... flagging at most this share of them (train's max_review; 1: as many as the target needs)
TARGET_CATCH = 0.9  # the check flags this share of the records off by FAR_OFF or more (train's target_catch)
DEFAULT_CHECK_THRESHOLD = 0.2  # what reconcile used before thresholds were fitted (models logged before)
FAR_OFF = 2  # records off by at least this many items: the ones the check must catch
TRAIN_MIX = "train"  # target_mix: no prior correction (what models logged before train_mix get)
NATURAL = "natural"  # target_mix: ABID's natural mix of counts 1-5 (abid.NATURAL_MIX)
MIX_TOLERANCE = 1e-3  # explicit target shares must sum to one within this
MIX_EXAMPLE = "1:0.12,2:0.22,3:0.26,4:0.23,5:0.17"


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities [N, C] -> the same sharpened or softened by `temperature` (rows of NaN stay NaN)."""
    p = np.asarray(probs, dtype=np.float64)
    if temperature == 1.0:
        return p
    logp = np.log(np.clip(p, 1e-12, 1.0)) / temperature
    logp -= np.where(np.isnan(logp), -np.inf, logp).max(1, keepdims=True)  # NaN rows (bad images) stay NaN
    e = np.exp(logp)
    return e / e.sum(1, keepdims=True)


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


def mix_option(spec: str) -> str:
    """argparse type of the target_mix options: the text, checked by parse_mix (empty passes: the model's own)."""
    if str(spec).strip() == "":
        return ""
    try:
        parse_mix(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("target_mix: ")) from None
    return str(spec).strip()


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


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes (indices `y`)."""
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0))))


def fit_temperature(probs: np.ndarray, y: np.ndarray) -> tuple[float, str | None]:
    """Validation probabilities [N, C] and true class indices -> (temperature minimising the NLL, None), or
    (1.0, why not) when the data cannot support a fit: fewer than MIN_IMAGES images, one class only, or a
    result that is not a finite positive number."""
    y = np.asarray(y)
    if len(y) < MIN_IMAGES:
        return 1.0, f"only {len(y)} validation images (fewer than {MIN_IMAGES}): temperature 1 kept"
    if len(np.unique(y)) < 2:
        return 1.0, "the validation split holds one count only: temperature 1 kept"
    logp = np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0))

    def loss(beta: float) -> float:  # NLL as a function of 1/T: convex, so a golden-section search finds it
        z = logp * beta
        z -= z.max(1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]))

    lo, hi = math.log(0.02), math.log(50.0)  # search log(1/T): T between 0.02 and 50
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = loss(math.exp(a)), loss(math.exp(b))
    for _ in range(80):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = loss(math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = loss(math.exp(b))
    t = 1.0 / math.exp((lo + hi) / 2)
    return checked_temperature(t)


def checked_temperature(t: float) -> tuple[float, str | None]:
    """A fitted temperature -> (it, None), or (1.0, why) with a warning when it is not finite and positive."""
    if not (math.isfinite(t) and t > 0):
        why = f"the fitted temperature {t!r} is not a finite positive number: temperature 1 kept"
        warnings.warn(why)
        return 1.0, why
    return t, None


def ece(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error of the most likely count: |accuracy - confidence| per equal-width confidence
    bin (`reliability`), weighted by the bin's share of images."""
    return float(sum(r["n"] * abs(r["accuracy"] - r["confidence"]) for r in reliability(probs, y, bins)) / len(y))


def brier(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean squared distance between the distribution and the true count's one-hot vector (0 best, 2 worst)."""
    onehot = np.eye(probs.shape[1])[y]
    return float(np.mean(((probs - onehot) ** 2).sum(1)))


def reliability(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Per confidence bin with images: {lo, hi, n, confidence, accuracy} of the most likely count."""
    conf, right = probs.max(1), probs.argmax(1) == y
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    return [{"lo": edges[b], "hi": edges[b + 1], "n": int((which == b).sum()),
             "confidence": float(conf[which == b].mean()), "accuracy": float(right[which == b].mean())}
            for b in range(bins) if (which == b).any()]


def coverage_curve(confidence: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Counts sorted by confidence, most confident first -> (coverage k/N, accuracy of the k most confident)
    for k = 1..N. Ties keep their input order (a stable sort), so the curve is repeatable."""
    order = np.argsort(-np.asarray(confidence), kind="stable")
    hits = np.cumsum(np.asarray(right, dtype=float)[order])
    k = np.arange(1, len(order) + 1)
    return k / len(order), hits / k


def selective_accuracy(confidence: np.ndarray, right: np.ndarray, fraction: float) -> float:
    """Accuracy of the `fraction` most confident counts."""
    cov, acc = coverage_curve(confidence, right)
    k = max(1, int(round(fraction * len(cov))))
    return float(acc[k - 1])


def records(probs: np.ndarray, y: np.ndarray, classes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Every (bin, count) record -> (p of the record's count [N*C], how many items the record is off by [N*C])."""
    c = np.asarray(classes)
    off = np.abs(c[None, :] - c[np.asarray(y)][:, None])
    return probs.reshape(-1), off.reshape(-1)


def auc(score_pos: np.ndarray, score_neg: np.ndarray) -> float:
    """P(a positive scores above a negative), ties half (the Mann-Whitney statistic); NaN without both."""
    if len(score_pos) == 0 or len(score_neg) == 0:
        return float("nan")
    s = np.concatenate([score_pos, score_neg])
    order = s.argsort(kind="stable")
    ranks = np.empty(len(s))
    ranks[order] = np.arange(1, len(s) + 1)
    for v in np.unique(s):  # average ranks of ties
        m = s == v
        if m.sum() > 1:
            ranks[m] = ranks[m].mean()
    r = ranks[: len(score_pos)].sum()
    return float((r - len(score_pos) * (len(score_pos) + 1) / 2) / (len(score_pos) * len(score_neg)))


def check_figures(probs: np.ndarray, y: np.ndarray, classes: list[int], threshold: float) -> dict[str, float]:
    """The inventory check as a detector of wrong records (p(record) low = suspicious): AUC over all wrong
    records and over those off by FAR_OFF or more; at `threshold`, the share of wrong / far-off records
    flagged (catch) and of right records flagged (false alarm)."""
    p, off = records(probs, y, classes)
    right, wrong, far = p[off == 0], p[off > 0], p[off >= FAR_OFF]
    return {"check_auc": auc(-wrong, -right), "check_auc_off2": auc(-far, -right),
            "check_catch": float(np.mean(wrong < threshold)) if len(wrong) else float("nan"),
            "check_catch_off2": float(np.mean(far < threshold)) if len(far) else float("nan"),
            "check_false_alarm": float(np.mean(right < threshold))}


def false_alarm_at_catch(probs: np.ndarray, y: np.ndarray, classes: list[int], target: float = TARGET_CATCH) -> float:
    """The share of right records flagged when the check's threshold is chosen on these same bins to flag `target`
    of the far-off records (choose_check_threshold, check_figures): what the check costs at a fixed catch, whatever
    threshold the model carries (one fitted on another mix of bins may sit anywhere on these)."""
    return check_figures(probs, y, classes, choose_check_threshold(probs, y, classes, target))["check_false_alarm"]


def table_arrays(rows, classes: list[int]):
    """A predictions table (count, predicted, confidence, review, p_<c>; rows whose count is a class) ->
    (probs [N, C], true class indices, right, confidence, review) as numpy arrays."""
    probs = rows[[f"p_{c}" for c in classes]].to_numpy(dtype=float)
    y = rows["count"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    right = (rows["predicted"] == rows["count"]).to_numpy(dtype=bool)
    return probs, y, right, rows["confidence"].to_numpy(dtype=float), rows["review"].to_numpy(dtype=bool)


def trust_metrics(probs, y, right, confidence, review, classes: list[int], threshold: float) -> dict[str, float]:
    """How far scored bins' probabilities can be trusted: ece, nll, brier, the accuracy of the 25 % / 50 % most
    confident counts, the inventory check as a detector at `threshold` (check_figures) and at a threshold that
    catches TARGET_CATCH of the far-off records here (`check_false_alarm_at_catch_90`), the share flagged for
    review and the accuracy of the others."""
    return {"ece": ece(probs, y), "nll": nll(probs, y), "brier": brier(probs, y),
            "selective_accuracy_25": selective_accuracy(confidence, right, 0.25),
            "selective_accuracy_50": selective_accuracy(confidence, right, 0.50),
            **check_figures(probs, y, classes, threshold),
            f"check_false_alarm_at_catch_{round(100 * TARGET_CATCH)}": false_alarm_at_catch(probs, y, classes),
            "review_rate": float(review.mean()),
            "unflagged_accuracy": float(right[~review].mean()) if (~review).any() else float("nan")}


def choose_review_confidence(confidence: np.ndarray, right: np.ndarray, target: float,
                             max_share: float = 1.0) -> float:
    """The lowest confidence threshold at which the counts at or above it (at least MIN_KEPT of them, and all but
    at most `max_share` of the counts) are right at least `target` of the time. When none reaches it: the
    threshold that flags the least confident `max_share` (fewer where confidences tie); with `max_share` 1, above
    every confidence (all counts to review)."""
    order = np.argsort(-confidence, kind="stable")
    conf = confidence[order]
    n = len(conf)
    acc = np.cumsum(right[order]) / np.arange(1, n + 1)
    fewest = max(MIN_KEPT, math.ceil((1 - max_share) * n - 1e-9))  # the fewest counts a threshold may keep
    for k in range(n, fewest - 1, -1):  # the most counts kept first
        if acc[k - 1] >= target and (k == n or conf[k] < conf[k - 1]):  # never split tied confidences
            return float(conf[k - 1])
    if max_share < 1 and fewest <= n:
        k = fewest
        while k < n and conf[k] == conf[k - 1]:  # a tie at the cut: flag fewer
            k += 1
        return float(conf[k - 1]) if k < n else 0.0
    return float(np.nextafter(conf.max(), np.inf)) if n else 1.0


def choose_check_threshold(probs: np.ndarray, y: np.ndarray, classes: list[int], target: float) -> float:
    """The lowest threshold that flags at least `target` of the far-off wrong records (all wrong records when
    the classes allow no far-off one): p(record) < threshold flags it."""
    p, off = records(probs, y, classes)
    wrong = np.sort(p[off >= FAR_OFF] if (off >= FAR_OFF).any() else p[off > 0])
    k = max(1, math.ceil(target * len(wrong)))
    return float(min(1.0, np.nextafter(wrong[k - 1], np.inf)))


@dataclass
class Trust:
    """What a model says about its own figures: the temperature, the two thresholds, and what they did on the
    validation split (its `promise`). `note`: why the defaults were kept, when they were."""
    temperature: float = 1.0
    review_confidence: float = 0.0  # 0: no count is flagged for review (models logged before these existed)
    check_threshold: float = DEFAULT_CHECK_THRESHOLD
    promise: dict = field(default_factory=dict)
    note: str | None = None

    def config(self) -> dict:
        """The model config's keys."""
        return {k: v for k, v in asdict(self).items() if k != "note"}

    @classmethod
    def from_config(cls, config: dict) -> "Trust":
        """A logged model's config -> its Trust (defaults for models logged before calibration)."""
        return cls(**{k: config[k] for k in ("temperature", "review_confidence", "check_threshold", "promise")
                      if k in config})


def fit(probs: np.ndarray, y: np.ndarray, classes: list[int], decision: str = "argmax", calibrate: bool = True,
        target_accuracy: float = TARGET_ACCURACY, target_catch: float = TARGET_CATCH,
        max_review: float = MAX_REVIEW) -> Trust:
    """Validation probabilities [N, C] (uncalibrated), true class indices, the model's decision rule
    (bincounter.model.decide) -> Trust: the temperature (1 unless `calibrate` and the data allow
    a fit), then both thresholds chosen on the calibrated probabilities, and what they promise there."""
    probs, y = np.asarray(probs, dtype=np.float64), np.asarray(y)
    t, note = fit_temperature(probs, y) if calibrate else (1.0, "calibrate=false: temperature 1")
    cal = apply_temperature(probs, t)
    if len(y) < MIN_IMAGES:  # a threshold chosen on a handful of bins promises nothing
        return Trust(temperature=t, note=f"{note}; review and check thresholds left at their defaults")
    best = decide(probs, decision)  # the model's own answer: the temperature changes its confidence only
    confidence, right = cal[np.arange(len(y)), best], best == y
    review = choose_review_confidence(confidence, right, target_accuracy, max_review)
    check = choose_check_threshold(cal, y, classes, target_catch)
    kept = confidence >= review
    promise = {"measured_on": f"validation split ({len(y)} bins)", "target_accuracy": target_accuracy,
               "max_review": max_review, "target_catch": target_catch, "review_rate": float(1 - kept.mean()),
               "kept_accuracy": float(right[kept].mean()) if kept.any() else float("nan"),
               **check_figures(cal, y, classes, check)}
    return Trust(temperature=t, review_confidence=review, check_threshold=check, promise=promise, note=note)


def add_options(p: argparse.ArgumentParser) -> None:
    """The options of whatever fits a Trust (train, the ensemble step)."""
    g = p.add_argument_group("how far to trust the model (fitted on the validation split)")
    g.add_argument("--calibrate", type=str2bool, default=True,
                   help="fit a temperature on the validation split so that probabilities mean what they say "
                        "(too few validation bins: temperature 1, tagged)")
    g.add_argument("--target_accuracy", type=fraction, default=TARGET_ACCURACY,
                   help="review flag: chosen on validation so that the counts not flagged are right this often ...")
    g.add_argument("--max_review", type=fraction, default=MAX_REVIEW,
                   help="... flagging at most this share of the counts (where the target needs more, the least "
                        "confident this share are flagged and the promise says what the rest are worth); 1: no cap")
    g.add_argument("--target_catch", type=fraction, default=TARGET_CATCH,
                   help="inventory check threshold: chosen on validation to flag this share of the records off by two "
                        "or more")


def fit_and_log(probs: np.ndarray, y: np.ndarray, classes: list[int], decision: str, args: argparse.Namespace) -> Trust:
    """`fit` with the step's options (add_options), logged into the active run: metric `temperature`, `val_ece`
    and `val_nll` before (`_raw`) and after calibration, the thresholds and what they promise (`trust_*`), a tag
    `bincounter.calibration` when defaults were kept, and the validation reliability diagram. -> the Trust."""
    from bincounter import metrics  # here, not at the top: it sets matplotlib's backend, which serving's users keep

    trust = fit(probs, y, classes, decision, args.calibrate, args.target_accuracy, args.target_catch,
                args.max_review)
    cal = apply_temperature(probs, trust.temperature)
    mlflow.log_metrics({"temperature": trust.temperature, "review_confidence": trust.review_confidence,
                        "check_threshold": trust.check_threshold,
                        "val_ece_raw": ece(probs, y), "val_ece": ece(cal, y),
                        "val_nll_raw": nll(probs, y), "val_nll": nll(cal, y),
                        **{f"trust_{k}": v for k, v in trust.promise.items() if isinstance(v, float)}})
    metrics.log_figure(metrics.plot_reliability(reliability(probs, y), reliability(cal, y), "validation"),
                      "reliability_val.png")
    if trust.note:
        mlflow.set_tag("bincounter.calibration", trust.note)
        print(f"calibration: {trust.note}")
    print(f"calibration: temperature {trust.temperature:.3f}; {describe_review(trust)} "
          f"{describe_check(trust, trust.check_threshold)}")
    return trust


def describe_check(trust: Trust, threshold: float, target_mix: str = TRAIN_MIX) -> str:
    """What the inventory check's threshold promises, in words an operator reads (the validation figures hold
    only at the model's own threshold, and at the training mix of counts)."""
    first = f"A record is flagged when the model gives its quantity a probability below {threshold:.3g}."
    if not trust.promise or threshold != trust.check_threshold:
        return first
    p = trust.promise
    return (f"{first} Measured on the model's {p['measured_on']}: of records off by two or more, "
            f"{_share(p['check_catch_off2'])} are flagged; of all wrong records, {_share(p['check_catch'])}; "
            f"and {_share(p['check_false_alarm'])} of right records are flagged too.{_mix_caveat(target_mix)}")


def describe_review(trust: Trust, target_mix: str = TRAIN_MIX) -> str:
    """What the `review` column promises, in words, from the validation figures."""
    p = trust.promise
    if not p:
        return "This model carries no review threshold: no count is flagged for review."
    if p["review_rate"] >= 1:
        return (f"No confidence level reached {p['target_accuracy']:.0%} right counts on the model's "
                f"{p['measured_on']}: every count is flagged for review.")
    short = (f", short of the {p['target_accuracy']:.0%} target: flagging more than "
             f"{p['max_review']:.0%} was not allowed (max_review)"
             if p["kept_accuracy"] < p["target_accuracy"] and "max_review" in p else "")
    return (f"Counts with confidence below {trust.review_confidence:.3g} are flagged for review "
            f"({_share(p['review_rate'])} of the {p['measured_on']}); the others were right "
            f"{p['kept_accuracy']:.0%} of the time there{short}.{_mix_caveat(target_mix)}")


def _mix_caveat(target_mix: str) -> str:
    """The validation figures were measured at the training mix of counts: say so when answers are moved to
    another (the figures shift with the mix)."""
    if not target_mix or parse_mix(target_mix) == TRAIN_MIX:
        return ""
    return (f" (Measured at the training mix of counts; these answers are moved to target_mix={target_mix}, "
            f"where the figures differ.)")


def _share(x: float) -> str:
    """0.27 -> 'about 27 %' (NaN -> 'an unknown share of')."""
    return "an unknown share" if not math.isfinite(x) else f"about {x:.0%}"
