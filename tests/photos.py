"""Real photos that ship inside installed packages (scikit-image, insightface), for the tests."""

from __future__ import annotations

from PIL import Image

from tifactory.demo import _package_file


def package_photo(package: str, relative: str) -> Image.Image:
    """An RGB copy of `relative` inside installed `package` (e.g. "skimage", "data/astronaut.png")."""
    with Image.open(_package_file(package, relative)) as image:
        return image.convert("RGB")
