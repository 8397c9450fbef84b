"""Likeness scores: how much each checkpoint's samples look like the subject.

The face models are the crop stage's (tifactory.faces: config `faces:`; dlib's descriptor by default, ArcFace
when an insightface pack is there). For every kept training crop, the recogniser embeds its largest face; the
recogniser's metric averages them into the subject's reference. For every sample image, the largest face is
compared with the reference in that model's own metric (dlib: euclidean distance, ArcFace: cosine). Per step:

* `face_share`  = images with a detected face / images;
* `likeness`    = mean metric value over the images with a face (a distance or a cosine: see `metric`);
* `same_person` = images whose face the model calls the subject (its own threshold);
* `score`       = mean per-image similarity (cosine, or 1 - distance), an image without a face counting 0
                  (the convention of published identity metrics): the ranking key.

The best step is the checkpoint (step > 0) with the highest score; ties go to the earlier step (less
over-training). Step 0 (the init word alone) is the baseline row. When no checkpoint's samples hold a face,
every score is 0 and no step is better than another: the subject is "not scored" and has no best step (the
workflow then builds no `S-ti-best.safetensors`: rules/samples_functions.smk reads `best_step` from the
likeness summary, a checkpoint).

Parse-time cheap: numpy/PIL/dlib/insightface are imported inside the functions.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

from tifactory.faces import load_rgb
from tifactory.faces.models import FaceModels
from tifactory.fileio import atomic_path, read_tsv_rows, write_text_atomic

SCORE_COLUMNS = ("step", "images", "faces", "face_share", "likeness", "same_person", "score", "best", "status",
                 "model", "metric")


def largest_face_embedding(models: FaceModels, path: str | os.PathLike):
    """The recogniser's embedding of the largest face in the image at `path`, None without a face."""
    pixels = load_rgb(path)
    faces = models.detector().detect(pixels)
    return models.recogniser().embed(pixels, faces[0]) if faces else None


def _embed_all(models: FaceModels, paths: list, workers: int) -> list:
    if workers > 1 and len(paths) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(lambda path: largest_face_embedding(models, path), paths))
    return [largest_face_embedding(models, path) for path in paths]


def reference_embedding(models: FaceModels, crop_paths: list[Path], workers: int = 1) -> tuple[object, int]:
    """The metric's mean of the largest faces' embeddings in the crops, and how many crops had a face.
    Raises ValueError when none has."""
    embeddings = [e for e in _embed_all(models, crop_paths, workers) if e is not None]
    if not embeddings:
        raise ValueError(f"the detector found no face in any of the {len(crop_paths)} training crops")
    return models.recogniser().metric.mean(embeddings), len(embeddings)


def score_images(models: FaceModels, reference, images: list[tuple[int, Path]], workers: int = 1) -> list[dict]:
    """One row per sample image: step, file, face (bool), value (the metric's, None without a face),
    similarity (0 without a face), same (bool)."""
    metric = models.recogniser().metric
    rows = []
    embeddings = _embed_all(models, [path for _, path in images], workers)
    for (step, path), embedding in zip(images, embeddings):
        value = None if embedding is None else metric.compare(embedding, reference)
        rows.append({"step": step, "file": Path(path).name, "face": value is not None, "value": value,
                     "similarity": 0.0 if value is None else metric.similarity(value),
                     "same": value is not None and metric.same(value)})
    return rows


def summarise(image_rows: list[dict], model: str, metric: str) -> list[dict]:
    """Per-step face share, likeness, same-person count, score; the best checkpoint marked."""
    steps = sorted({row["step"] for row in image_rows})
    summary = []
    for step in steps:
        rows = [row for row in image_rows if row["step"] == step]
        values = [row["value"] for row in rows if row["face"]]
        summary.append({"step": step, "images": len(rows), "faces": len(values),
                        "face_share": len(values) / len(rows),
                        "likeness": sum(values) / len(values) if values else None,
                        "same_person": sum(1 for row in rows if row["same"]),
                        "score": sum(row["similarity"] for row in rows) / len(rows), "best": False,
                        "status": "scored", "model": model, "metric": metric})
    best = best_step(summary)
    for row in summary:
        row["best"] = row["step"] == best
    return summary


def best_step(summary: list[dict]) -> int | None:
    """The checkpoint (step > 0) with the highest score; ties -> the earliest; None without checkpoints."""
    candidates = [row for row in summary if row["step"] > 0 and row["score"] is not None]
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
                  summary_json: str | os.PathLike, settings=None, detector=None, recogniser=None,
                  workers: int = 1, log: Callable[[str], None] = print) -> dict:
    """Score every step's samples against the training crops; write scores.tsv, the likeness plot and a JSON
    summary (scored, reason, recogniser, metric, threshold, best_step, best_checkpoint). The models are the
    configured ones (`settings`: tifactory.faces.models.FaceSettings) unless `detector`/`recogniser` are given;
    `workers` threads embed the images (each with its own models)."""
    from tifactory.sampling.plots import line_plot

    models = FaceModels(settings, detector=detector, recogniser=recogniser)
    log(models.detector_note)
    log(models.recogniser_note)
    recogniser = models.recogniser()
    metric = recogniser.metric
    images = read_images_table(images_tsv)
    steps = sorted({step for step, _ in images})
    result = {"subject": subject, "scored": False, "reason": "", "recogniser": recogniser.label,
              "metric": metric.kind, "threshold": metric.threshold, "best_step": None, "best_checkpoint": "",
              "reference_faces": 0}
    summary = [{"step": step, "images": sum(1 for s, _ in images if s == step), "faces": None,
                "face_share": None, "likeness": None, "same_person": None, "score": None, "best": False,
                "status": "not scored", "model": recogniser.name, "metric": metric.kind} for step in steps]
    try:
        reference, used = reference_embedding(models, kept_crops(crops_dir), workers)
    except ValueError as error:
        result["reason"] = str(error)
    else:
        summary = summarise(score_images(models, reference, images, workers), recogniser.name, metric.kind)
        checkpoint_rows = [row for row in summary if row["step"] > 0]
        if checkpoint_rows and not any(row["faces"] for row in checkpoint_rows):
            # every score is 0: any "best" step would be an arbitrary pick, so there is none
            for row in summary:
                row["best"] = False
                row["status"] = "no face"
            images_seen = sum(row["images"] for row in checkpoint_rows)
            result.update(reference_faces=used, reason=(
                f"no face in any sample of the {len(checkpoint_rows)} checkpoint(s) ({images_seen} images): "
                "likeness not scored, no best step"))
        else:
            best = best_step(summary)
            result.update(scored=True, best_step=best, reference_faces=used)
            if best is None:
                result["reason"] = "no checkpoint to choose from"
            else:
                from tifactory.training.embedding import list_checkpoints

                by_step = dict(list_checkpoints(checkpoint_dir))
                result["best_checkpoint"] = str(by_step[best]) if best in by_step else ""
    write_scores(scores_tsv, summary)
    if result["scored"] or result["reference_faces"]:
        marker = result["best_step"]
        line_plot(plot_png, [
            {"label": "score (mean similarity, no face = 0)", "x": [r["step"] for r in summary],
             "y": [r["score"] for r in summary], "points": True},
            {"label": "face share", "x": [r["step"] for r in summary], "y": [r["face_share"] for r in summary],
             "points": True}],
            title=f"{subject}: likeness to the training crops vs step ({recogniser.name}, {metric.kind})",
            xlabel="step", ylabel="similarity / share", marker_x=marker, ylim=(0.0, 1.0),
            marker_label=f"best: step {marker}" if marker is not None else "", note=result["reason"])
        if result["scored"]:
            log(f"likeness scored with {recogniser.label} against {result['reference_faces']} crop faces; "
                f"best step: {result['best_step']}" + (f" ({result['reason']})" if result["reason"] else ""))
        else:
            log(f"likeness NOT scored ({recogniser.label}): {result['reason']}")
    else:
        message = f"likeness NOT scored ({recogniser.label}): {result['reason']}"
        line_plot(plot_png, [], title=f"{subject}: likeness vs step", xlabel="step", ylabel="similarity",
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
