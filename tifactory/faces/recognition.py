"""Face recognisers: `embed(rgb, face) -> vector`, and the one threshold logic (`Metric`) every caller uses.

- dlib's ResNet descriptor (128-d; same person when the euclidean distance is below the threshold, 0.6 as
  dlib publishes it): the landmarks come from dlib's 5-point model run inside the detector's box, then dlib
  aligns a 150 px chip. Installs from PyPI with its data, no download: the default recogniser.
- insightface's ArcFace (512-d unit vectors; same person when the cosine is at least the threshold), aligned
  on the detector's 5 landmarks, from a local pack (never downloaded).

A `Metric` says how two embeddings compare, when that means "same person", how it reads in a log line
(`distance 0.71 > 0.60`) and the similarity used to rank likeness (cosine, or 1 - distance).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tifactory.faces.detection import Face, as_bgr


@dataclass(frozen=True)
class Metric:
    kind: str  # "distance" (euclidean; lower = more alike) | "cosine" (higher = more alike)
    threshold: float  # the model's own same-person threshold

    def __post_init__(self):
        if self.kind not in ("distance", "cosine"):
            raise ValueError(f"unknown metric {self.kind!r}")

    def compare(self, a, b) -> float:
        import numpy as np

        a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
        if self.kind == "distance":
            return float(np.linalg.norm(a - b))
        norms = float(np.linalg.norm(a) * np.linalg.norm(b))
        return float(a @ b) / norms if norms > 0 else 0.0

    def pairwise(self, vectors):
        """The metric between every two of `vectors` (an n x n array)."""
        import numpy as np

        vectors = np.asarray(vectors, dtype=np.float64)
        if self.kind == "distance":
            squared = (vectors ** 2).sum(axis=1)
            return np.sqrt(np.maximum(squared[:, None] + squared[None, :] - 2.0 * vectors @ vectors.T, 0.0))
        unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return unit @ unit.T

    def same(self, value):
        """Same person? (a float, or elementwise on a numpy array)"""
        return value < self.threshold if self.kind == "distance" else value >= self.threshold

    def similarity(self, value: float) -> float:
        """Higher = more alike, 0 = nothing alike (the likeness score of one image)."""
        return max(0.0, 1.0 - value) if self.kind == "distance" else value

    def explain(self, value: float) -> str:
        """`distance 0.71 > 0.60` / `cosine 0.21 < 0.40` (with the comparison that decided)."""
        t = self.threshold
        sign = "<" if value < t else ">" if value > t else "="
        return f"{self.kind} {value:.2f} {sign} {self.threshold:.2f}"

    def describe(self) -> str:
        rule = f"< {self.threshold:.2f}" if self.kind == "distance" else f">= {self.threshold:.2f}"
        return f"{'euclidean distance' if self.kind == 'distance' else 'cosine'}, same person {rule}"

    def mean(self, vectors):
        """The reference of several embeddings of one person: their mean (unit-length for cosine)."""
        import numpy as np

        vectors = np.asarray(vectors, dtype=np.float64)
        if self.kind == "cosine":
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
            mean = vectors.mean(axis=0)
            return mean / (np.linalg.norm(mean) or 1.0)
        return vectors.mean(axis=0)


class Recogniser:
    """The interface (duck-typed): `name`, `metric` and `embed(rgb, face)`; `label` for log lines."""

    name = "?"
    metric: Metric

    @property
    def label(self) -> str:
        return f"{self.name} ({self.metric.describe()})"

    def embed(self, rgb, face: Face):  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        """Release what the recogniser holds beyond memory (worker processes); a no-op for most."""


class DlibRecogniser(Recogniser):
    """dlib's face-recognition ResNet on a chip aligned by dlib's 5-point landmark model."""

    name = "dlib"

    def __init__(self, *, max_distance: float) -> None:
        import dlib

        from tifactory.faces.packs import dlib_model_files

        landmarks, descriptor = dlib_model_files()
        self._shape = dlib.shape_predictor(str(landmarks))
        self._net = dlib.face_recognition_model_v1(str(descriptor))
        self._rectangle = dlib.rectangle
        self.metric = Metric("distance", float(max_distance))

    def embed(self, rgb, face: Face):
        return self.embed_region(*dlib_region(rgb, face))

    def embed_region(self, region, box: tuple[int, int, int, int]):
        """The descriptor of the face at `box` (left, top, right, bottom) in `region` (uint8 RGB)."""
        import numpy as np

        shape = self._shape(region, self._rectangle(*box))
        return np.asarray(self._net.compute_face_descriptor(region, shape), dtype=np.float64)


def dlib_region(rgb, face: Face):
    """(region, box): the face's surroundings as contiguous uint8 RGB (the chip needs ~25 % around the
    landmarks' box) and the face box in that region's pixels, as dlib takes them."""
    import numpy as np

    image = np.asarray(rgb)
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    height, width = image.shape[:2]
    margin = max(face.w, face.h)
    x0, y0 = max(0, int(face.x - margin)), max(0, int(face.y - margin))
    x1, y1 = min(width, int(face.x + face.w + margin) + 1), min(height, int(face.y + face.h + margin) + 1)
    if x1 - x0 < 2 or y1 - y0 < 2:
        raise ValueError("the face box lies outside the image")
    region = np.ascontiguousarray(image[y0:y1, x0:x1, :3], dtype=np.uint8)
    box = (int(round(face.x - x0)), int(round(face.y - y0)),
           int(round(face.x + face.w - x0)), int(round(face.y + face.h - y0)))
    return region, box


class PooledDlibRecogniser(Recogniser):
    """dlib's descriptor computed in `processes` worker processes, for callers that embed from several
    threads: dlib keeps Python's GIL while its ResNet runs (~105 ms a face in the BLAS-less wheel), so threads
    take turns at it. The calling thread cuts the region (cheap) and waits without the GIL. Thread-safe.

    Linux forks the workers: they start at once, here, before the caller starts threads (forking a threaded
    process is unsafe), and import nothing anew; each loads dlib's two models itself. Where fork is not
    available or not safe (Windows, macOS) they are spawned: each starts a fresh Python that imports this module
    (and the job script as `__mp_main__`, so the scripts that use the pool guard their entry point with
    `if __name__ == "__main__":`), started when first needed, which spawning allows in a threaded process.
    """

    name = "dlib"

    def __init__(self, *, max_distance: float, processes: int, start_method: str | None = None) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.metric = Metric("distance", float(max_distance))
        self.start_method = start_method or self.default_start_method()
        self._pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context(self.start_method),
                                         initializer=_start_dlib_worker, initargs=(float(max_distance),))
        self._pool.submit(int).result()  # with fork every worker starts on the first task: all start now

    def embed(self, rgb, face: Face):
        region, box = dlib_region(rgb, face)
        return self._pool.submit(_dlib_worker_embed, region, box).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    @staticmethod
    def default_start_method() -> str:
        """fork on Linux (cheap, and safe before threads start); spawn elsewhere (Windows has no fork; macOS
        system libraries are not fork-safe)."""
        import sys

        return "fork" if sys.platform.startswith("linux") else "spawn"


_DLIB_WORKER: DlibRecogniser | None = None


def _start_dlib_worker(max_distance: float) -> None:
    global _DLIB_WORKER
    _DLIB_WORKER = DlibRecogniser(max_distance=max_distance)


def _dlib_worker_embed(region, box):
    return _DLIB_WORKER.embed_region(region, box)


class ArcFaceRecogniser(Recogniser):
    """insightface's ArcFace from a local pack, aligned on the detector's 5 landmarks."""

    def __init__(self, model_path: str | os.PathLike, *, min_cosine: float) -> None:
        from insightface.model_zoo import model_zoo

        self._model = model_zoo.get_model(os.fspath(model_path), providers=["CPUExecutionProvider"])
        if getattr(self._model, "taskname", None) != "recognition":
            raise FileNotFoundError(f"{model_path} is not an ArcFace recognition model")
        self._model.prepare(ctx_id=-1)
        self.name = f"arcface:{os.path.basename(os.path.dirname(os.fspath(model_path)))}"
        self.metric = Metric("cosine", float(min_cosine))

    def embed(self, rgb, face: Face):
        import numpy as np
        from insightface.utils import face_align

        if len(face.landmarks) != 5:
            raise ValueError("ArcFace needs the 5 face landmarks (the haar detector has none)")
        aligned = face_align.norm_crop(as_bgr(rgb), landmark=np.asarray(face.landmarks, dtype=np.float32),
                                       image_size=112)
        vector = np.asarray(self._model.get_feat(aligned), dtype=np.float64).ravel()
        return vector / (np.linalg.norm(vector) or 1.0)
