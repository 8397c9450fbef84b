"""Kohya dataset layout: `{repeats}_{subject} {class_word}/` + a `dataset.toml` for `--dataset_config`."""

from __future__ import annotations

import json
import os
import shutil
import tomllib
from pathlib import Path

import pandas as pd

from tifactory.fileio import atomic_path, write_text_atomic
from tifactory.errors import TifactoryError


# the caption file kohya's --dataset_config (caption_extension) and the caption template read beside an image
CAPTION_EXTENSION = ".txt"


class DatasetError(TifactoryError, ValueError):
    """The subject has no usable images; the message carries the crop stage's rejection summary."""


def image_folder_name(repeats: int, subject: str, class_word: str) -> str:
    return f"{repeats}_{subject} {class_word}"


def _toml_string(value: str) -> str:
    # A JSON string literal is a valid TOML basic string (same escapes, \uXXXX included).
    return json.dumps(value, ensure_ascii=False)


def dataset_toml_text(*, image_dir: str, repeats: int, class_tokens: str, resolution: int,
                      bucket: dict) -> str:
    """kohya sd-scripts dataset config (DreamBooth-style subset, one folder)."""
    lines = [
        "# kohya sd-scripts --dataset_config; written by tifactory",
        "[general]",
        f"enable_bucket = {str(bucket['enable_bucket']).lower()}",
        f"min_bucket_reso = {bucket['min_bucket_reso']}",
        f"max_bucket_reso = {bucket['max_bucket_reso']}",
        f"bucket_reso_steps = {bucket['bucket_reso_steps']}",
        f"bucket_no_upscale = {str(bucket['bucket_no_upscale']).lower()}",
        "shuffle_caption = false",
        f"caption_extension = {_toml_string(CAPTION_EXTENSION)}",
        "",
        "[[datasets]]",
        f"resolution = {resolution}",
        "batch_size = 1",
        "",
        "  [[datasets.subsets]]",
        f"  image_dir = {_toml_string(image_dir)}",
        f"  num_repeats = {repeats}",
        f"  class_tokens = {_toml_string(class_tokens)}",
        "",
    ]
    return "\n".join(lines)


def summarize_rejections(manifest: pd.DataFrame) -> str:
    """`reason xN; ...` by reason category (as results/summary/crops.tsv counts them), most frequent first."""
    from tifactory.summary import count_reasons

    rejected = manifest[manifest["status"] == "rejected"]
    if rejected.empty:
        return "no photos at all"
    return "; ".join(f"{reason} x{count}" for reason, count in count_reasons(rejected["reason"].fillna("")).items())


def build_dataset(*, crops_manifest: str | os.PathLike, crops_dir: str | os.PathLike,
                  dataset_dir: str | os.PathLike, subject: str, class_word: str, repeats: int,
                  resolution: int, bucket: dict) -> Path:
    """Copy kept crops into the kohya folder and write dataset.toml; return the toml path.

    The toml names its image folder by absolute path: kohya resolves a relative image_dir against its own
    working directory (run from its own checkout it would find no images).
    Captions (`<stem>.txt` beside a kept image in crops_dir, e.g. from a prepared dataset) are copied too.
    """
    manifest = pd.read_csv(crops_manifest, sep="\t", dtype=str, keep_default_na=False)
    kept = manifest[manifest["status"] == "kept"]
    if kept.empty:
        raise DatasetError(f"subject {subject!r}: no usable photos "
                           f"({len(manifest)} rejected: {summarize_rejections(manifest)})")
    dataset_dir = Path(dataset_dir)
    image_dir = dataset_dir / image_folder_name(repeats, subject, class_word)
    if image_dir.exists():
        shutil.rmtree(image_dir)
    image_dir.mkdir(parents=True)
    for name in kept["output"]:
        source = Path(crops_dir) / name
        with atomic_path(image_dir / Path(name).name) as tmp_path:
            shutil.copyfile(source, tmp_path)
        caption = source.with_suffix(CAPTION_EXTENSION)
        if caption.is_file():
            with atomic_path(image_dir / caption.name) as tmp_path:
                shutil.copyfile(caption, tmp_path)
    toml_path = dataset_dir / "dataset.toml"
    write_text_atomic(toml_path, dataset_toml_text(
        image_dir=os.path.abspath(image_dir), repeats=repeats, class_tokens=f"{subject} {class_word}",
        resolution=resolution, bucket=bucket))
    return toml_path


IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def read_dataset_toml(toml_path: str | os.PathLike) -> list[dict]:
    """Parse a kohya dataset config into subsets: [{image_dir, num_repeats, images: [...]}].

    Relative image_dir values are resolved against the current working directory (kohya's rule).
    """
    with open(toml_path, "rb") as handle:
        config = tomllib.load(handle)
    subsets = []
    for dataset in config.get("datasets", []):
        for subset in dataset.get("subsets", []):
            image_dir = Path(subset["image_dir"])
            images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            subsets.append({"image_dir": image_dir, "num_repeats": int(subset.get("num_repeats", 1)),
                            "images": images})
    return subsets
