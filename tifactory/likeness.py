"""Likeness scores: how much each checkpoint's samples look like the subject.

For every kept training crop, the recogniser's embedding of its largest face is L2-normalised; their mean
(normalised again) is the subject's reference. For every sample image, the largest face's normalised
embedding is compared with the reference by cosine similarity. Per step:

* `face_share` = images with a detected face / images;
* `likeness`   = mean cosine over the images with a face (empty when none has one);
* `score`      = sum of cosines / all images (an image without a face counts 0), the ranking key.

The best step is the checkpoint (step > 0) with the highest score; ties go to the earlier step (less
over-training). Step 0 (the init word alone) is the baseline row. The recogniser is anything with
`faces(rgb_uint8_array) -> list[Face]`; `InsightfaceRecogniser` wraps a local insightface model pack
(never downloaded). Without a pack the stage writes the tables with `status = not scored` and says why.

Parse-time cheap: numpy/PIL/insightface are imported inside the functions.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from tifactory.fileio import atomic_path, read_tsv_rows, write_text_atomic

SCORE_COLUMNS = ("step", "images", "faces", "face_share", "likeness", "score", "best", "status")


@dataclass
class Face:
    box: tuple[float, float, float, float]  # x, y, w, h in pixels
    embedding: object  # 1-D numpy array


class Recogniser(Protocol):
    name: str

    def faces(self, rgb) -> list[Face]: ...


def normalise(vector):
    import numpy as np

    vector = np.asarray(vector, dtype=np.float64)
    norm = np.linalg.norm(vector)
    if not np.isfinite(norm) or norm == 0:
        raise ValueError("cannot normalise a zero or non-finite embedding")
    return vector / norm


def cosine(a, b) -> float:
    import numpy as np

    return float(np.dot(normalise(a), normalise(b)))


def largest_face(faces: list[Face]) -> Face | None:
    return max(faces, key=lambda face: face.box[2] * face.box[3]) if faces else None


def load_rgb(path: str | os.PathLike):
    import numpy as np
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


def reference_embedding(recogniser: Recogniser, crop_paths: list[Path]) -> tuple[object, int]:
    """Mean of the normalised embeddings of the largest face in each crop, normalised; and how many crops
    had a face. Raises ValueError when none has."""
    embeddings = []
    for path in crop_paths:
        face = largest_face(recogniser.faces(load_rgb(path)))
        if face is not None:
            embeddings.append(normalise(face.embedding))
    if not embeddings:
        raise ValueError(f"the recogniser found no face in any of the {len(crop_paths)} training crops")
    import numpy as np

    return normalise(np.mean(embeddings, axis=0)), len(embeddings)


def score_images(recogniser: Recogniser, reference, images: list[tuple[int, Path]]) -> list[dict]:
    """One row per sample image: step, file, face (bool), cosine (None without a face)."""
    rows = []
    for step, path in images:
        face = largest_face(recogniser.faces(load_rgb(path)))
        rows.append({"step": step, "file": Path(path).name, "face": face is not None,
                     "cosine": None if face is None else cosine(face.embedding, reference)})
    return rows


def summarise(image_rows: list[dict]) -> list[dict]:
    """Per-step face share, likeness, score; the best checkpoint marked."""
    steps = sorted({row["step"] for row in image_rows})
    summary = []
    for step in steps:
        rows = [row for row in image_rows if row["step"] == step]
        cosines = [row["cosine"] for row in rows if row["face"]]
        summary.append({"step": step, "images": len(rows), "faces": len(cosines),
                        "face_share": len(cosines) / len(rows),
                        "likeness": sum(cosines) / len(cosines) if cosines else None,
                        "score": sum(cosines) / len(rows), "best": False, "status": "scored"})
    best = best_step(summary)
    for row in summary:
        row["best"] = row["step"] == best
    return summary


def best_step(summary: list[dict]) -> int | None:
    """The checkpoint (step > 0) with the highest score; ties -> the earliest; None without checkpoints."""
    candidates = [row for row in summary if row["step"] > 0 and row["faces"] > 0]
    if not candidates:
        return None
    return max(candidates, key=lambda row: (row["score"], -row["step"]))["step"]


def read_images_table(images_tsv: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, image path) from the samples stage's images.tsv."""
    images_tsv = Path(images_tsv)
    return [(int(cells["step"]), images_tsv.parent / cells["file"])
            for cells in read_tsv_rows(images_tsv, "sample image table")]


def kept_crops(crops_dir: str | os.PathLike) -> list[Path]:
    """The kept crops listed in the crop manifest."""
    rows = read_tsv_rows(Path(crops_dir) / "manifest.tsv", "crop manifest")
    return [Path(crops_dir) / cells["output"] for cells in rows
            if cells.get("status") == "kept" and cells.get("output")]


# ---------------------------------------------------------------------------------------------
# insightface
# ---------------------------------------------------------------------------------------------


def insightface_pack_dir(pack: str, root: str = "") -> Path:
    """Where a model pack would be: `pack` itself if it is a folder, else <root or ~/.insightface>/models/<pack>."""
    direct = Path(pack).expanduser()
    if direct.is_dir():
        return direct
    return Path(root or "~/.insightface").expanduser() / "models" / pack


def insightface_pack_available(pack: str, root: str = "") -> bool:
    """Cheap check (parse time): the pack folder exists and holds .onnx files."""
    folder = insightface_pack_dir(pack, root)
    return folder.is_dir() and any(folder.glob("*.onnx"))


class InsightfaceRecogniser:
    """Detection + recognition from a local insightface model pack (e.g. buffalo_l); never downloads."""

    def __init__(self, pack: str, root: str = "", det_size: int = 640):
        folder = insightface_pack_dir(pack, root)
        if not insightface_pack_available(pack, root):
            raise FileNotFoundError(f"insightface model pack not found: {folder} (no .onnx files)")
        from insightface.app import FaceAnalysis

        self.name = f"insightface:{folder.name}"
        try:
            self.app = FaceAnalysis(name=str(folder), allowed_modules=["detection", "recognition"],
                                    providers=["CPUExecutionProvider"])
        except (AssertionError, KeyError) as error:  # insightface asserts (bare) that a detector was found
            raise FileNotFoundError(f"insightface model pack {folder} has no detection model") from error
        if "recognition" not in self.app.models:
            raise FileNotFoundError(f"insightface model pack {folder} has no recognition model")
        self.app.prepare(ctx_id=-1, det_size=(det_size, det_size))

    def faces(self, rgb) -> list[Face]:
        found = []
        for face in self.app.get(rgb[:, :, ::-1].copy()):  # insightface wants BGR
            embedding = getattr(face, "normed_embedding", None)
            if embedding is None:
                continue
            x0, y0, x1, y1 = (float(v) for v in face.bbox)
            found.append(Face(box=(x0, y0, x1 - x0, y1 - y0), embedding=embedding))
        return found


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def write_scores(path: str | os.PathLike, summary: list[dict]) -> None:
    lines = ["\t".join(SCORE_COLUMNS)]
    lines += ["\t".join(_cell(row[column]) for column in SCORE_COLUMNS) for row in summary]
    write_text_atomic(path, "\n".join(lines) + "\n")


def score_subject(*, subject: str, images_tsv: str | os.PathLike, crops_dir: str | os.PathLike,
                  checkpoint_dir: str | os.PathLike, scores_tsv: str | os.PathLike, plot_png: str | os.PathLike,
                  summary_json: str | os.PathLike, recogniser: Recogniser | None = None, reason: str = "",
                  log: Callable[[str], None] = print) -> dict:
    """Score every step's samples against the training crops (or record why not); write scores.tsv,
    the likeness plot and a JSON summary (scored, reason, best_step, best_checkpoint)."""
    from tifactory.plots import line_plot

    images = read_images_table(images_tsv)
    steps = sorted({step for step, _ in images})
    result = {"subject": subject, "scored": False, "reason": reason, "recogniser": "", "best_step": None,
              "best_checkpoint": "", "reference_faces": 0}
    summary = [{"step": step, "images": sum(1 for s, _ in images if s == step), "faces": None,
                "face_share": None, "likeness": None, "score": None, "best": False,
                "status": "not scored"} for step in steps]
    if recogniser is not None:
        crops = kept_crops(crops_dir)
        try:
            reference, used = reference_embedding(recogniser, crops)
        except ValueError as error:
            result["reason"] = str(error)
        else:
            summary = summarise(score_images(recogniser, reference, images))
            best = best_step(summary)
            result.update(scored=True, reason="", recogniser=recogniser.name, best_step=best,
                          reference_faces=used)
            if best is not None:
                from tifactory.samples import list_checkpoints

                by_step = dict(list_checkpoints(checkpoint_dir))
                result["best_checkpoint"] = str(by_step[best]) if best in by_step else ""
            else:
                result["reason"] = "no checkpoint's samples had a detectable face"
    write_scores(scores_tsv, summary)
    if result["scored"]:
        marker = result["best_step"]
        line_plot(plot_png, [
            {"label": "likeness (cosine)", "x": [r["step"] for r in summary], "y": [r["likeness"] for r in summary],
             "points": True},
            {"label": "face share", "x": [r["step"] for r in summary], "y": [r["face_share"] for r in summary],
             "points": True}],
            title=f"{subject}: likeness to the training crops vs step ({result['recogniser']})",
            xlabel="step", ylabel="cosine / share", marker_x=marker,
            marker_label=f"best: step {marker}" if marker is not None else "",
            note="" if marker is not None else result["reason"])
        log(f"likeness scored with {result['recogniser']} against {result['reference_faces']} crop faces; "
            f"best step: {result['best_step']}")
    else:
        message = f"likeness NOT scored: {result['reason']}"
        line_plot(plot_png, [], title=f"{subject}: likeness vs step", xlabel="step", ylabel="cosine",
                  note=message)
        log(message)
    write_text_atomic(summary_json, json.dumps(result, indent=2, sort_keys=True) + "\n")
    return result


def copy_best(summary_json: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Copy the best checkpoint named by the likeness summary to `out_path` (fails clearly when unscored)."""
    result = json.loads(Path(summary_json).read_text(encoding="utf-8"))
    if not result.get("scored") or not result.get("best_checkpoint"):
        raise FileNotFoundError(f"no best step for subject {result.get('subject')!r}: likeness was not scored "
                                f"({result.get('reason') or 'no best checkpoint'})")
    with atomic_path(out_path) as tmp_path:
        shutil.copyfile(result["best_checkpoint"], tmp_path)
    return Path(out_path)
