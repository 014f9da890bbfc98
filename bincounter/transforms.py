"""The one preprocessing definition, shared by training, evaluation and the served model.

Bytes -> image (`decode_image`, with the checks a server needs; ingest, training, evaluation and serving all
decode through it), PIL image -> normalised tensor (`TrainPreset` with augmentation, `EvalPreset` without).
The random part of TrainPreset (`augmentations`) is also what bincounter.tensor_cache applies to whole batches
of cached uint8 tensors on the device.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2 as T

MAX_PIXELS = 40_000_000  # ~6300 x 6300; ABID photos are about 0.25 MP, anything far bigger is a bomb
MAX_BYTES = 20 * 1024 * 1024


REASONS = ("not_an_image", "corrupt_image", "too_large")  # ImageError.reason; ingest's reject reasons too
JPEG_START = b"\xff\xd8"


class ImageError(ValueError):
    """Bytes that are not a usable image. The message names the input and says why; `reason` is one of REASONS."""

    def __init__(self, message: str, reason: str = "corrupt_image"):
        super().__init__(message)
        self.reason = reason


def decode_image(data: bytes, name: str = "image", rgb: bool = True) -> Image.Image:
    """JPEG/PNG bytes -> a fully decoded image: RGB, or with `rgb=False` as stored (mode and format kept, as
    ingest needs to know whether a JPEG can be cached as it is). The one decoder of the project: ingest,
    training, evaluation and serving all call it.

    Raises ImageError naming `name`: empty or unidentifiable bytes (not_an_image); a broken header, or pixels that
    do not decode, a truncated file included (corrupt_image: PIL's LOAD_TRUNCATED_IMAGES stays off); over
    MAX_BYTES, over MAX_PIXELS or a decompression bomb (too_large, found before any pixel is decoded)."""
    if not data:
        raise ImageError(f"{name}: empty (0 bytes), not an image", "not_an_image")
    if len(data) > MAX_BYTES:
        raise ImageError(f"{name}: {len(data)} bytes is over the {MAX_BYTES}-byte limit", "too_large")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageError(f"{name}: decompression bomb ({e})", "too_large") from None
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds on hostile input
            # PIL says "unidentified" for a broken JPEG header too: the JPEG start marker tells the two apart
            if isinstance(e, UnidentifiedImageError) and data[:2] != JPEG_START:
                raise ImageError(f"{name}: not an image ({len(data)} bytes starting {data[:12]!r})",
                                 "not_an_image") from None
            why = "cannot identify the format" if isinstance(e, UnidentifiedImageError) else f"{type(e).__name__}: {e}"
            raise ImageError(f"{name}: unreadable image header ({len(data)} bytes; {why})", "corrupt_image") from None
        w, h = img.size
        if w * h > MAX_PIXELS:
            raise ImageError(f"{name}: {w}x{h} pixels is over the {MAX_PIXELS}-pixel limit (decompression bomb?)",
                             "too_large")
        try:
            img.load()
        except Exception as e:  # noqa: BLE001
            raise ImageError(f"{name}: {img.format} {w}x{h} does not decode ({type(e).__name__}: {e})",
                             "corrupt_image") from None
    return img.convert("RGB") if rgb else img


def read_image(path: str | Path) -> Image.Image:
    """An image file -> RGB image, through decode_image (errors name the path)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ImageError(f"{path}: cannot read ({e.strerror or e})", "not_an_image") from None
    return decode_image(data, str(path))


def _normalize(mean, std) -> list:
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(list(mean), list(std))]


# How a photo becomes the model's square: `crop` resizes the short side and cuts the centre square (the
# sides of a 1.3:1 bin photo, and any items there, are cut away); `squash` resizes the whole photo to the
# square, as the squashed 224 x 224 copies some collections hold already are (a square stays as it is either way)
FITS = ("crop", "squash")


def geometry(image_size: int, fit: str = "crop") -> list:
    """The deterministic part of both presets: the photo to an `image_size` square, by `fit` (FITS)."""
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    if fit == "squash":
        return [T.Resize((image_size, image_size), antialias=True)]
    return [T.Resize(image_size, antialias=True), T.CenterCrop(image_size)]


AUGMENTS = {  # name -> most rotation (degrees), shift and zoom (fractions), colour jitter, hue, grey probability,
    # and whether torchvision's TrivialAugmentWide (one random operation of random strength) replaces the jitter
    "light": dict(degrees=0, shift=0.04, zoom=0.05, jitter=0.2, hue=0.02, grey=0.0, trivial=False),
    "strong": dict(degrees=8, shift=0.08, zoom=0.1, jitter=0.3, hue=0.05, grey=0.1, trivial=False),
    "trivial": dict(degrees=0, shift=0.04, zoom=0.05, jitter=0.0, hue=0.0, grey=0.0, trivial=True),
}


def augmentations(augment: str = "light") -> list:
    """The random part of TrainPreset, drawn per image, with AUGMENTS[augment]'s strengths: a shift, zoom and
    small rotation (a hard crop would cut items out and make the count wrong), a horizontal flip only (the label
    strip and elastic bands have an up and down), colour jitter, some grey; or TrivialAugmentWide in place of
    the colour changes (augment=trivial; PIL images only: the tensor cache has no batch kernel for it)."""
    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {tuple(AUGMENTS)}, got {augment!r}")
    a = AUGMENTS[augment]
    return [
        T.RandomAffine(degrees=a["degrees"], translate=(a["shift"], a["shift"]), scale=(1 - a["zoom"], 1 + a["zoom"])),
        T.RandomHorizontalFlip(),
        *([T.ColorJitter(brightness=a["jitter"], contrast=a["jitter"], saturation=a["jitter"], hue=a["hue"])]
          if a["jitter"] else []),
        *([T.RandomGrayscale(a["grey"])] if a["grey"] else []),
        *([T.TrivialAugmentWide()] if a["trivial"] else []),
    ]


class TrainPreset:
    """Augmentation suited to bins seen from above: the eval geometry, then `augmentations(augment)`, then the
    model's input normalisation (`mean`, `std`: model.input_config). PIL image -> float tensor [3, S, S]."""

    def __init__(self, image_size: int, augment: str, mean, std, fit: str = "crop"):
        self.t = T.Compose([*geometry(image_size, fit), *augmentations(augment), *_normalize(mean, std)])

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.t(img)


class EvalPreset:
    """The photo to a square by `fit`, normalised with the model's `mean`, `std`: deterministic. In
    two halves for batches: `resize` (PIL image -> uint8 [3, S, S], one image at a time) and `normalize` (uint8
    [..., 3, S, S] -> float, a whole batch at once, on any device)."""

    def __init__(self, image_size: int, mean, std, fit: str = "crop"):
        self.resize = T.Compose([*geometry(image_size, fit), T.PILToTensor()])
        self.normalize = T.Compose(_normalize(mean, std)[1:])  # ToImage is done: PILToTensor

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.normalize(self.resize(img))
