"""What decides a training result: `TrainConfig` (every setting, its default and its validation) and the tables
of what its settings may be. The train step's options take their types and defaults from its fields."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from bincounter.model import ARCHS, DECISIONS
from bincounter.transforms import AUGMENTS, FITS

OPTIMIZERS = ("adamw", "sgd", "adam")


# The validation metrics an epoch yields and which way is better: what early stopping and the kept epoch follow
# (`monitor`) and what hpo selects on. Cross-entropy can rise while accuracy and RMSE improve (an overconfident
# model), so the default follows what users judge a counter by.
MONITORS = {"val_accuracy": "max", "val_rmse": "min", "val_mae": "min", "val_within1_accuracy": "max",
            "val_loss": "min"}
BN_MODES = ("batch", "frozen")
DATA_PATHS = ("pil", "tensor")


@dataclass
class TrainConfig:
    """Everything that decides a training result. Each field's default (and type) is the train step's option's;
    a tunable (TUNABLE) that is not given falls back to the hpo run's best, then to its default here."""
    arch: str = "resnet50"
    weights: str = "imagenet"
    image_size: int = 224
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 32
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    freeze: bool = False
    patience: int = 3
    monitor: str = "val_accuracy"  # early stopping and the kept epoch follow it (MONITORS)
    max_steps: int = 0  # train batches per epoch, 0 = all (tests and quick trials)
    workers: int = 0  # data-loading processes: on a 2-core CPU they only steal cores from the math (bench/train.py)
    data_path: str = "pil"  # pil: decode + augment per image in the loader; tensor: tensor_cache (for accelerators)
    seed: int = 42
    # levers for few training images (bench/few_real.py measures each): see CountLoss, TrainPreset, lr_factor
    ordinal_weight: float = 0.0  # weight of the squared count error beside cross-entropy; 0 = cross-entropy only
    label_smoothing: float = 0.0
    balanced: bool = False  # draw every count equally often (with replacement) instead of shuffling
    augment: str = "light"
    fit: str = "crop"  # transforms.FITS: how a photo becomes the model's square (train, evaluate and serving)
    warmup_epochs: int = 0  # linear warm-up before the cosine decay
    tta: bool = False  # predict on the image and its mirror image (validation, evaluate and serving)
    decision: str = "argmax"  # probabilities -> count (model.decide), in validation, evaluate and serving
    ema: float = 0.0  # decay per step of an exponential moving average of the weights, which is validated and
    # kept instead of the weights themselves; 0 = off
    mixup: float = 0.0  # alpha of mixup's Beta(alpha, alpha) mixing weight (pairs of images, and their losses); 0 = off
    start_size: int = 0  # progressive resizing: the first epoch trains at this size, rising to image_size by
    # the middle epoch (validation always at image_size); 0 = image_size all along
    # transfer-learning levers (pretrained weights): see set_train_mode, make_optimizer
    freeze_epochs: int = 0  # epochs of training the head alone (backbone frozen, in eval mode) before unfreezing;
    # no effect beside freeze=True (the head alone all along), so that hpo can draw both
    backbone_lr: float = 1.0  # the backbone's learning rate as a fraction of the head's (`lr`)
    bn: str = "batch"  # batch: BatchNorm learns the bins' statistics; frozen: keeps the pretrained ones
    trainable_blocks: int = 0  # train only the last N of the arch's blocks (model.Arch.blocks) and the head; 0 = all
    keep_last: bool = False  # keep the last epoch, not the best by `monitor` (a refit: its epoch count is chosen)
    classes: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])

    def validate(self) -> "TrainConfig":
        pretrained = self.weights != "none"
        blocks = len(ARCHS[self.arch].blocks) if self.arch in ARCHS else 0
        checks = [
            (self.arch in ARCHS, f"arch {self.arch!r} is not one of {', '.join(ARCHS)}"),
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (self.lr > 0 and math.isfinite(self.lr), f"lr must be a positive number, got {self.lr}"),
            (self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}"),
            (self.image_size >= 32, f"image_size must be at least 32, got {self.image_size}"),
            (self.patience >= 0, f"patience must be >= 0 (0 = no early stopping), got {self.patience}"),
            (self.monitor in MONITORS, f"monitor must be one of {', '.join(MONITORS)}, got {self.monitor!r}"),
            (self.max_steps >= 0, f"max_steps must be >= 0 (0 = no limit), got {self.max_steps}"),
            (self.workers >= 0, f"workers must be >= 0, got {self.workers}"),
            (len(self.classes) >= 2, f"need at least 2 count classes, got {self.classes}"),
            (self.ordinal_weight >= 0, f"ordinal_weight must be >= 0, got {self.ordinal_weight}"),
            (0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.augment in AUGMENTS, f"augment must be one of {tuple(AUGMENTS)}, got {self.augment!r}"),
            (self.fit in FITS, f"fit must be one of {FITS}, got {self.fit!r}"),
            (not (self.augment == "trivial" and self.data_path == "tensor"),
             "augment=trivial has no batch kernel for the tensor cache: use data_path=pil"),
            (0 <= self.ema < 1, f"ema must be in [0, 1) (a decay per step; 0 = off), got {self.ema}"),
            (self.mixup >= 0 and math.isfinite(self.mixup), f"mixup must be >= 0 (0 = off), got {self.mixup}"),
            (self.start_size == 0 or 32 <= self.start_size <= self.image_size,
             f"start_size must be 0 (off) or in 32..image_size ({self.image_size}), got {self.start_size}"),
            (self.decision in DECISIONS, f"decision must be one of {DECISIONS}, got {self.decision!r}"),
            (0 <= self.warmup_epochs < self.epochs,
             f"warmup_epochs must be >= 0 and below epochs ({self.epochs}), got {self.warmup_epochs}"),
            (0 <= self.freeze_epochs < self.epochs,
             f"freeze_epochs must be >= 0 and below epochs ({self.epochs}), got {self.freeze_epochs}"),
            (0 < self.backbone_lr <= 1 and math.isfinite(self.backbone_lr),
             f"backbone_lr must be in (0, 1] (a fraction of lr), got {self.backbone_lr}"),
            (self.bn in BN_MODES, f"bn must be one of {', '.join(BN_MODES)}, got {self.bn!r}"),
            (0 <= self.trainable_blocks <= blocks, f"trainable_blocks must be in 0..{blocks} for {self.arch} (0 = "
             f"all; 1..{blocks}: the last N of its {blocks} blocks), got {self.trainable_blocks}"),
            (self.data_path in DATA_PATHS, f"data_path must be one of {', '.join(DATA_PATHS)}, got {self.data_path!r}"),
            (pretrained or (self.freeze_epochs == 0 and self.bn == "batch" and self.trainable_blocks == 0),
             "freeze_epochs, bn=frozen and trainable_blocks need pretrained weights (a random backbone has nothing "
             "to keep); got weights=none"),
            (self.weights in ("imagenet", "none") or self.weights.startswith(("runs:/", "models:/"))
             or Path(self.weights).is_file(),
             f"weights {self.weights!r} is not imagenet, none, a model URI or an existing file"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        return self


# what hpo searches (bincounter.search_space) and the train step takes from an hpo run when not given
TUNABLE = ("lr", "batch_size", "weight_decay", "optimizer", "freeze", "freeze_epochs", "backbone_lr", "bn",
           "trainable_blocks", "ema", "mixup")

