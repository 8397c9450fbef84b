"""Demo raw photos derived from real photos shipped inside installed packages (no downloads).

Each subject gets 8 deterministic "raw" photos that vary the way real uploads vary: sizes, face
position, EXIF orientation, formats, an exact duplicate and one photo without a face.

  astronaut  skimage/data/astronaut.png (Eileen Collins, NASA portrait, 512x512)
  t1person   one person (the man in the dark shirt, centre-left) cut out of insightface's t1.jpg,
             a 1280x886 group photo of six people; the cut region holds only his face
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from tifactory.fileio import atomic_path

DEMO_SUBJECTS = {"astronaut": "woman", "t1person": "person"}

# Per subject: packaged source image, the region of it that forms the base photo (left, top,
# right, bottom), the face box inside that base (x, y, w, h; measured once with YuNet and checked by
# the tests), a region of the source image without any face, and the EXIF orientation to use.
_SPECS = {
    "astronaut": {
        "package": "skimage",
        "file": "data/astronaut.png",
        "base_box": (0, 0, 512, 512),
        "face": (178, 63, 90, 113),
        "noface_box": (0, 330, 512, 512),  # space suit, patches and helmet
        "orientation": 6,
    },
    "t1person": {
        "package": "insightface",
        "file": "data/images/t1.jpg",
        "base_box": (390, 200, 740, 650),
        "face": (75, 69, 103, 146),
        "noface_box": (480, 0, 900, 260),  # the lamp and the wall above the table
        "orientation": 8,
    },
}

_LARGE_LONG_SIDE = 1600
_SMALL_LONG_SIDE = 300


def package_file(package: str, relative: str) -> Path:
    """Locate a data file inside an installed package without importing it.

    (importlib.resources.files would import the package; `insightface` takes ~0.5 s to import.)
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; it ships {relative}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / relative
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{relative} not found inside the installed {package!r} package")


def _resize_long_side(image, long_side: int):
    from PIL import Image

    scale = long_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def extend_canvas(image, left: int, top: int, right: int, bottom: int, blur_radius: float = 24.0):
    """Put `image` on a larger canvas whose new borders continue its edge pixels, heavily blurred."""
    import numpy as np
    from PIL import Image, ImageFilter

    pixels = np.asarray(image)
    padded = np.pad(pixels, ((top, bottom), (left, right), (0, 0)), mode="edge")
    canvas = Image.fromarray(padded).filter(ImageFilter.GaussianBlur(blur_radius))
    canvas.paste(image, (left, top))
    return canvas


def _save(image, path: Path, fmt: str, **params) -> None:
    with atomic_path(path) as tmp_path:
        image.save(tmp_path, format=fmt, **params)


def make_demo_photos(subject: str, out_dir: str | os.PathLike) -> list[Path]:
    """Write the demo raw photos of `subject` (a key of DEMO_SUBJECTS) into `out_dir`; return their paths.

    Files (S = subject name), all derived from the packaged source photo:
      S_01_original.png          base photo, PNG
      S_02_large.jpg             upscaled to a 1600 px long side
      S_03_small.jpg             downscaled to a 300 px long side
      S_04_offcentre.jpg         face near the left border; canvas extended right and upward with
                                 stretched, blurred edge pixels
      S_05_rotated_exif.jpg      pixels stored rotated, EXIF Orientation 6 (astronaut) or 8
                                 (t1person) says how to turn them upright; narrower crop
      S_06_tight.jpg             tight crop around the head, heavy JPEG compression
      S_07_copy_of_02.jpg        byte-identical copy of S_02_large.jpg (a duplicate)
      S_08_noface.jpg            a region of the source photo with no face in it
    Output bytes are deterministic for a given Pillow/libjpeg/zlib.
    """
    from PIL import Image

    if subject not in _SPECS:
        raise ValueError(f"unknown demo subject {subject!r}; choose one of {sorted(DEMO_SUBJECTS)}")
    spec = _SPECS[subject]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    with Image.open(package_file(spec["package"], spec["file"])) as opened:
        source = opened.convert("RGB")
    base = source.crop(spec["base_box"])
    fx, fy, fw, fh = spec["face"]
    width, height = base.size
    written: list[Path] = []

    def out(name: str) -> Path:
        path = out_dir / f"{subject}_{name}"
        written.append(path)
        return path

    # 01: the base photo as PNG
    _save(base, out("01_original.png"), "PNG")

    # 02: upscaled (a high-resolution phone photo)
    large_path = out("02_large.jpg")
    _save(_resize_long_side(base, _LARGE_LONG_SIDE), large_path, "JPEG", quality=92)

    # 03: small (a thumbnail / messenger-compressed copy)
    _save(_resize_long_side(base, _SMALL_LONG_SIDE), out("03_small.jpg"), "JPEG", quality=85)

    # 04: face off-centre, half a face width from the left border, on an extended canvas
    trim = max(0, fx - round(0.5 * fw))
    trimmed = base.crop((trim, 0, width, height))
    offcentre = extend_canvas(trimmed, left=0, top=round(0.3 * height), right=round(0.9 * width), bottom=0)
    _save(offcentre, out("04_offcentre.jpg"), "JPEG", quality=90)

    # 05: stored rotated with an EXIF orientation tag (a camera held sideways)
    narrow_w = round(0.8 * width)
    left = min(max(0, round(fx + fw / 2 - narrow_w / 2)), width - narrow_w)
    upright = base.crop((left, 0, left + narrow_w, height))
    orientation = spec["orientation"]
    # PIL's exif_transpose turns 6 with ROTATE_270 and 8 with ROTATE_90: store the inverse
    stored = upright.transpose(
        Image.Transpose.ROTATE_90 if orientation == 6 else Image.Transpose.ROTATE_270
    )
    exif = Image.Exif()
    exif[0x0112] = orientation
    _save(stored, out("05_rotated_exif.jpg"), "JPEG", quality=90, exif=exif.tobytes())

    # 06: tight head crop (smaller than the crop stage wants: it must shrink to the short side)
    tight_box = (
        max(0, round(fx - 0.6 * fw)),
        max(0, round(fy - 0.5 * fh)),
        min(width, round(fx + 1.6 * fw)),
        min(height, round(fy + 1.9 * fh)),
    )
    _save(base.crop(tight_box), out("06_tight.jpg"), "JPEG", quality=70)

    # 07: exact duplicate of 02 under another name
    data = large_path.read_bytes()
    with atomic_path(out("07_copy_of_02.jpg")) as tmp_path:
        tmp_path.write_bytes(data)

    # 08: no face at all
    _save(source.crop(spec["noface_box"]), out("08_noface.jpg"), "JPEG", quality=90)

    return written
