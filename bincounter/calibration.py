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

Prior correction (moving answers to another mix of counts, after the temperature) is bincounter.priors.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field

import mlflow
import numpy as np

from bincounter.model import decide
from bincounter.priors import TRAIN_MIX, parse_mix

MIN_IMAGES = 30  # fewer validation images than this: no temperature is fitted (one scalar, but a noisy one)
MIN_KEPT = 10  # the review threshold keeps at least this many validation counts (the top few are pure noise)
ECE_BINS = 10
TARGET_ACCURACY = 0.8  # review: the counts not flagged are right this often (train's target_accuracy) ...
MAX_REVIEW = 0.3  # ... flagging at most this share of them (train's max_review; 1: as many as the target needs)
TARGET_CATCH = 0.9  # the check flags this share of the records off by FAR_OFF or more (train's target_catch)
DEFAULT_CHECK_THRESHOLD = 0.2  # what reconcile used before thresholds were fitted (models logged before)
FAR_OFF = 2  # records off by at least this many items: the ones the check must catch


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities [N, C] -> the same sharpened or softened by `temperature` (rows of NaN stay NaN)."""
    p = np.asarray(probs, dtype=np.float64)
    if temperature == 1.0:
        return p
    logp = np.log(np.clip(p, 1e-12, 1.0)) / temperature
    logp -= np.where(np.isnan(logp), -np.inf, logp).max(1, keepdims=True)  # NaN rows (bad images) stay NaN
    e = np.exp(logp)
    return e / e.sum(1, keepdims=True)



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


@dataclass(frozen=True)
class TrustTargets:
    """What the fitted thresholds aim at (the train and ensemble steps' options): fit a temperature or not, the
    accuracy of the counts not flagged for review, the most that may be flagged, and the share of far-off records
    the inventory check must catch."""
    calibrate: bool = True
    target_accuracy: float = TARGET_ACCURACY
    max_review: float = MAX_REVIEW
    target_catch: float = TARGET_CATCH


def fit_and_log(probs: np.ndarray, y: np.ndarray, classes: list[int], decision: str,
                targets: TrustTargets = TrustTargets()) -> Trust:
    """`fit` aiming at `targets`, logged into the active run: metric `temperature`, `val_ece` and `val_nll`
    before (`_raw`) and after calibration, the thresholds and what they promise (`trust_*`), a tag
    `bincounter.calibration` when defaults were kept, and the validation reliability diagram. -> the Trust."""
    from bincounter import metrics  # here, not at the top: it sets matplotlib's backend, which serving's users keep

    trust = fit(probs, y, classes, decision, targets.calibrate, targets.target_accuracy, targets.target_catch,
                targets.max_review)
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
