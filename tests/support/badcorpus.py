"""Builders for the bad-input corpus and small Snakemake workdirs (shared by the fault-injection suite).

Not a test module: workflow/test_bad_inputs.py, test_faults.py, test_security.py and test_reproducibility.py
import it.
Every photo is derived from images that ship inside installed packages (no downloads). The "good" photos are
distinct compositions of the astronaut portrait (flips, crops, canvas extensions), far enough apart that the
near-duplicate check keeps each one; every one is stored in a different awkward format.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import yaml

from support.harness import run_snakemake

# name -> (flip, crop box of the 512x512 astronaut, canvas extension left/top/right/bottom, scale)
_GEOMETRY = {
    "a": (False, (0, 0, 512, 512), (0, 0, 0, 0), 1.0),
    "b": (True, (0, 0, 512, 512), (0, 0, 0, 0), 1.0),
    "c": (False, (60, 0, 512, 400), (0, 160, 0, 0), 1.25),
    "d": (True, (0, 0, 440, 460), (240, 0, 0, 0), 1.0),
    "e": (False, (100, 0, 420, 380), (0, 0, 300, 120), 1.3),
    "f": (True, (80, 20, 512, 512), (0, 0, 0, 260), 1.0),
    "g": (False, (0, 0, 512, 330), (200, 0, 200, 0), 1.1),
    "h": (True, (120, 0, 400, 330), (0, 220, 260, 0), 1.4),
    "i": (False, (130, 10, 512, 512), (0, 0, 0, 0), 1.2),
    "j": (True, (0, 30, 380, 512), (0, 0, 250, 0), 1.0),
    "k": (False, (40, 0, 470, 300), (0, 0, 0, 330), 1.2),
}


def astronaut():
    from PIL import Image

    from tifactory.demo.photos import package_file

    with Image.open(package_file("skimage", "data/astronaut.png")) as image:
        return image.convert("RGB")


def composition(key: str):
    from PIL import Image

    from tifactory.demo.photos import extend_canvas

    flip, box, (left, top, right, bottom), scale = _GEOMETRY[key]
    image = astronaut().crop(box)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if scale != 1.0:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
    if left or top or right or bottom:
        image = extend_canvas(image, left, top, right, bottom)
    return image


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 60000, height: int = 60000) -> bytes:
    """A few hundred bytes whose header declares width x height (3.6 gigapixels): a decompression bomb."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    row = b"\x00" + b"\x00" * 3 * 64
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(row * 4))
            + _png_chunk(b"IEND", b""))


# Expected outcome of every entry of the messy folder: "kept", or the start of the rejection reason.
NON_ASCII_NAME = "éva_façade_照片.jpg"
MESSY_EXPECTED = {
    "regular.jpg": "kept",
    "cmyk.jpg": "kept",
    "deep16.png": "kept",
    "palette_transparent.png": "kept",
    "grey.png": "kept",
    "rgba.png": "kept",
    "animated.gif": "kept",
    "photo.webp": "kept",
    "jpeg_named.png": "kept",
    "rotated_exif.jpg": "kept",
    NON_ASCII_NAME: "kept",
    "empty.jpg": "undecodable: empty file",
    "truncated.jpg": "undecodable: ",
    "notes.jpg": "undecodable: ",
    "bomb.png": "decompression-bomb guard",
    "tiny_40.jpg": "too small (40x40",
    "noface.jpg": "no face",
    "group.jpg": "ambiguous",
    "zz_exact_copy.jpg": "duplicate of ",
    "zz_near_copy.jpg": "near-duplicate of ",
    "loop": "symlink loop",
    "selfloop.jpg": "symlink loop",
    "pipe.jpg": "not a regular file",
}


def make_messy_folder(folder: str | os.PathLike) -> Path:
    """Write the bad-input corpus of issue 7 into `folder` (see MESSY_EXPECTED for what each entry is)."""
    import cv2
    import numpy as np
    from PIL import Image

    from tifactory.demo.photos import package_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    regular = composition("a")
    regular.save(folder / "regular.jpg", quality=92)
    composition("b").convert("CMYK").save(folder / "cmyk.jpg", quality=92)
    rgb16 = np.asarray(composition("c"), dtype=np.uint16) * 257
    cv2.imwrite(str(folder / "deep16.png"), np.ascontiguousarray(rgb16[..., ::-1]))  # 16 bits per channel
    palette = composition("d").convert("RGBA")
    alpha = Image.new("L", palette.size, 255)
    alpha.paste(0, (0, 0, 200, palette.height // 3))  # a transparent region away from the face
    palette.putalpha(alpha)
    palette.quantize(colors=255, method=Image.Quantize.FASTOCTREE).save(folder / "palette_transparent.png")
    composition("e").convert("L").save(folder / "grey.png")
    rgba = composition("f").convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size).point(lambda v: 128 + v // 2))
    rgba.save(folder / "rgba.png")
    first, second = composition("g"), Image.new("RGB", composition("g").size, (20, 40, 200))
    first.save(folder / "animated.gif", save_all=True, append_images=[second], duration=200, loop=0)
    composition("h").save(folder / "photo.webp", quality=90)
    composition("i").save(folder / "jpeg_named.png", format="JPEG", quality=90)  # a JPEG named .png
    upright = composition("j")
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(folder / "rotated_exif.jpg", quality=90, exif=exif.tobytes())
    composition("k").save(folder / NON_ASCII_NAME, quality=90)

    (folder / "empty.jpg").write_bytes(b"")
    whole = io.BytesIO()
    regular.save(whole, format="JPEG", quality=92)
    (folder / "truncated.jpg").write_bytes(whole.getvalue()[: len(whole.getvalue()) * 2 // 3])
    (folder / "notes.jpg").write_text("these are my notes, not a photo\n", encoding="utf-8")
    (folder / "bomb.png").write_bytes(bomb_png())
    regular.resize((40, 40), Image.Resampling.LANCZOS).save(folder / "tiny_40.jpg", quality=90)
    astronaut().crop((0, 330, 512, 512)).save(folder / "noface.jpg", quality=90)  # space suit, no face
    with Image.open(package_file("insightface", "data/images/t1.jpg")) as group:
        group.convert("RGB").save(folder / "group.jpg", quality=90)  # six people
    (folder / "zz_exact_copy.jpg").write_bytes((folder / "regular.jpg").read_bytes())
    regular.resize((400, 400), Image.Resampling.LANCZOS).save(folder / "zz_near_copy.jpg", quality=60)
    os.symlink(".", folder / "loop")  # a folder symlink back to the folder itself
    os.symlink("selfloop.jpg", folder / "selfloop.jpg")  # a file symlink to itself (ELOOP)
    os.mkfifo(folder / "pipe.jpg")  # a named pipe: opening it for reading would wait for a writer forever
    return folder


def make_demo_like_folder(folder: str | os.PathLike, keys: str = "abc") -> Path:
    """A few distinct good photos (for subjects that only need to train)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for key in keys:
        composition(key).save(folder / f"photo_{key}.jpg", quality=90)
    return folder


# ----------------------------------------------------------------------------- Snakemake workdirs

def write_workdir(root: str | os.PathLike, repo_config: dict, tiny_overrides: dict, rows: list[str],
                  **config_changes) -> Path:
    """Roster (`rows` are TSV lines after the header) + config (tiny demo overrides, YuNet) in `root`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "roster.tsv").write_text("subject\tclass_word\tsources\n" + "".join(r + "\n" for r in rows),
                                     encoding="utf-8")
    config = dict(repo_config, roster="roster.tsv", demo_overrides=tiny_overrides)
    # the same models on every machine (no insightface pack is used even where one is unpacked)
    config["faces"] = dict(repo_config["faces"], detector="yunet", recogniser="dlib")
    for key, value in config_changes.items():
        config[key] = value
    (root / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return root


def install_demo_model(root: str | os.PathLike, model_dir: str | os.PathLike) -> None:
    """Put an already built demo-tiny model where rule demo_model would build it (saves ~15 s per workdir)."""
    import shutil

    target = Path(root) / "resources" / "models" / "demo-tiny"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(model_dir, target)


# ----------------------------------------------------------------------------- the tiny roster, run once

TINY_ROSTER = {"eva": ("woman", "astronaut"), "tom": ("person", "t1person")}
TINY_TARGETS = [f"results/{subject}/{subject}-ti.safetensors" for subject in TINY_ROSTER] + \
    ["results/summary/crops.tsv"]
_REFERENCE: dict[str, Path] = {}


def long_overrides(tiny_overrides: dict) -> dict:
    """12 steps, a checkpoint and a resume state every 2: room to kill a run between two saves."""
    return dict(tiny_overrides, train=dict(tiny_overrides["train"], max_train_steps=12, save_every_n_steps=2))


def tiny_roster_workdir(root, repo_config: dict, tiny_overrides: dict) -> Path:
    """The demo's two subjects (photos derived from packaged images), trained at 256 px for 12 steps."""
    from tifactory.demo.photos import make_demo_photos

    rows = []
    for subject, (class_word, demo_subject) in TINY_ROSTER.items():
        make_demo_photos(demo_subject, Path(root) / "photos" / subject)
        rows.append(f"{subject}\t{class_word}\tphotos/{subject}")
    return write_workdir(root, repo_config, long_overrides(tiny_overrides), rows,
                         train=dict(repo_config["train"], resolution=256))


def reference_run(base: Path, repo_config: dict, tiny_overrides: dict) -> Path:
    """An uninterrupted run of the tiny roster from scratch (demo model included), made once per session.

    It runs in `base/tiny_run` and is then renamed to `base/tiny_reference`, so a second run can use the
    very same absolute path (the raw manifests record absolute source paths).
    """
    if "reference" not in _REFERENCE:
        run_dir = tiny_roster_workdir(base / "tiny_run", repo_config, tiny_overrides)
        run_snakemake(run_dir, *TINY_TARGETS)
        _REFERENCE["reference"] = run_dir.rename(base / "tiny_reference")
    return _REFERENCE["reference"]
