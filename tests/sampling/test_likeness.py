"""Likeness maths with stand-in models: the 'face' is the whole image where it is not black, and its
'embedding' is its mean colour minus grey (so the metric, the reference, the scores and the best-step choice are
real; tests/faces/test_faces.py drives the real dlib recogniser)."""

from __future__ import annotations


import numpy as np
import pytest
from PIL import Image

from tifactory.faces import Face
from tifactory.faces.models import FaceModels
from tifactory.faces.recognition import Metric, Recogniser
from tifactory.sampling.likeness import copy_best, reference_embedding, score_subject, summarise


class WholeImageDetector:
    name = "stand-in"
    max_side = 64

    def detect(self, rgb):
        if rgb.max() == 0:
            return []
        height, width = rgb.shape[:2]
        return [Face(0, 0, width, height, 1.0, ()), Face(0, 0, 2, 2, 1.0, ())]  # largest first


class ColourRecogniser(Recogniser):
    name = "stand-in colour recogniser"
    metric = Metric("cosine", 0.9)

    def embed(self, rgb, face):
        return rgb[int(face.y):int(face.y + face.h), int(face.x):int(face.x + face.w)].reshape(-1, 3).mean(0) - 100.0


MODELS = dict(detector=WholeImageDetector(), recogniser=ColourRecogniser())


def save(path, colour):
    Image.new("RGB", (16, 16), colour).save(path)
    return path


def test_reference_is_normalised_mean_of_normalised_embeddings(tmp_path):
    crops = [save(tmp_path / "a.png", (200, 100, 100)), save(tmp_path / "b.png", (100, 300 - 100, 100)),
             save(tmp_path / "c.png", (0, 0, 0))]
    reference, used = reference_embedding(FaceModels(None, **MODELS), crops)
    assert used == 2
    np.testing.assert_allclose(reference, np.array([1, 1, 0]) / np.sqrt(2), atol=1e-9)
    assert ColourRecogniser.metric.compare([1, 0, 0], reference) == pytest.approx(1 / np.sqrt(2))
    with pytest.raises(ValueError, match="no face"):
        reference_embedding(FaceModels(None, **MODELS), [crops[2]], workers=2)
    # a distance model's reference is the plain mean (dlib's descriptors are compared by euclidean distance)
    np.testing.assert_allclose(Metric("distance", 0.6).mean([[0, 2], [2, 0]]), [1, 1])


def _image(step, distance):
    metric = Metric("distance", 0.6)
    if distance is None:
        return {"step": step, "face": False, "value": None, "similarity": 0.0, "same": False}
    return {"step": step, "face": True, "value": distance, "similarity": metric.similarity(distance),
            "same": metric.same(distance)}


def test_summary_scores_and_best_step():
    """dlib distances: similarity = 1 - distance, an image without a face scores 0."""
    rows = [_image(0, 0.9), _image(0, 0.7), _image(10, 0.1), _image(10, None), _image(20, 0.4), _image(20, 0.5),
            _image(30, 0.4), _image(30, 0.5)]
    summary = {row["step"]: row for row in summarise(rows, "dlib", "distance")}
    assert summary[10]["face_share"] == 0.5 and summary[10]["likeness"] == pytest.approx(0.1)
    assert summary[10]["score"] == pytest.approx(0.45) and summary[10]["same_person"] == 1
    assert summary[20]["score"] == pytest.approx(0.55) and summary[0]["same_person"] == 0
    assert [step for step, row in summary.items() if row["best"]] == [20]  # tie with 30 -> earlier step
    assert {row["model"] for row in summary.values()} == {"dlib"}


def test_score_subject_end_to_end(tmp_path):
    crops = tmp_path / "crops"
    crops.mkdir()
    save(crops / "000.png", (200, 100, 100))
    (crops / "manifest.tsv").write_text("source\tstatus\treason\toutput\nx.jpg\tkept\t\t000.png\n"
                                        "y.jpg\trejected\tno face\t\n")
    samples = tmp_path / "samples"
    samples.mkdir()
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    colours = {0: [(100, 200, 100), (100, 200, 100)], 10: [(180, 110, 100), (0, 0, 0)],
               20: [(190, 100, 100), (150, 150, 100)]}
    lines = ["step\tcolumn\tfile"]
    for step, pair in colours.items():
        for column, colour in enumerate(pair):
            save(samples / f"s{step}_{column}.png", colour)
            lines.append(f"{step}\t{column}\ts{step}_{column}.png")
        if step:
            (checkpoints / f"eva-ti-step{step:08d}.safetensors").write_bytes(f"step {step}".encode())
    (samples / "images.tsv").write_text("\n".join(lines) + "\n")
    paths = dict(scores_tsv=samples / "scores.tsv", plot_png=samples / "likeness.png",
                 summary_json=samples / "likeness.json")
    result = score_subject(subject="eva", images_tsv=samples / "images.tsv", crops_dir=crops,
                           checkpoint_dir=checkpoints, **MODELS, **paths)
    # step 10: cos 1 (0.8,0.1,0 vs 1,0,0 direction ~0.99) + no face -> score ~0.5; step 20: ~1 and ~0.71 -> best
    assert result["scored"] and result["best_step"] == 20 and result["reference_faces"] == 1
    table = [line.split("\t") for line in paths["scores_tsv"].read_text().splitlines()]
    assert table[0] == ["step", "images", "faces", "face_share", "likeness", "same_person", "score", "best", "status",
                        "model", "metric"]
    assert table[2][:4] == ["10", "2", "1", "0.5000"] and table[3][7] == "yes"
    assert table[1][9:] == ["stand-in colour recogniser", "cosine"]
    assert result["recogniser"] == "stand-in colour recogniser (cosine, same person >= 0.90)"
    assert Image.open(paths["plot_png"]).size == (900, 500)
    copy_best(paths["summary_json"], tmp_path / "best.safetensors")
    assert (tmp_path / "best.safetensors").read_bytes() == b"step 20"

    # training crops without a face: not scored, said, and no best step to copy
    (crops / "000.png").unlink()
    save(crops / "000.png", (0, 0, 0))
    unscored = score_subject(subject="eva", images_tsv=samples / "images.tsv", crops_dir=crops,
                             checkpoint_dir=checkpoints, **MODELS, **paths)
    assert not unscored["scored"] and "no face in any of the 1 training crops" in unscored["reason"]
    assert all(line.split("\t")[8] == "not scored" for line in paths["scores_tsv"].read_text().splitlines()[1:])
    with pytest.raises(FileNotFoundError, match="likeness was not scored"):
        copy_best(paths["summary_json"], tmp_path / "best2.safetensors")


def test_samples_without_faces_have_no_best_step(tmp_path):
    crops = tmp_path / "crops"
    crops.mkdir()
    save(crops / "000.png", (200, 100, 100))
    (crops / "manifest.tsv").write_text("source\tstatus\treason\toutput\nx.jpg\tkept\t\t000.png\n")
    samples, checkpoints = tmp_path / "samples", tmp_path / "checkpoints"
    samples.mkdir()
    checkpoints.mkdir()
    lines = ["step\tcolumn\tfile"]
    for step in (0, 10, 20):
        save(samples / f"s{step}.png", (0, 0, 0))
        lines.append(f"{step}\t0\ts{step}.png")
        if step:
            (checkpoints / f"eva-ti-step{step:08d}.safetensors").write_bytes(f"step {step}".encode())
    (samples / "images.tsv").write_text("\n".join(lines) + "\n")
    result = score_subject(subject="eva", images_tsv=samples / "images.tsv", crops_dir=crops,
                           checkpoint_dir=checkpoints, scores_tsv=samples / "scores.tsv",
                           plot_png=samples / "likeness.png", summary_json=samples / "likeness.json", **MODELS)
    # every score is 0: no step is better than another, so there is no best step (no fake "earliest" pick)
    assert not result["scored"] and result["best_step"] is None and result["best_checkpoint"] == ""
    assert "no face in any sample of the 2 checkpoint(s)" in result["reason"] and "not scored" in result["reason"]
    rows = [line.split("\t") for line in (samples / "scores.tsv").read_text().splitlines()[1:]]
    assert [row[6] for row in rows] == ["0.0000"] * 3
    assert [row[7] for row in rows] == [""] * 3 and {row[8] for row in rows} == {"no face"}
    with pytest.raises(FileNotFoundError, match="likeness was not scored"):
        copy_best(samples / "likeness.json", tmp_path / "best.safetensors")
