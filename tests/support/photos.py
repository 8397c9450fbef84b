"""Real photos that ship inside installed packages (scikit-image, insightface), for the tests."""

from __future__ import annotations

from PIL import Image

from tifactory.demo.photos import package_file


def package_photo(package: str, relative: str) -> Image.Image:
    """An RGB copy of `relative` inside installed `package` (e.g. "skimage", "data/astronaut.png")."""
    with Image.open(package_file(package, relative)) as image:
        return image.convert("RGB")


_RUN_KEYS = ("log", "workers", "recogniser", "reference_photos")


def crop_settings(**overrides):
    """The crop stage's settings from the repo's config.yaml with `overrides` (crop keys, or face keys:
    detector, recogniser, insightface_pack, det_score_threshold, ...). The identity filter is off unless a
    test turns it on: identity has its own tests (tests/faces/test_faces.py); the others test geometry."""
    from pathlib import Path

    import yaml

    from tifactory.photos.crop import CropSettings
    from tifactory.faces.models import FaceSettings

    with open(Path(__file__).resolve().parents[2] / "config.yaml", encoding="utf-8") as handle:
        config = yaml.safe_load(handle)
    faces = {key: overrides.pop(key) for key in list(overrides) if key in FaceSettings.__dataclass_fields__}
    overrides.setdefault("identity_filter", False)
    return CropSettings.from_config(config, faces=faces, **overrides)


def run_crop(raw_manifest, out_dir, manifest, **kwargs):
    """`crop_faces` with the repo config's settings; keyword arguments are settings overrides (see
    `crop_settings`) or crop_faces' own (log, workers, recogniser, reference_photos, a detector object)."""
    from tifactory.photos.crop import crop_faces

    run = {key: kwargs.pop(key) for key in _RUN_KEYS if key in kwargs}
    if "detector" in kwargs and not isinstance(kwargs["detector"], str):
        run["detector"] = kwargs.pop("detector")
    if run.get("recogniser") is not None:
        kwargs.setdefault("identity_filter", True)
    return crop_faces(raw_manifest, out_dir, manifest, crop_settings(**kwargs), **run)


def collect_settings(**overrides):
    """The collect stage's settings from the repo's config.yaml with `overrides` (collect keys)."""
    from pathlib import Path

    import yaml

    from tifactory.photos.collect import CollectSettings

    with open(Path(__file__).resolve().parents[2] / "config.yaml", encoding="utf-8") as handle:
        return CollectSettings.from_config(yaml.safe_load(handle), **overrides)
