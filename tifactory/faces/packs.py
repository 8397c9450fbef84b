"""Where the face models' files are: insightface's optional local pack and dlib's installed data package.

Both are located by path only (cheap enough for DAG time: no insightface, dlib or onnx import here).

- insightface pack: a folder of ONNX files (`faces.insightface_pack`, e.g. ~/.insightface/models/buffalo_l);
  never downloaded. Its detector is `det_*.onnx` or `*scrfd*.onnx`; its ArcFace recogniser `w600k_*.onnx`,
  `glintr*.onnx` (antelopev2) or `*arcface*.onnx`.
- dlib: the `dlib-bin` wheel plus the `face-recognition-models` data package, whose files are found through
  the installed distribution's file list (its `__init__` imports `pkg_resources`, which new setuptools lack,
  so it is never imported). Only the 5-point landmark model (public domain) and the ResNet descriptor are used.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

DLIB_DATA_PACKAGE = "face-recognition-models"
DLIB_LANDMARKS = "shape_predictor_5_face_landmarks.dat"
DLIB_DESCRIPTOR = "dlib_face_recognition_resnet_model_v1.dat"
_DETECTION_PATTERNS = ("det_*.onnx", "*scrfd*.onnx")
_RECOGNITION_PATTERNS = ("w600k_*.onnx", "glintr*.onnx", "*arcface*.onnx")


@dataclass(frozen=True)
class PackStatus:
    folder: Path
    detection: Path | None  # the detection model, None when absent
    recognition: Path | None  # the ArcFace model, None when absent
    message: str  # one plain sentence for the log


def pack_folder(pack: str | os.PathLike) -> Path:
    return Path(os.path.expanduser(os.fspath(pack)))


def _first(folder: Path, patterns) -> Path | None:
    for pattern in patterns:
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
    return None


def pack_status(pack: str | os.PathLike) -> PackStatus:
    """What the insightface pack folder holds, and one sentence that says it (no model is loaded)."""
    folder = pack_folder(pack)
    if importlib.util.find_spec("insightface") is None:
        return PackStatus(folder, None, None, "insightface is not installed")
    if not folder.is_dir():
        return PackStatus(folder, None, None, f"no insightface model pack at {folder} (never downloaded; unpack "
                                              f"e.g. buffalo_l.zip there to use SCRFD + ArcFace)")
    detection, recognition = _first(folder, _DETECTION_PATTERNS), _first(folder, _RECOGNITION_PATTERNS)
    held = [f"detection {detection.name}" if detection else "no detection model (det_*.onnx)",
            f"recognition {recognition.name}" if recognition else "no recognition model (w600k_*.onnx)"]
    return PackStatus(folder, detection, recognition, f"insightface pack {folder}: " + ", ".join(held))


def dlib_model_files() -> tuple[Path, Path]:
    """(5-point landmark model, ResNet descriptor model) of the installed `face-recognition-models`;
    FileNotFoundError with the fix when dlib or the data package is missing."""
    import importlib.metadata

    if importlib.util.find_spec("dlib") is None:
        raise FileNotFoundError("dlib is not installed: pip install the pinned dlib-bin from requirements.txt")
    try:
        distribution = importlib.metadata.distribution(DLIB_DATA_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"dlib's face models are not installed: pip install the pinned {DLIB_DATA_PACKAGE} "
                                "from requirements.txt") from None
    found = {}
    for entry in distribution.files or []:
        if entry.name in (DLIB_LANDMARKS, DLIB_DESCRIPTOR):
            found[entry.name] = Path(distribution.locate_file(entry))
    missing = [name for name in (DLIB_LANDMARKS, DLIB_DESCRIPTOR) if name not in found or not found[name].is_file()]
    if missing:
        raise FileNotFoundError(f"{DLIB_DATA_PACKAGE} is installed but lacks {', '.join(missing)} "
                                "(reinstall the pinned version from requirements.txt)")
    return found[DLIB_LANDMARKS], found[DLIB_DESCRIPTOR]
