"""What hpo searches: SEARCH_SPACE (TrainConfig's tunables and the values each may take), narrowed to what can
work for a search (`space_for`), and its translation to and from hyperopt's space and raw values."""
from __future__ import annotations

import math

from hyperopt import hp

from bincounter.train_config import TUNABLE

# The one declaration of the search space (logged as search_space.json). Keys are TrainConfig's tunables, so
# every `best_<name>` the parent logs is one that the train step reads. Batch sizes are the seed's choices.
SEARCH_SPACE = {
    "lr": {"loguniform": [1e-4, 1e-1]},
    "batch_size": {"choice": [32, 64, 128, 256, 512]},
    "weight_decay": {"loguniform": [1e-6, 1e-2]},
    "optimizer": {"choice": ["sgd", "adamw"]},  # sgd is SGD with Nesterov momentum 0.9 (levers.make_optimizer)
    "freeze": {"choice": [False, True]},  # True: train only the head
    # transfer-learning levers (space_for fixes them where there is no pretrained backbone)
    "freeze_epochs": {"choice": [0, 1]},  # head alone first (no effect beside freeze=True)
    "backbone_lr": {"choice": [0.1, 0.3, 1.0]},  # the backbone's lr as a fraction of the head's
    "bn": {"choice": ["batch", "frozen"]},
    "trainable_blocks": {"choice": [0, 2, 3]},  # 0: all; else the last N blocks (valid for every arch)
    # regularisers against memorising few bins
    "ema": {"choice": [0.0, 0.98]},  # the weights' moving average (decay per step), 0 = off
    "mixup": {"choice": [0.0, 0.2]},  # mixup's alpha, 0 = off
}
assert set(SEARCH_SPACE) == set(TUNABLE), "SEARCH_SPACE must cover exactly train_config.TUNABLE"


MIN_STEPS = 10  # training steps per epoch that a batch size must leave (space_for)


def space_for(weights: str, train_size: int | None = None, epochs: int = 1) -> dict:
    """SEARCH_SPACE narrowed to what can work: a random backbone (weights=none) is never frozen, in whole, in
    part or for a while, nor its statistics kept, trains at one rate, and not at rates above 1e-2 (from scratch they
    diverge); head-first training needs at least 2 epochs; a batch size that leaves fewer than MIN_STEPS steps
    per epoch is dropped (a few steps per epoch learn nothing in a short training), keeping the smallest."""
    space = dict(SEARCH_SPACE)
    if weights == "none":
        space.update(freeze={"choice": [False]}, freeze_epochs={"choice": [0]}, backbone_lr={"choice": [1.0]},
                     bn={"choice": ["batch"]}, trainable_blocks={"choice": [0]},
                     lr={"loguniform": [SEARCH_SPACE["lr"]["loguniform"][0], 1e-2]})
    if epochs < 2:
        space["freeze_epochs"] = {"choice": [0]}
    if train_size is not None:
        sizes = SEARCH_SPACE["batch_size"]["choice"]
        space["batch_size"] = {"choice": [b for b in sizes if b * MIN_STEPS <= train_size] or sizes[:1]}
    return space




def hyperopt_space(space: dict = SEARCH_SPACE) -> dict:
    """SEARCH_SPACE -> the hyperopt space (a dict of hp nodes)."""
    out = {}
    for name, spec in space.items():
        (kind, arg), = spec.items()
        if kind == "loguniform":
            out[name] = hp.loguniform(name, math.log(arg[0]), math.log(arg[1]))
        elif kind == "choice":
            out[name] = hp.choice(name, arg)
        else:
            raise ValueError(f"unknown kind {kind!r} for {name} in the search space")
    return out


def to_params(vals: dict, space: dict = SEARCH_SPACE) -> dict:
    """hyperopt's raw values (an index for a choice) -> plain Python values in TrainConfig's types."""
    out = {}
    for name, spec in space.items():
        (kind, arg), = spec.items()
        v = vals[name]
        out[name] = arg[int(v)] if kind == "choice" else float(v)
    return out


def to_vals(params: dict, space: dict = SEARCH_SPACE) -> dict:
    """The inverse of to_params: plain values -> hyperopt's raw values."""
    out = {}
    for name, spec in space.items():
        (kind, arg), = spec.items()
        out[name] = arg.index(params[name]) if kind == "choice" else float(params[name])
    return out
