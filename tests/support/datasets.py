"""A kohya dataset of fixed crops of scikit-image's astronaut photo (no face detector needed: fixed boxes), for
tests that train: one helper so the training, worker and seam tests build their data the same way."""

from __future__ import annotations

from pathlib import Path


def astronaut_dataset(root: Path, crops: list[tuple[tuple[int, int, int, int], tuple[int, int]]], *,
                      resolution: int, bucket: dict, repeats: int = 3) -> Path:
    """Crops (box in the 512 px photo, size to resize to) as a crops folder + manifest, then build_dataset for
    subject `eva` (class word `woman`). Returns dataset.toml."""
    import pandas as pd
    from PIL import Image
    from skimage import data

    from tifactory.photos.dataset import build_dataset

    folder = root / "crops"
    folder.mkdir(parents=True)
    astronaut = Image.fromarray(data.astronaut())
    rows = []
    for index, (box, size) in enumerate(crops):
        name = f"{index:03d}_astronaut.png"
        astronaut.crop(box).resize(size).save(folder / name)
        rows.append({"source": "astronaut.png", "status": "kept", "reason": "", "output": name})
    pd.DataFrame(rows).to_csv(folder / "manifest.tsv", sep="\t", index=False)
    return build_dataset(crops_manifest=folder / "manifest.tsv", crops_dir=folder, dataset_dir=root / "dataset",
                         subject="eva", class_word="woman", repeats=repeats, resolution=resolution, bucket=bucket)
