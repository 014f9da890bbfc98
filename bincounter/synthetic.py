"""Synthetic warehouse bin photos: offline stand-ins for ABID images with a known item count.

A drawn bin, seen from above like the ABID photos: a yellowish fabric bin with a darker rim and wall
shadows, ``count`` products (boxes, bottles/cylinders seen from the top, pouches, odd polygons) in
product colours with an outline and a drop shadow, one to three bundles of thin translucent elastic
bands across the front, a white label strip with barcode-like bars on the lip, then mild lighting,
colour cast, sensor noise and blur.

Items never hide each other much (see ``_MAX_PAIR_OVERLAP`` and ``_MAX_COVERED``), so the count is
always knowable from the picture; they get smaller as ``count`` grows so that any count fits.

Everything is a pure function of its arguments: ``draw_bin(count, seed, size)`` returns identical
pixels for identical arguments (numpy's PCG64 generator seeded with ``seed``; Pillow drawing).
Only numpy and Pillow are used.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont

# A new item's bounding box may overlap any earlier item's box by at most this fraction of the
# smaller of the two boxes, and the sum of the overlaps onto one item is capped at _MAX_COVERED of it:
# boxes are larger than the shapes inside them, so every item stays mostly visible.
_MAX_PAIR_OVERLAP = 0.2
_MAX_COVERED = 0.35

# Product colours (RGB), chosen to stand out from the yellowish fabric; each item jitters one of them.
_PALETTE = np.array([
    (200, 40, 40), (130, 20, 30), (40, 80, 190), (25, 35, 90), (40, 140, 70), (20, 70, 40),
    (235, 120, 30), (120, 50, 150), (30, 30, 35), (80, 80, 90), (245, 245, 240), (150, 100, 60),
    (20, 140, 150), (220, 90, 150), (90, 180, 220), (110, 70, 40),
], dtype=np.float32)

_SHAPES = ("box", "box", "cylinder", "ellipse", "polygon")


def item_seed(seed: int, index: int) -> int:
    """The seed of image ``index`` of a synthetic set made with ``seed``.

    ``numpy.random.SeedSequence([seed, index])`` hashed to a 63-bit int: well mixed, so sets made
    with different seeds (e.g. a train and a test set) practically never share a picture.
    """
    if seed < 0 or index < 0:
        raise ValueError(f"item_seed needs seed >= 0 and index >= 0, got seed={seed}, index={index}")
    hi, lo = np.random.SeedSequence([seed, index]).generate_state(2, np.uint32)
    return (int(hi) << 31) ^ int(lo)


def synthetic_items(num_images: int, count_min: int, count_max: int, seed: int) -> list[tuple[str, int]]:
    """The labels of a synthetic set: ``[(image_id, count)]``, ids ``f"syn{seed}-{i:06d}"``.

    Counts cycle through ``count_min..count_max`` (so each count occurs ``num_images // k`` or one more
    times) and are then shuffled with ``seed``. Image ``i`` is drawn with
    ``draw_bin(count, item_seed(seed, i), size)``.
    """
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    if count_min < 0 or count_max < count_min:
        raise ValueError(f"need 0 <= count_min <= count_max, got count_min={count_min}, count_max={count_max}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    k = count_max - count_min + 1
    counts = np.array([count_min + i % k for i in range(num_images)], dtype=np.int64)
    np.random.default_rng(seed).shuffle(counts)
    return [(f"syn{seed}-{i:06d}", int(c)) for i, c in enumerate(counts)]


def draw_bin(count: int, seed: int, size: int = 256) -> Image.Image:
    """Draw a bin holding ``count`` items: an RGB ``size`` x ``size`` image, same args -> same pixels."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if size < 32:
        raise ValueError(f"size must be >= 32 pixels, got {size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    rng = np.random.default_rng(seed)
    s = size

    # Interior of the bin; the margins are the bin walls/rim, the bottom one is the front lip.
    x0 = int(s * rng.uniform(0.04, 0.09))
    x1 = s - int(s * rng.uniform(0.04, 0.09))
    y0 = int(s * rng.uniform(0.05, 0.10))
    y1 = s - int(s * rng.uniform(0.10, 0.15))

    img = _background(rng, s, (x0, y0, x1, y1))
    draw = ImageDraw.Draw(img, "RGBA")  # RGBA mode blends translucent fills onto the RGB image
    for shape, colour, points in _layout(rng, count, (x0, y0, x1, y1), s):
        _draw_item(draw, rng, shape, colour, points, s)
    _draw_bands(draw, rng, s, y0, y1)
    _draw_label(draw, rng, s, y1)
    return _camera(rng, img)


def contact_sheet(images: list[Image.Image], captions: list[str], cols: int = 8, thumb: int = 128) -> Image.Image:
    """A grid of thumbnails with a caption under each, for logging as a PNG artifact.

    Each cell is ``thumb`` wide and ``thumb + 16`` high (image letterboxed into ``thumb`` x ``thumb``,
    caption below); the sheet is ``min(cols, n)`` cells wide and ``ceil(n / cols)`` cells high.
    No images give one blank cell captioned "(no images)", so that logging a sample sheet of an
    empty set does not fail a step.
    """
    if len(images) != len(captions):
        raise ValueError(f"contact_sheet needs one caption per image, got {len(images)} images "
                         f"and {len(captions)} captions")
    if not images:
        images, captions = [Image.new("RGB", (thumb, thumb), (255, 255, 255))], ["(no images)"]
    if cols < 1 or thumb < 8:
        raise ValueError(f"contact_sheet needs cols >= 1 and thumb >= 8, got cols={cols}, thumb={thumb}")
    cap_h = 16
    ncols = min(cols, len(images))
    nrows = math.ceil(len(images) / ncols)
    sheet = Image.new("RGB", (ncols * thumb, nrows * (thumb + cap_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i, (im, caption) in enumerate(zip(images, captions)):
        cx, cy = (i % ncols) * thumb, (i // ncols) * (thumb + cap_h)
        t = im.convert("RGB")
        t.thumbnail((thumb, thumb))  # keeps the aspect ratio
        sheet.paste(t, (cx + (thumb - t.width) // 2, cy + (thumb - t.height) // 2))
        draw.text((cx + 3, cy + thumb + 2), str(caption), fill=(0, 0, 0), font=font)
    return sheet


# --- drawing helpers ---------------------------------------------------------------------------------

def _background(rng: np.random.Generator, s: int, box: tuple[int, int, int, int]) -> Image.Image:
    """Fabric bin as an RGB image: yellow-beige with weave, blotches, a darker rim and wall shadows.

    The shading is built as one float map and turned into colour by a per-channel lookup table,
    which is much faster than colour arithmetic on an (s, s, 3) array.
    """
    x0, y0, x1, y1 = box
    coords = np.arange(s, dtype=np.float32)

    # Low-frequency blotches (folds, uneven light): a 5x5 random field upsampled bilinearly.
    blot = Image.fromarray(rng.integers(0, 256, (5, 5), dtype=np.uint8)).resize((s, s), Image.BILINEAR)
    shade = 0.93 + np.asarray(blot, np.float32) * (0.1 / 255)

    # Fabric weave: faint crossing stripes with a random period.
    wave = 0.015 * np.sin(coords * (2 * np.pi / rng.uniform(2.5, 4.0)))
    weave = wave[None, :] + wave[:, None]
    shade += weave

    # Walls cast a soft shadow a few pixels deep into the interior: exp(-distance to the nearest wall),
    # separable because exp(-min(a, b)) = max(exp(-a), exp(-b)).
    depth = 0.06 * s
    ex = np.exp(-np.clip(np.minimum(coords - x0, x1 - coords), 0, None) / depth)
    ey = np.exp(-np.clip(np.minimum(coords - y0, y1 - coords), 0, None) / depth)
    shade *= 1.0 - 0.28 * np.maximum(ex[None, :], ey[:, None])

    # Outside the interior: the rim, a little darker, and the front lip (bottom), facing the camera,
    # a little brighter; a dark crease where the walls meet the rim.
    shade[:y0, :] = 0.84 + weave[:y0, :]
    shade[:, :x0] = 0.84 + weave[:, :x0]
    shade[:, x1 + 1:] = 0.84 + weave[:, x1 + 1:]
    shade[y1 + 1:, :] = 0.98 + weave[y1 + 1:, :]
    crease = max(1, s // 128)
    shade[max(0, y0 - crease):y0 + 1, x0:x1 + 1] = 0.7
    shade[y1:y1 + crease + 1, x0:x1 + 1] = 0.7
    shade[y0:y1 + 1, max(0, x0 - crease):x0 + 1] = 0.7
    shade[y0:y1 + 1, x1:x1 + crease + 1] = 0.7

    # Shade 1.0 is stored as 200 so that brighter-than-base values still fit in a byte.
    grey = Image.fromarray(np.clip(shade * 200, 0, 255).astype(np.uint8))
    base = np.array([226, 206, 140]) * rng.uniform(0.92, 1.05) + rng.uniform(-6, 6, 3)
    levels = np.arange(256) / 200
    lut = np.concatenate([np.clip(b * levels, 0, 255) for b in base]).astype(np.uint8)
    return grey.convert("RGB").point(lut.tolist())


def _layout(rng: np.random.Generator, count: int, box: tuple[int, int, int, int], s: int):
    """Place ``count`` items in the interior ``box``: a list of (shape, rgb, polygon points (n, 2)).

    The typical item side is a quarter of the image while that leaves the interior less than half
    full (counts up to about 5), then shrinks so the items cover about 45% of the interior.
    """
    x0, y0, x1, y1 = box
    base = min(0.25 * s, math.sqrt(0.45 * (x1 - x0) * (y1 - y0) / max(count, 1)))
    boxes = np.zeros((0, 4), np.float64)  # bounding boxes of the items placed so far
    covered = np.zeros(0, np.float64)  # how much of each is (at most) covered by later ones
    items = []
    for _ in range(count):
        shape, pts, b, fracs = _place(rng, base, box, boxes, covered)
        covered = np.append(covered + fracs, 0.0)
        boxes = np.vstack([boxes, b])
        colour = _PALETTE[rng.integers(len(_PALETTE))] + rng.uniform(-18, 18, 3)
        items.append((shape, tuple(int(c) for c in np.clip(colour, 0, 255)), pts))
    return items


def _place(rng: np.random.Generator, base: float, box, boxes: np.ndarray, covered: np.ndarray):
    """One item that does not hide earlier ones: (shape, points, bounding box, overlap fractions).

    Random shape, size and position, rejected while it would cover too much of an earlier item;
    after 25 rejections the size shrinks by 15%. Items under 2 px are accepted anyway (never reached
    in practice: that takes thousands of items), which guarantees that the loop ends.
    """
    x0, y0, x1, y1 = box
    scale = 1.0
    while True:
        for _attempt in range(25):
            shape = _SHAPES[rng.integers(len(_SHAPES))]
            w = base * scale * rng.uniform(0.75, 1.25)
            # Boxes and ellipses may be elongated; cylinders and polygons are roughly round.
            h = w * (rng.uniform(0.55, 1.0) if shape in ("box", "ellipse") else rng.uniform(0.85, 1.0))
            pts = _shape_points(rng, shape, w, h, rng.uniform(0, np.pi))
            lo, hi = pts.min(axis=0), pts.max(axis=0)
            if hi[0] - lo[0] >= x1 - x0 - 2 or hi[1] - lo[1] >= y1 - y0 - 2:
                continue  # larger than the interior (tiny images only)
            centre = np.array([rng.uniform(x0 + 1 - lo[0], x1 - 1 - hi[0]),
                               rng.uniform(y0 + 1 - lo[1], y1 - 1 - hi[1])], np.float32)
            pts = pts + centre
            b = np.concatenate([lo + centre, hi + centre]).astype(np.float64)
            fracs = _overlap_fractions(b, boxes, covered, force=base * scale < 2)
            if fracs is not None:
                return shape, pts, b, fracs
        scale *= 0.85


def _overlap_fractions(b: np.ndarray, boxes: np.ndarray, covered: np.ndarray, force: bool = False):
    """Fraction of each earlier box that box ``b`` covers, or None when ``b`` would hide too much.

    Too much: more than _MAX_PAIR_OVERLAP of the smaller of the two boxes, or pushing an earlier
    item's total covered fraction over _MAX_COVERED. ``force`` skips the check.
    """
    iw = np.minimum(b[2], boxes[:, 2]) - np.maximum(b[0], boxes[:, 0])
    ih = np.minimum(b[3], boxes[:, 3]) - np.maximum(b[1], boxes[:, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_e = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    frac = inter / area_e
    if not force and (np.any(inter > _MAX_PAIR_OVERLAP * np.minimum(area_b, area_e))
                      or np.any(covered + frac > _MAX_COVERED)):
        return None
    return frac


def _shape_points(rng: np.random.Generator, shape: str, w: float, h: float, angle: float) -> np.ndarray:
    """Outline of a shape of about ``w`` x ``h`` centred at 0, rotated by ``angle``: (n, 2) float32."""
    if shape == "box":
        local = np.array([(-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2)], np.float32)
    elif shape in ("ellipse", "cylinder"):
        t = np.linspace(0, 2 * np.pi, 24, endpoint=False, dtype=np.float32)
        local = np.stack([w / 2 * np.cos(t), h / 2 * np.sin(t)], axis=1)
    else:  # an irregular convex-ish polygon: 5-7 corners at jittered angles and radii
        n = int(rng.integers(5, 8))
        step = 2 * np.pi / n
        t = (np.arange(n) * step + rng.uniform(-0.25, 0.25, n) * step).astype(np.float32)
        r = rng.uniform(0.8, 1.0, n).astype(np.float32)
        local = np.stack([w / 2 * r * np.cos(t), h / 2 * r * np.sin(t)], axis=1)
    c, sn = math.cos(angle), math.sin(angle)
    rot = np.array([[c, sn], [-sn, c]], np.float32)
    return local @ rot


def _draw_item(draw: ImageDraw.ImageDraw, rng: np.random.Generator, shape: str, colour, pts, s: int) -> None:
    """One product: drop shadow, body with a darker outline, and a detail (panel, lid or highlight)."""
    off = max(1.0, 0.012 * s)
    draw.polygon([(x + off, y + 1.3 * off) for x, y in pts], fill=(0, 0, 0, 90))
    dark = tuple(int(c * 0.55) for c in colour)
    draw.polygon([tuple(p) for p in pts], fill=colour, outline=dark, width=max(1, s // 128))
    centre = pts.mean(axis=0)
    light = tuple(min(255, int(c * 0.6 + 110)) for c in colour)
    if shape == "box" and rng.random() < 0.6:
        # A printed panel on the box top: the outline shrunk towards the centre, in a lighter tone.
        inner = centre + (pts - centre) * rng.uniform(0.45, 0.65)
        draw.polygon([tuple(p) for p in inner], fill=light)
    elif shape == "cylinder":
        # A lid seen from above: a concentric ring.
        inner = centre + (pts - centre) * 0.7
        draw.polygon([tuple(p) for p in inner], outline=dark, width=max(1, s // 128))
    else:
        # A soft specular highlight off-centre (pouches, blister packs).
        inner = centre + (pts - centre) * 0.3 + (pts[0] - centre) * 0.3
        draw.polygon([tuple(p) for p in inner], fill=light + (110,))


def _draw_bands(draw: ImageDraw.ImageDraw, rng, s: int, y0: int, y1: int) -> None:
    """1-3 bundles of thin translucent elastic bands stretched across the front of the bin."""
    for _ in range(int(rng.integers(1, 4))):
        y = rng.uniform(y0 + 0.1 * (y1 - y0), y1 - 0.1 * (y1 - y0))
        slope = rng.uniform(-0.05, 0.05) * s
        n_lines = int(rng.integers(3, 8))
        gap = rng.uniform(0.012, 0.02) * s
        alpha = int(rng.integers(140, 210))
        grey = int(rng.integers(205, 250))
        for k in range(n_lines):
            yy = y + k * gap
            draw.line([(0, yy), (s, yy + slope)], fill=(grey, grey, grey - 5, alpha), width=max(1, s // 200))


def _draw_label(draw: ImageDraw.ImageDraw, rng, s: int, y1: int) -> None:
    """A white label on the front lip (sometimes the back rim) with barcode-like bars and a code block."""
    lw = rng.uniform(0.22, 0.34) * s
    lh = rng.uniform(0.055, 0.075) * s
    lx = rng.uniform(0.1, 0.9) * s - lw / 2  # may run off the frame, as in some of the photos
    ly = (y1 + s) / 2 - lh / 2 if rng.random() < 0.8 else 0.01 * s
    draw.rectangle([lx, ly, lx + lw, ly + lh], fill=(245, 245, 240))
    ink = (25, 25, 30)
    # A bin code like "2C↑" to the left: a solid dark block stands in for the text.
    draw.rectangle([lx + 0.06 * lw, ly + 0.25 * lh, lx + 0.4 * lw, ly + 0.75 * lh], fill=ink)
    x = lx + 0.5 * lw
    while x < lx + 0.94 * lw:
        bw = rng.uniform(0.004, 0.012) * s
        draw.rectangle([x, ly + 0.15 * lh, x + bw, ly + 0.85 * lh], fill=ink)
        x += bw + rng.uniform(0.004, 0.012) * s


def _camera(rng: np.random.Generator, img: Image.Image) -> Image.Image:
    """Lighting gradient, brightness, colour cast, sensor noise and a slight blur (all uint8 Pillow ops)."""
    s = img.width
    # A linear light falloff across the frame (darkening only: ImageChops.multiply scales by v / 255).
    coords = np.linspace(0, 1, s, dtype=np.float32)
    gx, gy = rng.uniform(-0.12, 0.12, 2)
    ramp_x = abs(gx) * (coords if gx > 0 else 1 - coords)
    ramp_y = abs(gy) * (coords if gy > 0 else 1 - coords)
    ramp = 1 - ramp_x[None, :] - ramp_y[:, None]
    ramp = Image.fromarray((ramp * 255).astype(np.uint8))
    img = ImageChops.multiply(img, Image.merge("RGB", (ramp, ramp, ramp)))
    # Overall exposure (compensating the falloff on average) and a colour cast, as one lookup table.
    gain = rng.uniform(0.85, 1.15) * (1 + (abs(gx) + abs(gy)) / 2) * (1 + rng.uniform(-0.05, 0.05, 3))
    lut = np.concatenate([np.clip(g * np.arange(256), 0, 255) for g in gain]).astype(np.uint8)
    img = img.point(lut.tolist())
    # Sensor noise: the same uniform noise on the three channels (luma noise), centred on zero.
    amp = int(rng.integers(4, 13))
    noise = Image.fromarray(rng.integers(0, amp + 1, (s, s), dtype=np.uint8))
    img = ImageChops.add(img, Image.merge("RGB", (noise, noise, noise)), offset=-(amp // 2))
    return img.filter(ImageFilter.BoxBlur(rng.uniform(0.3, 0.8) * s / 256))
