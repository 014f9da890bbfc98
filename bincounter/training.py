"""The fit loop: one epoch of training, evaluation, checkpoints with resume, early stopping on `monitor`.

`train_run` is what both the train step and each hpo trial call: it logs into the active MLflow run. It runs in
phases, as torchvision's reference training does: `setup` (model, optimizer, data -> a `Fit`), `restore` (from
the run's checkpoint), `wrap_distributed`, `train_epochs`, `finish` (the best epoch's model).
Distributed data parallel: started under torchrun (WORLD_SIZE > 1, e.g. a SageMaker job on several instances)
`train_run` joins the process group (nccl on GPUs, gloo on CPUs), each process trains on its DistributedSampler
share, and only rank 0 logs to MLflow and writes checkpoints.
"""
from __future__ import annotations

import copy
import math
import os
import random
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DistributedSampler, WeightedRandomSampler
from tqdm import tqdm

from bincounter import metrics
from bincounter.data import ManifestDataset, make_loader
from bincounter.manifest import atomic_write_bytes
from bincounter.model import ARCHS, DECISIONS, build_model, decide, get_arch, is_head, probabilities, trains
from bincounter.tensor_cache import TensorCache, TrainBatches, open_cache
from bincounter.transforms import AUGMENTS, FITS, EvalPreset, TrainPreset

CHECKPOINT = "checkpoint/last.pt"  # artifact path inside the train run
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
    """Everything that decides a training result. The defaults are the project's single source for the
    tunable hyperparameters (the train step's empty parameters fall back to these)."""
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


TUNABLE = ("lr", "batch_size", "weight_decay", "optimizer", "freeze", "freeze_epochs", "backbone_lr", "bn",
           "trainable_blocks", "ema", "mixup")


def setup_distributed() -> tuple[int, int]:
    """-> (rank, world size). Under torchrun (WORLD_SIZE > 1) joins the default process group once."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def setup_device() -> torch.device:
    """CUDA when present; on CPU every core does the math (data workers mostly wait on it) unless
    OMP_NUM_THREADS says otherwise (e.g. several trainings sharing a machine)."""
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        if dist.is_initialized():  # one GPU per process
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cuda")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1))
    return torch.device("cpu")


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


def train_one_epoch(model, loader, criterion, optimizer, scaler, device, max_steps: int = 0, desc: str = "train",
                    size: int = 0, mixup: float = 0.0, generator: torch.Generator | None = None, ema=None):
    """One pass over `loader` (at most max_steps batches; the caller has set the training mode) -> {loss,
    accuracy}. `size`: resize the batches to it first (progressive resizing); `mixup`: mixup's alpha, drawn from
    `generator`; `ema`: a torch.optim.swa_utils.AveragedModel updated after every step. Raises
    FloatingPointError on a non-finite loss (hpo records such a trial as failed)."""
    amp = device.type == "cuda"
    total, correct, loss_sum = 0, 0, 0.0
    n = min(len(loader), max_steps) if max_steps else len(loader)
    for step, (x, y) in enumerate(tqdm(loader, total=n, desc=desc, leave=False, mininterval=5)):
        if step >= n:
            break
        x = x.to(device, non_blocking=True, memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        if size and x.shape[-1] != size:
            x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                                          align_corners=False).contiguous(memory_format=torch.channels_last)
        if mixup:
            x, perm, lam = mix(x, mixup, generator)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):  # forward AND loss inside
            out = model(x)
            loss = criterion(out, y) if not mixup else lam * criterion(out, y) + (1 - lam) * criterion(out, y[perm])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}: lower lr or check the data")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if ema is not None:
            ema.update_parameters(model)
        loss_sum += loss.item() * len(y)
        correct += (out.argmax(1) == y).sum().item()
        total += len(y)
    if dist.is_initialized():  # every process's share together
        t = torch.tensor([loss_sum, correct, total], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        loss_sum, correct, total = t.tolist()
    return {"loss": loss_sum / max(total, 1), "accuracy": correct / max(total, 1)}


@torch.no_grad()
def predict(model, loader, device, tta: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """-> (class probabilities [N, C], true class indices [N]); `tta` as in model.probabilities."""
    model.eval()
    amp = device.type == "cuda"
    probs, labels = [], []
    for x, y in loader:
        x = x.to(device, non_blocking=True, memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            p = probabilities(model, x, tta)
        probs.append(p.cpu().numpy())
        labels.append(y.numpy())
    return np.concatenate(probs), np.concatenate(labels)


def evaluate(model, loader, device, classes: list[int], tta: bool = False, decision: str = "argmax") -> dict[str, float]:
    """-> {loss, accuracy, rmse, mae, within1_accuracy} over `loader`; `tta`, `decision` as in bincounter.model."""
    probs, y = predict(model, loader, device, tta)
    loss = float(nn.functional.nll_loss(torch.log(torch.from_numpy(probs).clamp_min(1e-12)), torch.from_numpy(y)))
    c = np.asarray(classes)
    return {"loss": loss, **metrics.count_metrics(c[y], c[decide(probs, decision)])}


def job_checkpoint_dir() -> Path | None:
    """A SageMaker job's checkpoint folder (synced to the job's CheckpointConfig S3 URI and restored when a spot
    job restarts): SM_CHECKPOINT_DIR, else /opt/ml/checkpoints when it exists; None outside a job."""
    d = os.environ.get("SM_CHECKPOINT_DIR")
    if d:
        return Path(d)
    return Path("/opt/ml/checkpoints") if Path("/opt/ml/checkpoints").is_dir() else None


class Checkpointer:
    """Saves the training state atomically after every epoch, locally and as the run's artifact; inside a
    SageMaker job also into its checkpoint folder (<dir>/<run id>/last.pt), which `load` prefers."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        job_dir = job_checkpoint_dir()
        self.job_file = job_dir / run_id / "last.pt" if job_dir else None

    def load(self) -> dict | None:
        """The run's last checkpoint, or None when it has none."""
        if self.job_file and self.job_file.is_file():  # written before the artifact: never older than it
            return torch.load(self.job_file, map_location="cpu", weights_only=True)
        client = mlflow.MlflowClient()
        if not any(f.path == CHECKPOINT for f in client.list_artifacts(self.run_id, "checkpoint")):
            return None
        # temporary folders, removed at once: a checkpoint is ~100-350 MB and trainings are many
        with tempfile.TemporaryDirectory(prefix="bincounter-ckpt-") as tmp:
            path = mlflow.artifacts.download_artifacts(run_id=self.run_id, artifact_path=CHECKPOINT, dst_path=tmp)
            return torch.load(path, map_location="cpu", weights_only=True)

    def save(self, state: dict) -> None:
        buf = _to_bytes(state)
        if self.job_file:
            atomic_write_bytes(self.job_file, buf)
        with tempfile.TemporaryDirectory(prefix="bincounter-ckpt-") as tmp:
            path = Path(tmp) / Path(CHECKPOINT).name
            path.write_bytes(buf)  # a private folder: the artifact store sees only the finished file
            mlflow.log_artifact(str(path), Path(CHECKPOINT).parent.name)


def _to_bytes(obj) -> bytes:
    import io
    b = io.BytesIO()
    torch.save(obj, b)
    return b.getvalue()


def _set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def is_better(value: float, best: float | None, monitor: str) -> bool:
    """Whether `value` of the metric `monitor` beats `best` (None: nothing yet)."""
    if best is None:
        return True
    return value > best if MONITORS[monitor] == "max" else value < best


@dataclass
class Fit:
    """One training in progress: what `setup` builds, `restore` and the epoch loop advance, `finish` returns.
    `net` is what is saved, evaluated and returned; `model` is what trains (DDP-wrapped when distributed)."""
    cfg: TrainConfig
    net: nn.Module
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    train_ds: ManifestDataset
    cache: TensorCache | None  # data_path=tensor: the training images, decoded once
    val_loader: torch.utils.data.DataLoader
    device: torch.device
    rank: int
    world: int
    run_id: str | None
    ckpt: Checkpointer | None
    sampler: DistributedSampler | None = None
    ema: AveragedModel | None = None  # cfg.ema: the averaged weights, what is validated and kept
    epoch: int = 0  # the last finished epoch
    history: list = field(default_factory=list)
    best: dict | None = None  # the best epoch's state dict
    best_epoch: int = 0
    best_value: float | None = None  # of cfg.monitor
    bad_epochs: int = 0  # epochs since the best
    logged: set = field(default_factory=set)  # epochs whose metrics the run already has

    @property
    def lead(self) -> bool:
        return self.rank == 0

    @property
    def kept(self) -> nn.Module:
        """What is validated and kept: the moving average of the weights when there is one, else the weights."""
        return self.ema.module if self.ema is not None else self.net

    def state(self) -> dict:
        """The checkpoint: everything `restore` needs to continue exactly."""
        return {"config": asdict(self.cfg), "epoch": self.epoch, "model": self.net.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "torch_rng": torch.get_rng_state(), "history": self.history,
                "best_model": self.best, "best_epoch": self.best_epoch, "best_value": self.best_value,
                "bad_epochs": self.bad_epochs, "ema": self.ema.state_dict() if self.ema is not None else None}


def setup(cfg: TrainConfig, train_df: pd.DataFrame, val_df: pd.DataFrame, checkpoint: bool = True) -> Fit:
    """Process group, device, seed, model, optimizer, schedule, loss and data for `cfg` -> a Fit at epoch 0."""
    cfg.validate()
    rank, world = setup_distributed()
    device = setup_device()
    _set_seed(cfg.seed)
    net = build_model(cfg.arch, len(cfg.classes), cfg.weights, cfg.freeze).to(device)
    # channels_last on every device: on this CPU it trains EfficientNet-Lite0 1.5x, resnet18 1.2x and resnet50
    # 1.0x as fast as contiguous tensors (bench/train.py --levers)
    net = net.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, net)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(e, cfg.epochs, cfg.warmup_epochs))
    arch = get_arch(cfg.arch)
    train_ds = ManifestDataset(train_df, cfg.classes,
                               TrainPreset(cfg.image_size, cfg.augment, arch.mean, arch.std, cfg.fit))
    val_loader = make_loader(ManifestDataset(val_df, cfg.classes, EvalPreset(cfg.image_size, arch.mean, arch.std, cfg.fit)),
                             cfg.batch_size, cfg.workers, shuffle=False, pin_memory=device.type == "cuda")
    # the tensor cache sits beside the images it is made from (the ingest cache), keyed by their content
    cache = open_cache(train_df, cfg.image_size, Path(os.path.commonpath(list(train_df["path"]))).parent / "tensors",
                       fit=cfg.fit) if cfg.data_path == "tensor" else None
    run_id = mlflow.active_run().info.run_id if rank == 0 else None
    # BatchNorm statistics are averaged too (use_buffers), so the averaged model is whole as it is
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True) if cfg.ema else None
    return Fit(cfg=cfg, net=net, model=net, optimizer=optimizer, scheduler=scheduler, cache=cache, ema=ema,
               scaler=torch.amp.GradScaler(device.type, enabled=device.type == "cuda"),
               criterion=CountLoss(cfg.classes, cfg.ordinal_weight, cfg.label_smoothing).to(device),
               train_ds=train_ds, val_loader=val_loader, device=device, rank=rank, world=world, run_id=run_id,
               ckpt=Checkpointer(run_id) if (checkpoint and rank == 0) else None)


def restore(fit: Fit, resume: bool) -> None:
    """Continue from the run's checkpoint, when resuming and it has one (rank 0's, for every process). A
    checkpoint made with other settings is refused, naming the settings that differ."""
    state = fit.ckpt.load() if (fit.ckpt and resume) else None
    if fit.world > 1:
        shared = [state if fit.lead else None]
        dist.broadcast_object_list(shared, src=0)
        state = shared[0]
    if fit.ckpt and resume:
        # a kill between an epoch's metrics and its checkpoint leaves that epoch logged but not saved: the
        # resumed run replays it (same batches, same values) and must not log it twice
        fit.logged = {m.step for m in mlflow.MlflowClient().get_metric_history(fit.run_id, "val_loss")}
    if not state:
        return
    now = asdict(fit.cfg)
    if state["config"] != now:
        diff = ", ".join(f"{k}: {state['config'].get(k)!r} -> {now.get(k)!r}"
                         for k in sorted(set(now) | set(state["config"])) if state["config"].get(k) != now.get(k))
        raise ValueError(f"run {fit.run_id} has a checkpoint made with other settings ({diff}); rerun it with "
                         "the same parameters, or start a new run")
    fit.net.load_state_dict(state["model"])
    fit.optimizer.load_state_dict(state["optimizer"])
    fit.scheduler.load_state_dict(state["scheduler"])
    fit.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    if fit.ema is not None:
        fit.ema.load_state_dict(state["ema"])
    fit.epoch, fit.history, fit.best = state["epoch"], state["history"], state["best_model"]
    fit.best_epoch, fit.best_value, fit.bad_epochs = state["best_epoch"], state["best_value"], state["bad_epochs"]
    if fit.lead:
        print(f"train: resuming run {fit.run_id} after epoch {fit.epoch}")


def wrap_distributed(fit: Fit) -> None:
    """Under torchrun: a DistributedSampler share of the training data per process, the model in DDP."""
    if fit.world == 1:
        return
    if fit.cfg.balanced or fit.cfg.freeze_epochs:  # DDP fixes the trained parameters and the sampler at the start
        raise ValueError("balanced sampling and freeze_epochs are not available in distributed training")
    # each process a disjoint share; order depends on (seed, epoch) only, as in train_epochs
    fit.sampler = DistributedSampler(fit.train_ds, num_replicas=fit.world, rank=fit.rank, shuffle=True,
                                     seed=fit.cfg.seed * 1000)
    # DDP syncs the parameters that take gradients when it is made: the frozen blocks (trainable_blocks) must not
    set_train_mode(fit.net, fit.cfg, fit.epoch + 1)
    fit.model = nn.parallel.DistributedDataParallel(
        fit.net, device_ids=[fit.device.index] if fit.device.type == "cuda" else None)
    if fit.lead:
        mlflow.log_param("world_size", fit.world)
        print(f"train: distributed data parallel over {fit.world} processes ({dist.get_backend()})")


def epoch_batches(fit: Fit, epoch: int):
    """The training batches of `epoch`: their order and augmentation draws depend on (seed, epoch) only, so a
    resumed run replays the same batches; through a DataLoader (data_path=pil) or the tensor cache (tensor)."""
    cfg, seed = fit.cfg, fit.cfg.seed * 1000 + epoch
    draw = balanced_sampler(fit.train_ds.labels, seed) if cfg.balanced else fit.sampler
    if fit.cache is not None:
        arch = get_arch(cfg.arch)
        counts = [cfg.classes[i] for i in fit.train_ds.labels]
        return TrainBatches(fit.cache, counts, cfg.classes, cfg.batch_size, seed, fit.device, arch.mean, arch.std,
                            cfg.augment, sampler=draw)
    return make_loader(fit.train_ds, cfg.batch_size, cfg.workers, shuffle=True, seed=seed,
                       pin_memory=fit.device.type == "cuda", sampler=draw)


def train_epochs(fit: Fit) -> None:
    """The epoch loop from the epoch after `fit.epoch`: train, validate, log (step=epoch), keep the best epoch by
    `monitor`, checkpoint; stops early after `patience` epochs without a better `monitor`."""
    cfg = fit.cfg
    while fit.epoch < cfg.epochs and not (cfg.patience and fit.bad_epochs >= cfg.patience):
        epoch = fit.epoch + 1
        if fit.sampler:
            fit.sampler.set_epoch(epoch)
        loader = epoch_batches(fit, epoch)
        lr = fit.optimizer.param_groups[0]["lr"]  # this epoch's (the scheduler steps after it)
        set_train_mode(fit.net, cfg, epoch)
        size = epoch_size(cfg, epoch)
        tr = train_one_epoch(fit.model, loader, fit.criterion, fit.optimizer, fit.scaler, fit.device,
                             cfg.max_steps, desc=f"epoch {epoch}/{cfg.epochs} ({size} px)", size=size,
                             mixup=cfg.mixup, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch),
                             ema=fit.ema)
        fit.scheduler.step()
        va = evaluate(fit.kept, fit.val_loader, fit.device, cfg.classes, cfg.tta, cfg.decision)
        if fit.world > 1:  # rank 0's numbers decide early stopping everywhere (BatchNorm buffers may differ a little)
            shared = [va]
            dist.broadcast_object_list(shared, src=0)
            va = shared[0]
        row = {"epoch": epoch, "train_loss": tr["loss"], "train_accuracy": tr["accuracy"],
               **{f"val_{k}": v for k, v in va.items()}, "lr": lr,
               **({"train_image_size": size} if cfg.start_size else {})}
        fit.history.append(row)
        if fit.lead and epoch not in fit.logged:
            mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
        if fit.lead:
            print("train: " + "  ".join(f"{k}={v:.4g}" for k, v in row.items()))
        if cfg.keep_last or is_better(row[cfg.monitor], fit.best_value, cfg.monitor):
            fit.best_value, fit.best_epoch, fit.bad_epochs = row[cfg.monitor], epoch, 0
            fit.best = {k: v.detach().cpu().clone() for k, v in fit.kept.state_dict().items()}
        else:
            fit.bad_epochs += 1
        fit.epoch = epoch
        if fit.ckpt:
            fit.ckpt.save(fit.state())


def finish(fit: Fit, val_predictions: bool = False) -> dict:
    """The best epoch's model (eval mode, CPU) and its figures; rank 0 logs `best_epoch` and `best_val_*`. With
    `val_predictions` also that model's validation probabilities and true class indices (`val_probs`,
    `val_labels`: what calibration is fitted on), from one more pass over the validation split on the device."""
    fit.net.load_state_dict(fit.best)
    out = {}
    if val_predictions and fit.lead:
        out["val_probs"], out["val_labels"] = predict(fit.net, fit.val_loader, fit.device, fit.cfg.tta)
    final = copy.deepcopy(fit.net).cpu()
    final.eval()
    best_row = next(r for r in fit.history if r["epoch"] == fit.best_epoch)
    if fit.lead:
        mlflow.log_metrics({"best_epoch": fit.best_epoch,
                            **{f"best_{k}": v for k, v in best_row.items() if k.startswith("val_")}})
    return {"model": final, "best_epoch": fit.best_epoch, "history": fit.history, "best": best_row, **out}


def train_run(cfg: TrainConfig, train_df: pd.DataFrame, val_df: pd.DataFrame, resume: bool = True,
              checkpoint: bool = True, val_predictions: bool = False) -> dict:
    """Train in the active MLflow run: logs per-epoch metrics (step=epoch), resumes from the run's checkpoint
    when it has one. -> {"model": best model by `cfg.monitor` (eval mode, CPU), "best_epoch", "history", "best":
    that epoch's metrics, and with `val_predictions` "val_probs", "val_labels" (see finish)}. Distributed (see
    the module's doc): ranks other than 0 need no active run and log nothing."""
    fit = setup(cfg, train_df, val_df, checkpoint)
    restore(fit, resume)
    wrap_distributed(fit)
    train_epochs(fit)
    return finish(fit, val_predictions)
