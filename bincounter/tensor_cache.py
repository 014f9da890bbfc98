"""Training input an accelerator can keep up with: images decoded once into a uint8 tensor cache per split, and
TrainPreset's augmentations applied to whole batches on the device.

    cache = open_cache(train_df, image_size, cache_dir)       # builds <cache_dir>/<key>.npy once, then maps it
    for epoch in ...:
        batches = TrainBatches(cache, train_df["count"], classes, batch_size, seed * 1000 + epoch, device,
                               augment, sampler=None)           # a DataLoader's batches: len(), (x, y) on device
        train_one_epoch(model, batches, ...)

The cache holds every manifest row's image after the presets' deterministic geometry (`transforms.geometry`:
short side to image_size, centre square), decoded by `transforms.read_image`, as uint8 [N, 3, S, S]: row i is
manifest row i. Its name is a key over the rows' sha256 content hashes (the manifest's) and the image size, so a
cache made from other images is never used; a record beside it (<key>.json) holds the key, the shape and the
file's sha256, and the file is trusted only when all three match (a truncated or corrupt file is rebuilt). A
build writes a temporary file and renames it into place, and holds a lock file so that a second training
building the same cache waits and then uses it; a full disk is a CacheError and leaves nothing to be trusted.

`DeviceAugment` is TrainPreset's random part (`transforms.augmentations`, strengths from AUGMENTS) drawn per
image by the same torchvision transforms in the same order as TrainPreset draws them, then applied to the batch
at once on its device: the same tensors as the PIL path for the same seed, up to rounding (tests/test_tensor_cache).
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import os
import queue
import shutil
import threading
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.nn.functional import grid_sample
from torch.utils.data import BatchSampler, RandomSampler
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as F
# torchvision's own helpers, so that the batched kernels below follow its conventions exactly
from torchvision.transforms.v2._transform import _RandomApplyTransform
from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv
from torchvision.transforms.v2.functional._geometry import _get_inverse_affine_matrix

from bincounter.data import class_indices
from bincounter.manifest import atomic_write_bytes
from bincounter.transforms import augmentations, geometry, read_image

VERSION = 1  # bump when what a cache row holds changes: old caches then no longer match their key
DECODE_THREADS = min(8, os.cpu_count() or 1)
CHUNK = 256  # rows decoded and written at a time: bounds the memory a build needs


class CacheError(RuntimeError):
    """A tensor cache that cannot be built (disk full, unwritable folder); the message names the file."""


def cache_key(df: pd.DataFrame, image_size: int, fit: str = "crop") -> str:
    """Manifest rows (their sha256 column, in order), the image size and fit -> the cache's name (hex)."""
    if "sha256" not in df.columns or df["sha256"].isna().any() or (df["sha256"].astype(str) == "").any():
        raise ValueError("the tensor cache needs the manifest's sha256 of every image (rows without one)")
    h = hashlib.sha256(f"bincounter tensor cache v{VERSION}\n{image_size}\n{len(df)}\n".encode()
                       + (b"" if fit == "crop" else f"{fit}\n".encode()))  # crop: the key caches had before fit
    h.update("\n".join(df["sha256"].astype(str)).encode())
    return h.hexdigest()[:32]


@dataclass(frozen=True)
class TensorCache:
    """A trusted cache file: `array` maps it read-only ([N, 3, S, S] uint8). `built` says whether this call made
    it, `reason` why (None when an existing one was used)."""
    path: Path
    array: np.ndarray
    built: bool
    reason: str | None

    def batch(self, indices) -> torch.Tensor:
        """Rows `indices` (in that order) -> uint8 tensor [B, 3, S, S], copied out of the map."""
        return torch.from_numpy(np.take(self.array, np.asarray(indices, dtype=np.int64), axis=0))


def open_cache(df: pd.DataFrame, image_size: int, cache_dir: str | Path, threads: int = DECODE_THREADS,
               fit: str = "crop") -> TensorCache:
    """Manifest rows (path, sha256) -> their TensorCache in `cache_dir`, built first when there is no trusted one.
    Raises ImageError naming an image that does not decode, CacheError when the file cannot be written."""
    key = cache_key(df, image_size, fit)
    folder = Path(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path, record = folder / f"{key}.npy", folder / f"{key}.json"
    shape = (len(df), 3, image_size, image_size)
    with _lock(folder / f"{key}.lock"):  # a second builder waits here, then finds the first one's cache
        problem = _check(path, record, key, shape)
        if problem:
            print(f"tensor cache: building {path} ({len(df)} images at {image_size} px): {problem}")
            _build(df["path"].tolist(), image_size, path, record, key, threads, fit)
        return TensorCache(path, np.load(path, mmap_mode="r"), built=bool(problem), reason=problem)


@contextmanager
def _lock(path: Path):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _check(path: Path, record: Path, key: str, shape: tuple) -> str | None:
    """None when the cache file is whole and made from these images; otherwise why it is not to be trusted."""
    if not path.exists():
        return "no cache yet"
    try:
        rec = json.loads(record.read_text())
    except (OSError, ValueError):
        return "its record is missing or unreadable"
    if not isinstance(rec, dict) or rec.get("key") != key or tuple(rec.get("shape", ())) != shape:
        return "its record is for other images or another size"
    try:
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if digest != rec.get("sha256"):
            return "the file does not match its record's sha256 (truncated or corrupt)"
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        return f"the file is unreadable ({e})"
    if array.shape != shape or array.dtype != np.uint8:
        return f"the file holds {array.dtype} {array.shape}, not uint8 {shape}"
    return None


def _build(paths: list[str], image_size: int, path: Path, record: Path, key: str, threads: int, fit: str) -> None:
    """Decode `paths` into a new cache file at `path` and write its record; the file appears whole or not at all."""
    shape = (len(paths), 3, image_size, image_size)
    need = int(np.prod(shape)) + 4096
    free = shutil.disk_usage(path.parent).free
    if free < need:
        raise CacheError(f"tensor cache {path}: needs {need / 1e9:.2f} GB, only {free / 1e9:.2f} GB free on that "
                         f"disk; free some space or give another cache folder")
    prepare = T.Compose([*geometry(image_size, fit), T.PILToTensor()])
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    record.unlink(missing_ok=True)  # the old record must not vouch for whatever ends up at `path`
    try:
        h = hashlib.sha256()
        with open(tmp, "wb") as f, ThreadPoolExecutor(threads) as pool:
            head = io.BytesIO()
            np.lib.format.write_array_header_1_0(head, {"descr": "|u1", "fortran_order": False, "shape": shape})
            f.write(head.getvalue())
            h.update(head.getvalue())
            for start in range(0, len(paths), CHUNK):  # PIL decodes and resizes without the GIL: threads help
                for x in pool.map(lambda p: prepare(read_image(p)), paths[start:start + CHUNK]):
                    data = x.numpy().tobytes()
                    f.write(data)
                    h.update(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        atomic_write_bytes(record, json.dumps({"key": key, "shape": shape, "sha256": h.hexdigest()}).encode())
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CacheError(f"tensor cache {path}: the disk is full ({e.strerror}); nothing was kept. Free "
                             f"{need / 1e9:.2f} GB or give another cache folder") from e
        raise CacheError(f"tensor cache {path}: cannot write it ({e})") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --- augmentation of whole batches -----------------------------------------------------------------------------

def _affine(x: torch.Tensor, params: list, t: T.RandomAffine) -> torch.Tensor:
    """Per-image RandomAffine params -> x warped like torchvision's tensor kernel does one image (its inverse
    matrix about the centre, its pixel grid, nearest or bilinear, zeros outside)."""
    if t.fill != 0:
        raise NotImplementedError(f"RandomAffine with fill={t.fill!r} (only 0) on batches")
    b, _, h, w = x.shape
    theta = torch.tensor([_get_inverse_affine_matrix([0.0, 0.0], p["angle"], [float(v) for v in p["translate"]],
                                                     p["scale"], list(p["shear"])) for p in params],
                         dtype=torch.float32).view(b, 2, 3).to(x.device)
    base = torch.empty(1, h, w, 3, device=x.device)  # as torchvision's _affine_grid, one theta per image
    base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=x.device))
    base[..., 1].copy_(torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=x.device).unsqueeze_(-1))
    base[..., 2].fill_(1)
    scaled = theta.transpose(1, 2) / torch.tensor([0.5 * w, 0.5 * h], device=x.device)
    grid = base.view(1, h * w, 3).expand(b, -1, -1).bmm(scaled).view(b, h, w, 2)
    return grid_sample(x, grid, mode=str(getattr(t.interpolation, "value", t.interpolation)), padding_mode="zeros", align_corners=False)


def _where(params: list, x: torch.Tensor) -> torch.Tensor:
    """Which images a RandomApply transform was drawn for -> a [B, 1, 1, 1] bool mask on x's device."""
    return torch.tensor([p is not None for p in params], device=x.device).view(-1, 1, 1, 1)


def _flip(x: torch.Tensor, params: list, t) -> torch.Tensor:
    return torch.where(_where(params, x), x.flip(-1), x)


def _grey(x: torch.Tensor, params: list, t) -> torch.Tensor:
    return torch.where(_where(params, x), F.rgb_to_grayscale(x, num_output_channels=3), x)


def _blend(a: torch.Tensor, b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (f * a + (1 - f) * b).clamp_(0, 1)


_JITTER = [  # ColorJitter's fn_idx order; each (images in [0, 1], factors [n, 1, 1, 1]) -> images
    lambda x, f: (x * f).clamp_(0, 1),
    lambda x, f: _blend(x, F.rgb_to_grayscale(x).mean(dim=(-3, -2, -1), keepdim=True), f),
    lambda x, f: _blend(x, F.rgb_to_grayscale(x), f),
    lambda x, f: _hue(x, f),
]
_FACTORS = ["brightness_factor", "contrast_factor", "saturation_factor", "hue_factor"]
_IDENTITY = [1.0, 1.0, 1.0, 0.0]


def _hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    h, s, v = _rgb_to_hsv(x).unbind(-3)
    return _hsv_to_rgb(torch.stack(((h + f.view(-1, 1, 1)).remainder_(1.0), s, v), -3))


def _jitter(x: torch.Tensor, params: list, t: T.ColorJitter) -> torch.Tensor:
    """Each image's own four factors in its own random order: for each position in the order, each operation
    runs once on the images that have it there."""
    order = torch.stack([p["fn_idx"] for p in params])  # [B, 4]
    factors = torch.tensor([[ident if p[k] is None else p[k] for k, ident in zip(_FACTORS, _IDENTITY)]
                            for p in params], dtype=torch.float32)
    x = x.clone()
    for pos in range(4):
        for op, fn in enumerate(_JITTER):
            idx = (order[:, pos] == op).nonzero().flatten()
            if len(idx):
                f = factors[idx, op].view(-1, 1, 1, 1).to(x.device)
                x[idx.to(x.device)] = fn(x[idx.to(x.device)], f)
    return x


_KERNELS = {T.RandomAffine: _affine, T.RandomHorizontalFlip: _flip, T.ColorJitter: _jitter,
            T.RandomGrayscale: _grey}


class DeviceAugment:
    """TrainPreset's random part and normalisation for batches of cached images.

    `draw(n)` draws n images' parameters from torch's CPU generator exactly as TrainPreset would for n images in
    a row (same transforms from `transforms.augmentations`, same order); `apply(x, params)` takes uint8
    [B, 3, S, S] on any device -> normalised float32 [B, 3, S, S] on that device."""

    def __init__(self, image_size: int, augment: str, mean, std):
        self.transforms = augmentations(augment)
        self.mean, self.std = list(mean), list(std)  # the model's input normalisation (model.input_config)
        unknown = [type(t).__name__ for t in self.transforms if type(t) not in _KERNELS]
        if unknown:  # a new kind in TrainPreset must get its batch kernel here, not be skipped
            raise NotImplementedError(f"no batch kernel for {unknown}")
        self.probe = torch.empty(3, image_size, image_size, dtype=torch.uint8)  # what make_params sizes from

    def draw(self, n: int) -> list[list]:
        """-> per image, per transform: its parameters, or None where a RandomApply transform was not drawn."""
        out = []
        for _ in range(n):
            row = []
            for t in self.transforms:
                if isinstance(t, _RandomApplyTransform) and torch.rand(1) >= t.p:  # as its forward() decides
                    row.append(None)
                else:
                    row.append(t.make_params([self.probe]))
            out.append(row)
        return out

    def apply(self, x: torch.Tensor, params: list[list]) -> torch.Tensor:
        x = x.float().div_(255)  # ToDtype(float32, scale=True), before the colour operations instead of after
        for j, t in enumerate(self.transforms):
            x = _KERNELS[type(t)](x, [p[j] for p in params], t)
        return F.normalize(x, self.mean, self.std)


def _batch_seed(seed: int, batch: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{batch}".encode(), digest_size=8).digest(), "little") >> 1


class TrainBatches:
    """One epoch of training batches from a TensorCache: what `data.make_loader` over a ManifestDataset with
    TrainPreset gives (the same order for the same seed and sampler), decoded once and augmented on `device`.

    Iterating yields (x: normalised float32 [B, 3, S, S] on `device`, channels_last on CUDA; y: class indices [B]
    on `device`). A background thread gathers the next batches from the map (into pinned memory for CUDA) and
    draws their augmentation parameters, seeded by (seed, batch number) alone, so a resumed epoch replays the same
    batches. It draws from torch's CPU generator inside `fork_rng`: the training loop must not draw from that
    generator meanwhile (a ResNet's training step draws nothing from it)."""

    def __init__(self, cache: TensorCache, counts: Iterable[int], classes: list[int], batch_size: int, seed: int,
                 device: torch.device, mean, std, augment: str = "light", sampler: Iterable[int] | None = None,
                 prefetch: int = 3):
        self.cache = cache
        self.labels = class_indices(list(counts), classes)
        if len(self.labels) != len(cache.array):
            raise ValueError(f"{len(self.labels)} labels for a cache of {len(cache.array)} images")
        self.augment = DeviceAugment(cache.array.shape[-1], augment, mean, std)
        self.device = torch.device(device)
        self.seed = seed
        self.prefetch = prefetch
        if sampler is None:
            # as DataLoader(shuffle=True, generator=g): its iterator takes one draw from g before the sampler does
            g = torch.Generator().manual_seed(seed)
            torch.empty((), dtype=torch.int64).random_(generator=g)
            sampler = RandomSampler(range(len(self.labels)), generator=g)
        self.batches = list(BatchSampler(sampler, batch_size, drop_last=False))

    def __len__(self) -> int:
        return len(self.batches)

    def _load(self, b: int, idx: list[int]):
        x = self.cache.batch(idx)
        if self.device.type == "cuda":
            x = x.pin_memory()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_batch_seed(self.seed, b))
            params = self.augment.draw(len(idx))
        return x, torch.tensor([self.labels[i] for i in idx]), params

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        q: queue.Queue = queue.Queue(self.prefetch)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce():
            try:
                for b, idx in enumerate(self.batches):
                    if not put(self._load(b, idx)):
                        return
                put(None)
            except BaseException as e:  # noqa: BLE001 - handed to the training loop, which raises it
                put(e)

        worker = threading.Thread(target=produce, name="bincounter-batches", daemon=True)
        worker.start()
        try:
            while (item := q.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                x, y, params = item
                x = self.augment.apply(x.to(self.device, non_blocking=True), params)
                if self.device.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                yield x, y.to(self.device, non_blocking=True)
        finally:
            stop.set()
            worker.join()
