"""Decode any photo into an 8-bit sRGB RGB PIL image, upright, optionally at a reduced JPEG scale.

One function, `open_upright`, used by collect (small decode for hashes) and crop (small decode for
detection, just-large-enough decode for the output). Normalisation: EXIF orientation; CMYK, 16-bit,
palette, greyscale and alpha (flattened on white) to RGB; an embedded ICC profile is applied (to
sRGB); animated images give their first frame; a pixel-count guard runs on the header before any
pixel is decoded (decompression bombs). Phone formats: HEIC/HEIF through pillow-heif (libheif applies the
file's rotation and resets the EXIF tag, so nothing turns twice), AVIF through Pillow itself (EXIF
orientation applied here, as for JPEG).
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass

EXIF_ORIENTATION_TAG = 0x0112
_SRGB = None
_HEIF_REGISTERED = False
# EXIF orientation -> the PIL transpose that makes the stored pixels upright (as ImageOps.exif_transpose)
_TRANSPOSE = {2: 0, 3: 3, 4: 1, 5: 5, 6: 4, 7: 6, 8: 2}


class DecodeRejected(Exception):
    """A photo that must not be decoded (e.g. too many pixels); the message is the manifest reason."""


@dataclass
class DecodeInfo:
    format: str  # PIL format name (decided by decoding, not by the file name)
    mode: str  # PIL mode of the stored pixels
    width: int  # EXIF-upright full-resolution size
    height: int
    orientation: int  # EXIF orientation tag, 1 when absent
    frames: int  # frames in the file (animated GIF/PNG/WebP: >1; the first is used)
    colour: str  # what normalisation did, e.g. "CMYK+icc->sRGB"
    scale_x: float  # full-resolution pixels per decoded pixel (1.0 without JPEG draft)
    scale_y: float


def _srgb_profile():
    global _SRGB
    if _SRGB is None:
        from PIL import ImageCms

        _SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
    return _SRGB


def _is_srgb_profile(icc: bytes) -> bool:
    """Cheap check for the common sRGB profiles (skips a pointless colour transform)."""
    head = icc[:4096]
    return b"sRGB" in head or b"s\x00R\x00G\x00B" in head


def _apply_icc(image, icc: bytes, notes: list[str]):
    """Convert `image` from its embedded profile to sRGB RGB. Modes the profile cannot take directly
    (RGBA, palette, 16-bit, grey+alpha) are first brought to RGB (or L for a grey profile), alpha
    flattened on white."""
    from PIL import ImageCms

    if _is_srgb_profile(icc):
        return image
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        space = source.profile.xcolor_space.strip()
        if space == "RGB" and image.mode != "RGB":
            image = _to_rgb(image, notes)
        elif space == "GRAY" and image.mode != "L":
            image = _to_rgb(image, notes).convert("L")
        elif space == "CMYK" and image.mode != "CMYK":
            raise ValueError(f"CMYK profile on a {image.mode} image")
        converted = ImageCms.profileToProfile(image, source, _srgb_profile(), outputMode="RGB")
    except Exception:  # noqa: BLE001 - a broken profile: convert without it, and say so
        notes.append("icc-unusable")
        return image
    notes.append("icc->sRGB")
    return converted


def _to_rgb(image, notes: list[str]):
    """Any PIL mode to 8-bit RGB; 16/32-bit scaled (not clipped); transparency flattened onto white."""
    from PIL import Image

    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        import numpy as np

        values = np.asarray(image, dtype=np.float64)
        top = float(values.max()) if values.size else 0.0
        if top > 255.0:
            values = values * (255.0 / (65535.0 if top <= 65535.0 else top))
        notes.append(f"{mode}->8bit")
        grey = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
        return grey.convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        notes.append("alpha-flattened")
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    notes.append(f"{mode}->RGB")
    return image.convert("RGB")


def register_heif() -> bool:
    """Let PIL open HEIC/HEIF (once per process); False when pillow-heif is not installed."""
    global _HEIF_REGISTERED
    if not _HEIF_REGISTERED:
        try:
            import pillow_heif
        except ImportError:
            return False
        pillow_heif.register_heif_opener()
        _HEIF_REGISTERED = True
    return True


def open_upright(path: str | os.PathLike, *, min_long_side: int | None = None,
                 max_pixels: int | None = None):
    """Decode `path`; return (EXIF-upright 8-bit sRGB RGB PIL image, DecodeInfo).

    `min_long_side`: JPEGs are decoded at the smallest DCT scale (1/2, 1/4, 1/8) whose long side is
    still >= this (PIL draft mode: much faster than a full decode); other formats decode in full.
    `max_pixels`: the header's pixel count above this raises DecodeRejected before decoding.
    Raises whatever PIL raises for undecodable input.
    """
    from PIL import Image

    register_heif()
    opened = Image.open(path)
    rgb = None
    try:
        stored_w, stored_h = opened.size
        if max_pixels is not None and stored_w * stored_h > max_pixels:
            raise DecodeRejected(
                f"decompression-bomb guard ({stored_w}x{stored_h} = {stored_w * stored_h / 1e6:.0f} MP "
                f"> {max_pixels / 1e6:.0f} MP)"
            )
        fmt = opened.format or "?"
        mode = opened.mode
        frames = int(getattr(opened, "n_frames", 1) or 1)
        if frames > 1:
            opened.seek(0)
        orientation = 1
        try:
            raw = opened.getexif().get(EXIF_ORIENTATION_TAG)
            if raw is not None and int(raw) in range(1, 9):
                orientation = int(raw)
        except Exception:  # noqa: BLE001 - malformed EXIF: treat as "no orientation"
            orientation = 1
        icc = opened.info.get("icc_profile")
        if min_long_side is not None and fmt == "JPEG" and max(stored_w, stored_h) > min_long_side:
            k = min_long_side / float(max(stored_w, stored_h))
            opened.draft(None, (max(1, math.ceil(stored_w * k)), max(1, math.ceil(stored_h * k))))
        opened.load()
        image = opened
        decoded_w, decoded_h = image.size
        notes: list[str] = []
        if frames > 1:
            notes.append(f"first-of-{frames}-frames")
        if icc:
            image = _apply_icc(image, icc, notes)
        rgb = _to_rgb(image, notes)
        if orientation != 1:
            rgb = rgb.transpose(_TRANSPOSE[orientation])
        elif rgb is opened and frames > 1:
            rgb = rgb.copy()  # a multi-frame file keeps its file open: detach the first frame
    finally:
        if rgb is not opened:
            opened.close()  # (a loaded single-frame image has already released its file)
    if orientation in (5, 6, 7, 8):
        full_w, full_h, dec_w, dec_h = stored_h, stored_w, decoded_h, decoded_w
    else:
        full_w, full_h, dec_w, dec_h = stored_w, stored_h, decoded_w, decoded_h
    info = DecodeInfo(
        format=fmt, mode=mode, width=full_w, height=full_h, orientation=orientation, frames=frames,
        colour="+".join(notes), scale_x=full_w / dec_w, scale_y=full_h / dec_h,
    )
    return rgb, info


def perceptual_hash(image) -> int:
    """64-bit DCT perceptual hash (pHash): grey 32x32, 8x8 lowest frequencies above their median."""
    import numpy as np
    from PIL import Image

    grey = image.convert("L").resize((32, 32), Image.Resampling.BOX if min(image.size) >= 64
                                     else Image.Resampling.BILINEAR)
    pixels = np.asarray(grey, dtype=np.float64)
    n = 32
    k = np.arange(n)
    basis = np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n))  # DCT-II rows
    coeffs = basis @ pixels @ basis.T
    low = coeffs[:8, :8].flatten()
    median = np.median(low[1:])
    bits = low > median
    value = 0
    for bit in bits:
        value = (value << 1) | int(bit)
    return value


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()
