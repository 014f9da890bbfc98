"""The fit loop: epochs of training and evaluation, resume from the run's checkpoint, early stopping on `monitor`.

`train_run` is what both the train step and each hpo trial call: it logs into the active MLflow run. It runs in
phases, as torchvision's reference training does: `setup` (model, optimizer, data -> a `Fit`), `restore` (from
the run's checkpoint, bincounter.checkpoints), `wrap_distributed`, `train_epochs`, `finish` (the best epoch's
model). What each lever does inside an epoch is bincounter.levers; the settings are bincounter.train_config.
Distributed data parallel: started under torchrun (WORLD_SIZE > 1, e.g. a SageMaker job on several instances)
`train_run` joins the process group (nccl on GPUs, gloo on CPUs), each process trains on its DistributedSampler
share, and only rank 0 logs to MLflow and writes checkpoints.
"""
from __future__ import annotations

import copy
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from bincounter import metrics
from bincounter.checkpoints import Checkpointer
from bincounter.data import ManifestDataset, make_loader
from bincounter.levers import CountLoss, balanced_sampler, epoch_size, lr_factor, make_optimizer, mix, set_train_mode
from bincounter.model import build_model, decide, get_arch, probabilities
from bincounter.tensor_cache import TensorCache, TrainBatches, open_cache
from bincounter.train_config import MONITORS, TrainConfig
from bincounter.transforms import EvalPreset, TrainPreset


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
