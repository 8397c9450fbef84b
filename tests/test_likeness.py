"""Likeness maths with a stand-in recogniser: the 'face embedding' of an image is its mean colour minus grey,
found only where the image is not black (so cosine, mean embeddings and the best-step choice are real)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tifactory.likeness import Face, copy_best, cosine, reference_embedding, score_subject, summarise


class ColourRecogniser:
    name = "stand-in colour recogniser"

    def faces(self, rgb):
        if rgb.max() == 0:
            return []
        small = Face(box=(0, 0, 2, 2), embedding=np.array([1.0, -1.0, 0.0]))  # a smaller face, ignored
        return [small, Face(box=(0, 0, rgb.shape[1], rgb.shape[0]), embedding=rgb.reshape(-1, 3).mean(0) - 100.0)]


def save(path, colour):
    Image.new("RGB", (16, 16), colour).save(path)
    return path


def test_reference_is_normalised_mean_of_normalised_embeddings(tmp_path):
    crops = [save(tmp_path / "a.png", (200, 100, 100)), save(tmp_path / "b.png", (100, 300 - 100, 100)),
             save(tmp_path / "c.png", (0, 0, 0))]
    reference, used = reference_embedding(ColourRecogniser(), crops)
    assert used == 2
    np.testing.assert_allclose(reference, np.array([1, 1, 0]) / np.sqrt(2), atol=1e-9)
    assert cosine([1, 0, 0], reference) == pytest.approx(1 / np.sqrt(2))
    with pytest.raises(ValueError, match="no face"):
        reference_embedding(ColourRecogniser(), [crops[2]])


def test_summary_scores_and_best_step():
    rows = [
        {"step": 0, "face": True, "cosine": 0.1}, {"step": 0, "face": True, "cosine": 0.3},
        {"step": 10, "face": True, "cosine": 0.9}, {"step": 10, "face": False, "cosine": None},
        {"step": 20, "face": True, "cosine": 0.6}, {"step": 20, "face": True, "cosine": 0.5},
        {"step": 30, "face": True, "cosine": 0.6}, {"step": 30, "face": True, "cosine": 0.5},
    ]
    summary = {row["step"]: row for row in summarise(rows)}
    assert summary[10]["face_share"] == 0.5 and summary[10]["likeness"] == pytest.approx(0.9)
    assert summary[10]["score"] == pytest.approx(0.45)
    assert summary[20]["score"] == pytest.approx(0.55)
    assert [step for step, row in summary.items() if row["best"]] == [20]  # tie with 30 -> earlier step


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
                           checkpoint_dir=checkpoints, recogniser=ColourRecogniser(), **paths)
    # step 10: cos 1 (0.8,0.1,0 vs 1,0,0 direction ~0.99) + no face -> score ~0.5; step 20: ~1 and ~0.71 -> best
    assert result["scored"] and result["best_step"] == 20 and result["reference_faces"] == 1
    table = [line.split("\t") for line in paths["scores_tsv"].read_text().splitlines()]
    assert table[0] == ["step", "images", "faces", "face_share", "likeness", "score", "best", "status"]
    assert table[2][:4] == ["10", "2", "1", "0.5000"] and table[3][6] == "yes"
    assert Image.open(paths["plot_png"]).size == (900, 500)
    copy_best(paths["summary_json"], tmp_path / "best.safetensors")
    assert (tmp_path / "best.safetensors").read_bytes() == b"step 20"

    unscored = score_subject(subject="eva", images_tsv=samples / "images.tsv", crops_dir=crops,
                             checkpoint_dir=checkpoints, recogniser=None, reason="no pack here", **paths)
    assert not unscored["scored"] and json.loads(paths["summary_json"].read_text())["reason"] == "no pack here"
    assert all(line.endswith("not scored") for line in paths["scores_tsv"].read_text().splitlines()[1:])
    with pytest.raises(FileNotFoundError, match="likeness was not scored"):
        copy_best(paths["summary_json"], tmp_path / "best2.safetensors")
