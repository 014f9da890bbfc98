"""The one preprocessing definition and its guard against bad bytes."""
import io

import pytest
import torch
from PIL import Image

from bincounter.transforms import MAX_BYTES, EvalPreset, ImageError, TrainPreset, decode_image


def jpeg(w=80, h=60, color=(200, 180, 90)) -> bytes:
    b = io.BytesIO()
    Image.new("RGB", (w, h), color).save(b, "JPEG")
    return b.getvalue()


def test_decode_and_presets_give_normalised_square_tensors():
    img = decode_image(jpeg())
    assert img.mode == "RGB" and img.size == (80, 60)
    for preset in (TrainPreset(48), EvalPreset(48)):
        x = preset(img)
        assert x.shape == (3, 48, 48) and x.dtype == torch.float32
    assert torch.equal(EvalPreset(48)(img), EvalPreset(48)(img))  # eval is deterministic


def test_png_with_alpha_becomes_rgb():
    b = io.BytesIO()
    Image.new("RGBA", (40, 40), (1, 2, 3, 0)).save(b, "PNG")
    assert decode_image(b.getvalue()).mode == "RGB"


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"hello, not an image", "not an image"),
    (jpeg()[:300], "cannot decode"),
    (b"\xff\xd8\xff" + b"\x00" * 50, "not an image"),
])
def test_bad_bytes_are_refused_with_the_reason(data, message):
    with pytest.raises(ImageError, match=message) as e:
        decode_image(data, name="bin 7")
    assert "bin 7" in str(e.value)


def test_decompression_bomb_is_refused_before_decoding():
    b = io.BytesIO()
    Image.new("1", (7000, 7000)).save(b, "PNG")  # ~49 MP of zeros compresses to a few KB
    assert len(b.getvalue()) < 100_000
    with pytest.raises(ImageError, match="pixel limit|decompression bomb"):
        decode_image(b.getvalue())


def test_oversized_payload_is_refused():
    with pytest.raises(ImageError, match="byte limit"):
        decode_image(b"\xff" * (MAX_BYTES + 1))
