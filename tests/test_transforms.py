"""The one preprocessing definition and its guard against bad bytes."""
import io

import pandas as pd
import pytest
import torch
from PIL import Image

from bincounter.model import IMAGENET_MEAN as MEAN, IMAGENET_STD as STD
from bincounter.transforms import MAX_BYTES, EvalPreset, ImageError, TrainPreset, decode_image


def jpeg(w=80, h=60, color=(200, 180, 90)) -> bytes:
    b = io.BytesIO()
    Image.new("RGB", (w, h), color).save(b, "JPEG")
    return b.getvalue()


def noisy_jpeg() -> bytes:
    """A 96x64 JPEG of noise: most of its bytes are pixels, so cutting it in half truncates the pixel data."""
    b = io.BytesIO()
    Image.effect_noise((96, 64), 80).convert("RGB").save(b, "JPEG")
    return b.getvalue()


def test_decode_and_presets_give_normalised_square_tensors():
    img = decode_image(jpeg())
    assert img.mode == "RGB" and img.size == (80, 60)
    for preset in (TrainPreset(48, "light", MEAN, STD), EvalPreset(48, MEAN, STD)):
        x = preset(img)
        assert x.shape == (3, 48, 48) and x.dtype == torch.float32
    assert torch.equal(EvalPreset(48, MEAN, STD)(img), EvalPreset(48, MEAN, STD)(img))  # eval is deterministic


def test_png_with_alpha_becomes_rgb():
    b = io.BytesIO()
    Image.new("RGBA", (40, 40), (1, 2, 3, 0)).save(b, "PNG")
    assert decode_image(b.getvalue()).mode == "RGB"


@pytest.mark.parametrize("data, reason, message", [
    (b"", "not_an_image", "empty"),
    (b"hello, not an image", "not_an_image", "not an image .*b'hello, not a'"),
    (jpeg()[:300], "corrupt_image", "unreadable image header"),
    (noisy_jpeg()[:2000], "corrupt_image", "JPEG 96x64 does not decode .*truncated"),
    (b"\xff\xd8\xff" + b"\x00" * 50, "corrupt_image", "unreadable image header .*cannot identify the format"),
])
def test_bad_bytes_are_refused_with_the_reason(data, reason, message):
    with pytest.raises(ImageError, match=message) as e:
        decode_image(data, name="bin 7")
    assert "bin 7" in str(e.value) and e.value.reason == reason


def test_one_decoder_for_ingest_training_and_serving(tmp_path):
    """Ingest rejects with the decoder's reasons; the training dataset reads files through it too."""
    from bincounter.data import ManifestDataset
    from bincounter.ingest import REASONS
    from bincounter.transforms import REASONS as IMAGE_REASONS
    assert set(IMAGE_REASONS) <= set(REASONS)
    (tmp_path / "cut.jpg").write_bytes(noisy_jpeg()[:2000])
    ds = ManifestDataset(pd.DataFrame({"path": [str(tmp_path / "cut.jpg")], "count": [1]}), [1, 2], EvalPreset(32, MEAN, STD))
    with pytest.raises(ImageError, match="cut.jpg: JPEG 96x64 does not decode"):
        ds[0]


def test_keeping_the_stored_mode_for_ingest():
    b = io.BytesIO()
    Image.new("L", (40, 30), 7).save(b, "JPEG")
    img = decode_image(b.getvalue(), rgb=False)
    assert (img.mode, img.format) == ("L", "JPEG")


def test_decompression_bomb_is_refused_before_decoding():
    b = io.BytesIO()
    Image.new("1", (7000, 7000)).save(b, "PNG")  # ~49 MP of zeros compresses to a few KB
    assert len(b.getvalue()) < 100_000
    with pytest.raises(ImageError, match="pixel limit|decompression bomb") as e:
        decode_image(b.getvalue())
    assert e.value.reason == "too_large"


def test_oversized_payload_is_refused():
    with pytest.raises(ImageError, match="byte limit"):
        decode_image(b"\xff" * (MAX_BYTES + 1))


def test_eval_preset_in_halves_for_batches_is_the_same():
    """Serving resizes each image, then normalises the whole batch: the same tensors as one image at a time."""
    images = [decode_image(jpeg(80, 60, (10, 200, 30))), decode_image(noisy_jpeg())]
    preset = EvalPreset(48, MEAN, STD)
    batch = preset.normalize(torch.stack([preset.resize(img) for img in images]))
    assert torch.allclose(batch, torch.stack([preset(img) for img in images]), atol=1e-6)
    assert preset.resize(images[1]).dtype == torch.uint8


def test_fit_squash_keeps_the_whole_photo_and_crop_cuts_its_sides():
    """A 2:1 photo with a red strip at its left edge: crop cuts the strip away, squash keeps it; a square photo
    is the same either way (the squashed 224 x 224 copies)."""
    img = Image.new("RGB", (128, 64), (0, 0, 200))
    img.paste((255, 0, 0), (0, 0, 16, 64))
    crop, squash = (EvalPreset(32, (0, 0, 0), (1, 1, 1), fit).resize(img) for fit in ("crop", "squash"))
    assert crop.shape == squash.shape == (3, 32, 32)
    assert crop[0, :, 0].max() < 50 and squash[0, :, 0].min() > 200  # red only where squash kept the edge
    square = Image.new("RGB", (64, 64), (10, 200, 30))
    assert torch.equal(EvalPreset(32, MEAN, STD, "crop")(square), EvalPreset(32, MEAN, STD, "squash")(square))
    with pytest.raises(ValueError, match=r"fit must be one of \('crop', 'squash'\), got 'stretch'"):
        TrainPreset(32, "light", MEAN, STD, "stretch")
