"""tifactory.verdict and the end summary's verdicts: weak subjects are named with their reasons, no fake best
step, the real file names, and the loud warning for a user's roster on the demo's toy model."""

from __future__ import annotations

import json
from pathlib import Path

from tifactory.run_summary import demo_model_warning, run_summary
from tifactory.verdict import FAILED, OK, WEAK, VerdictSettings, likeness_best_step, subject_verdict

SETTINGS = VerdictSettings(min_crops=3, min_same_person=0.5)
SCORE_HEADER = "step\timages\tfaces\tface_share\tlikeness\tsame_person\tscore\tbest\tstatus\tmodel\tmetric\n"


def make_subject(results: Path, subject: str, *, crops: int, identity: str = "on", likeness: dict | None = None,
                 scores: list[tuple] = (), best_file: bool = False) -> None:
    folder = results / subject
    (folder / "crops").mkdir(parents=True)
    (folder / "samples").mkdir()
    (folder / f"{subject}-ti.safetensors").write_bytes(b"x")
    if best_file:
        (folder / f"{subject}-ti-best.safetensors").write_bytes(b"x")
    rows = "".join(f"p{i}.jpg\tkept\t\t{i:03d}.png\n" for i in range(crops)) + "q.jpg\trejected\tno face\t\n"
    (folder / "crops" / "manifest.tsv").write_text("source\tstatus\treason\toutput\n" + rows)
    (folder / "crops" / "identity.json").write_text(json.dumps(
        {"filter": identity, "reference": "no clear majority" if identity == "not applied" else "majority"}))
    (folder / "samples" / "likeness.json").write_text(json.dumps(likeness or {}))
    (folder / "samples" / "scores.tsv").write_text(SCORE_HEADER + "".join(
        f"{step}\t{images}\t{images}\t1.0\t0.4\t{same}\t{score}\t\tscored\tdlib\tdistance\n"
        for step, images, same, score in scores))


def scored(best):
    return {"scored": True, "best_step": best, "best_checkpoint": f"ck/{best}.safetensors", "reason": ""}


def test_verdicts_name_their_reasons(tmp_path):
    results = tmp_path / "results"
    make_subject(results, "good", crops=5, likeness=scored(20), scores=[(0, 4, 0, 0.1), (20, 4, 3, 0.6)],
                 best_file=True)
    make_subject(results, "zoe", crops=1, identity="not applied", likeness=scored(20),
                 scores=[(0, 4, 0, 0.3), (20, 4, 1, 0.2)], best_file=True)
    make_subject(results, "noface", crops=5, likeness={
        "scored": False, "best_step": None, "best_checkpoint": "",
        "reason": "no face in any sample of the 2 checkpoint(s) (8 images): likeness not scored, no best step"})
    (results / "gone" / "crops").mkdir(parents=True)
    (results / "gone" / "crops" / "manifest.tsv").write_text("source\tstatus\treason\toutput\nq\trejected\tx\t\n")

    good = subject_verdict("good", SETTINGS, results)
    assert good.status == OK and good.reasons == () and good.best_step == 20 and good.crops == 5
    assert good.likeness == "3 of 4 samples the same person, score 0.60 (step 20)"
    zoe = subject_verdict("zoe", SETTINGS, results)
    assert zoe.status == WEAK
    assert [reason.split(" (")[0] for reason in zoe.reasons] == [
        "too few crops", "identity filter not applied", "likeness low", "likeness not rising"]
    noface = subject_verdict("noface", SETTINGS, results)
    assert noface.status == WEAK and noface.best_step is None
    assert noface.reasons[0].startswith("likeness not scored, no best step (no face in any sample")
    assert subject_verdict("gone", SETTINGS, results).status == FAILED
    # no best step, no -best file: the workflow asks for S-ti-best only where likeness_best_step says so
    assert likeness_best_step(results / "good" / "samples" / "likeness.json") == 20
    assert likeness_best_step(results / "noface" / "samples" / "likeness.json") is None
    assert likeness_best_step(results / "missing.json") is None

    text = run_summary(["good", "noface", "zoe"], results_dir=results, logs_dir=tmp_path / "logs",
                       verdict_settings=SETTINGS, publish_dir="/ui/embeddings")
    lines = text.splitlines()
    assert lines[0] == "tifactory: 3 of 3 subject(s) have their embedding (1 ok, 2 weak)"
    assert any(line.startswith("  WEAK zoe: too few crops (1 kept, fewer than 3); identity filter not applied")
               for line in lines)
    assert any(line.startswith("  WEAK noface: likeness not scored, no best step (no face in any sample") for line in lines)
    assert not any("WEAK good" in line for line in lines)
    # the real file names (published copies here) and the prompt: the file name is the trigger
    assert ("  good: /ui/embeddings/good-ti.safetensors, /ui/embeddings/good-ti-best.safetensors -> prompt "
            "`photo of good-ti` or `photo of good-ti-best`") in lines
    assert "  noface: /ui/embeddings/noface-ti.safetensors -> prompt `photo of noface-ti`" in lines


def test_demo_model_warning_for_a_users_roster(tmp_path):
    demo = {"astronaut": ["resources/demo_photos/astronaut"], "sun": ["resources/demo_concepts/sun"]}
    assert demo_model_warning("demo-tiny", demo) == ""
    mine = dict(demo, **{"eva-green": ["/home/me/data/Eva Green"]})
    warning = demo_model_warning("demo-tiny", mine)
    assert warning.startswith("WARNING: DEMO MODEL") and "eva-green" in warning and "astronaut" not in warning
    assert "base_model=" in warning
    text = run_summary(["eva-green"], results_dir=tmp_path, logs_dir=tmp_path, warning=warning).splitlines()
    assert text[0] == warning and text[-1] == warning  # first and last, where a person looks
