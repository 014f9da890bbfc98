"""The one preprocessing definition, shared by training, evaluation and the served model.

Bytes -> RGB PIL image (`decode_image`, with the checks a server needs), PIL image -> normalised tensor
(`TrainPreset` with augmentation, `EvalPreset` without).
"""
from __future__ import annotations

import io
import warnings

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2 as T

MAX_PIXELS = 40_000_000  # ~6300 x 6300; ABID photos are about 0.25 MP, anything far bigger is a bomb
MAX_BYTES = 20 * 1024 * 1024


class ImageError(ValueError):
    """Bytes that are not a usable image; the message says why."""


def decode_image(data: bytes, name: str = "image") -> Image.Image:
    """JPEG/PNG bytes -> fully decoded RGB image. Raises ImageError naming `name` for empty, oversized,
    undecodable or truncated input and for decompression bombs (checked before pixels are decoded)."""
    if not data:
        raise ImageError(f"{name}: empty")
    if len(data) > MAX_BYTES:
        raise ImageError(f"{name}: {len(data)} bytes is over the {MAX_BYTES}-byte limit")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise ImageError(f"{name}: {w}x{h} pixels is over the {MAX_PIXELS}-pixel limit (decompression bomb?)")
            img.load()
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image (cannot identify the format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{name}: decompression bomb ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name}: cannot decode ({e})") from None
    return img.convert("RGB")


def _normalize(mean, std) -> list:
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(list(mean), list(std))]


AUGMENTS = {  # name -> most rotation (degrees), shift and zoom (fractions), colour jitter, hue, grey probability
    "light": dict(degrees=0, shift=0.04, zoom=0.05, jitter=0.2, hue=0.02, grey=0.0),
    "strong": dict(degrees=8, shift=0.08, zoom=0.1, jitter=0.3, hue=0.05, grey=0.1),
}


class TrainPreset:
    """Augmentation suited to bins seen from above: the eval geometry with a shift, zoom and small rotation
    (a hard crop would cut items out and make the count wrong), colour jitter, horizontal flip only (the
    label strip and elastic bands have an up and down). `augment` names how wide it draws (AUGMENTS);
    `mean`, `std` are the model's input normalisation (model.input_config)."""

    def __init__(self, image_size: int, augment: str, mean, std):
        if augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {tuple(AUGMENTS)}, got {augment!r}")
        a = AUGMENTS[augment]
        self.t = T.Compose([
            T.Resize(image_size, antialias=True),
            T.CenterCrop(image_size),
            T.RandomAffine(degrees=a["degrees"], translate=(a["shift"], a["shift"]),
                           scale=(1 - a["zoom"], 1 + a["zoom"])),
            T.RandomHorizontalFlip(),
            T.ColorJitter(brightness=a["jitter"], contrast=a["jitter"], saturation=a["jitter"], hue=a["hue"]),
            *([T.RandomGrayscale(a["grey"])] if a["grey"] else []),
            *_normalize(mean, std),
        ])

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.t(img)


class EvalPreset:
    """Resize the short side, centre-crop a square, normalise with the model's `mean`, `std`: deterministic."""

    def __init__(self, image_size: int, mean, std):
        self.t = T.Compose([T.Resize(image_size, antialias=True), T.CenterCrop(image_size),
                            *_normalize(mean, std)])

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.t(img)
