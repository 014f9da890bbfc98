"""How each training lever acts on a training: the loss (ordinal_weight, label_smoothing), the optimizer and its
parameter groups (optimizer, backbone_lr, trainable_blocks), the learning-rate schedule (warmup_epochs), which
layers learn in an epoch (freeze, freeze_epochs, bn, trainable_blocks), balanced sampling, mixup's blends and
progressive resizing (start_size). bincounter.training calls them; bench/few_real.py measures them."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.utils.data import WeightedRandomSampler

from bincounter.model import get_arch, is_head, trains
from bincounter.train_config import TrainConfig


class CountLoss(nn.Module):
    """Cross-entropy (with label smoothing) plus `ordinal_weight` x the squared difference between the expected
    count under the predicted distribution and the true count: classes are counts, and answering 5 for a bin
    of 1 is worse than answering 2. Logits [N, C], class indices [N] -> scalar."""

    def __init__(self, classes: list[int], ordinal_weight: float = 0.0, label_smoothing: float = 0.0):
        super().__init__()
        self.ce = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.ordinal_weight = ordinal_weight
        self.register_buffer("counts", torch.tensor(classes, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = self.ce(logits, y)
        if self.ordinal_weight:
            expected = logits.float().softmax(1) @ self.counts
            loss = loss + self.ordinal_weight * ((expected - self.counts[y]) ** 2).mean()
        return loss


def lr_factor(epoch: int, epochs: int, warmup: int) -> float:
    """The learning rate's multiplier in (0-based) `epoch`: linear warm-up over `warmup` epochs, then a cosine
    decay over the rest (warmup=0: torch's CosineAnnealingLR)."""
    if epoch < warmup:
        return (epoch + 1) / (warmup + 1)
    return 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup)))


def balanced_sampler(labels: list[int], seed: int) -> WeightedRandomSampler:
    """Draws len(labels) indices with replacement, every class equally likely; the draws depend on `seed` only."""
    freq = np.bincount(labels)
    weights = torch.as_tensor(1.0 / freq[labels], dtype=torch.double)
    return WeightedRandomSampler(weights, len(labels), replacement=True,
                                 generator=torch.Generator().manual_seed(seed))


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer over two groups: the head at `lr`, the backbone at `lr` x `backbone_lr` (the head is
    group 0, whose rate the metrics log). Parameters frozen for good (`freeze`, blocks before the last
    `trainable_blocks`) are left out."""
    head, backbone = [], []
    for name, p in model.named_parameters():
        if p.requires_grad and trains(cfg.arch, name, cfg.trainable_blocks):
            (head if is_head(cfg.arch, name) else backbone).append(p)
    groups = [{"params": head, "lr": cfg.lr}, {"params": backbone, "lr": cfg.lr * cfg.backbone_lr}]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def set_train_mode(net: nn.Module, cfg: TrainConfig, epoch: int) -> None:
    """Training mode for (1-based) `epoch`: during the first `freeze_epochs` only the head learns (the backbone
    takes no gradients and stays in eval mode, so its BatchNorm statistics stay the pretrained ones);
    `bn=frozen` keeps every BatchNorm layer's statistics all along (eval mode; its scale and shift still
    learn). With `freeze` the backbone never learns (build_model froze it) and stays in eval mode.
    `trainable_blocks`: the blocks before the last N (and the stem) never learn and stay in eval mode like a
    frozen backbone; taking no gradients, they also cost no backward pass."""
    net.train()
    head_only = cfg.freeze or epoch <= cfg.freeze_epochs
    if not cfg.freeze:
        for name, p in net.named_parameters():
            p.requires_grad = is_head(cfg.arch, name) or (not head_only and trains(cfg.arch, name, cfg.trainable_blocks))
    head = get_arch(cfg.arch).head
    for name, m in net.named_modules():
        if name == head or name.startswith(head + "."):
            continue
        frozen = head_only or not trains(cfg.arch, name, cfg.trainable_blocks)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):  # timm's BatchNormAct2d too (it has children)
            if frozen or cfg.bn == "frozen":
                m.eval()
        elif frozen and not any(m.children()):  # leaves only: eval() on a parent would reach into the head
            m.eval()


def epoch_size(cfg: TrainConfig, epoch: int) -> int:
    """The training resolution of (1-based) `epoch`: `start_size` in the first epoch, rising linearly to
    `image_size` by the middle epoch and staying there (progressive resizing; a multiple of 8)."""
    if not cfg.start_size:
        return cfg.image_size
    ramp = max(cfg.epochs // 2, 1)
    size = cfg.start_size + (cfg.image_size - cfg.start_size) * min(epoch - 1, ramp) / ramp
    return min(cfg.image_size, int(round(size / 8)) * 8)


def mix(x: torch.Tensor, alpha: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixup: each image blended with another of the batch -> (mixed images, the partners' order, the weight
    of the image's own label). The draws come from `generator` alone, so a resumed epoch replays them."""
    lam = float(np.random.default_rng(int(torch.randint(2**31, (1,), generator=generator))).beta(alpha, alpha))
    perm = torch.randperm(len(x), generator=generator).to(x.device)
    return lam * x + (1 - lam) * x[perm], perm, lam

