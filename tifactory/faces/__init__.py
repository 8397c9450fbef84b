"""The face subsystem: detection and recognition for the crop stage and the likeness scores alike.

- `detection`: one `Face` type (box, score, 5 landmarks) and the detectors (YuNet, insightface SCRFD, Haar).
- `recognition`: the recognisers (dlib's ResNet descriptor, insightface's ArcFace) and `Metric`, the one
  threshold logic (euclidean distance or cosine, each model with its own same-person threshold).
- `models`: config's `faces:` section (`FaceSettings`), the registry (`auto`: insightface when a local pack
  holds the model, else YuNet + dlib, which install from PyPI with no download) and its DAG-time checks.
- `packs`: where the model files are (insightface pack folder, dlib's data package), by path only.
- `identity`: the subject's reference identity (reference photos, else the majority) and the check.
- `load_rgb` (here): the one image loader (EXIF-upright RGB array, see tifactory.photos.imageio).

Parse-time cheap: no numpy, cv2, dlib or insightface import at module level.
"""

from __future__ import annotations

import os

from tifactory.faces.detection import Face

__all__ = ["Face", "load_rgb", "short_error"]


def load_rgb(path: str | os.PathLike, *, min_long_side: int | None = None, max_pixels: int | None = None):
    """An EXIF-upright RGB uint8 array of `path` (JPEGs decoded at reduced scale down to `min_long_side`)."""
    import numpy as np

    from tifactory.photos.imageio import open_upright

    return np.asarray(open_upright(path, min_long_side=min_long_side, max_pixels=max_pixels)[0])


def short_error(exc: BaseException) -> str:
    """`Type: message` on one line, at most 120 characters (for reject reasons and log lines)."""
    message = " ".join((str(exc) or type(exc).__name__).split())
    message = f"{type(exc).__name__}: {message}"
    return message[:117] + "..." if len(message) > 120 else message
