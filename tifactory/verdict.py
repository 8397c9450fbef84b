"""A subject's verdict: "ok", "weak" (with its reasons) or "failed", from the files its run wrote.

The end summary (tifactory.run_summary) and the roster page (tifactory.report) both show it, so a subject that
trained on one crop, without the identity filter, or whose samples never looked like the person is named where
a person looks. Reasons (each one line):

* too few crops: fewer kept training crops than `verdict.min_crops`;
* identity filter not applied: the crop stage could not tell whose face is the subject's (identity.json
  `filter: not applied`); "off" by the user's config or for a prepared dataset is not a reason;
* likeness not scored: no face in the training crops, or none in any checkpoint's samples (no best step);
* likeness low: the best step's samples hold fewer same-person faces than `verdict.min_same_person`;
* likeness not rising: the best step scores no better than step 0 (the init word alone).

Parse-time cheap (the workflow's input functions use `likeness_best_step`): json and the TSV reader only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from tifactory.fileio import read_tsv_rows

OK, WEAK, FAILED, PENDING = "ok", "weak", "failed", "not built"


@dataclass(frozen=True)
class VerdictSettings:
    min_crops: int
    min_same_person: float

    @classmethod
    def from_config(cls, section: dict) -> "VerdictSettings":
        return cls(min_crops=int(section["min_crops"]), min_same_person=float(section["min_same_person"]))


@dataclass(frozen=True)
class Verdict:
    subject: str
    status: str  # OK | WEAK | FAILED | PENDING
    reasons: tuple[str, ...] = field(default_factory=tuple)
    crops: int | None = None
    best_step: int | None = None
    likeness: str = ""  # the best step's value as a person reads it ("3 of 4 same person, score 0.62"), or ""

    def text(self) -> str:
        return self.status + (f": {'; '.join(self.reasons)}" if self.reasons else "")


def read_json(path: str | os.PathLike) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def likeness_best_step(summary_json: str | os.PathLike) -> int | None:
    """The best step the likeness stage chose (with its checkpoint file named), else None: no best step, so
    no `S-ti-best.safetensors`."""
    result = read_json(summary_json)
    if result.get("scored") and result.get("best_step") is not None and result.get("best_checkpoint"):
        return int(result["best_step"])
    return None


def _number(text: str) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def subject_verdict(subject: str, settings: VerdictSettings, results_dir: str | os.PathLike = "results") -> Verdict:
    """The verdict of one subject from results/S/ (crop manifest, identity.json, likeness summary and scores)."""
    folder = Path(results_dir) / subject
    crop_rows = read_tsv_rows(folder / "crops" / "manifest.tsv", missing_ok=True)
    crops = sum(row.get("status") == "kept" for row in crop_rows) if crop_rows else None
    if not (folder / f"{subject}-ti.safetensors").is_file():
        reasons = ["no embedding"] + ([f"{crops} kept crop(s)"] if crops is not None else [])
        return Verdict(subject, FAILED if crops is not None else PENDING, tuple(reasons), crops)
    reasons = []
    if crops is not None and crops < settings.min_crops:
        reasons.append(f"too few crops ({crops} kept, fewer than {settings.min_crops})")
    identity = read_json(folder / "crops" / "identity.json")
    if identity.get("filter") == "not applied":
        why = identity.get("reference") or identity.get("note") or "no clear majority"
        reasons.append(f"identity filter not applied ({why}): other people's faces may be in the training crops")
    likeness = read_json(folder / "samples" / "likeness.json")
    best, text = None, ""
    if not likeness:
        reasons.append("likeness not scored (no likeness summary)")
    elif not likeness.get("scored") or likeness.get("best_step") is None:
        why = (likeness.get("reason") or "no best step").replace(": likeness not scored, no best step", "")
        reasons.append(f"likeness not scored, no best step ({why})")
    else:
        best = int(likeness["best_step"])
        rows = {int(row["step"]): row for row in read_tsv_rows(folder / "samples" / "scores.tsv", missing_ok=True)
                if row.get("step", "").isdigit()}
        row, baseline = rows.get(best, {}), rows.get(0, {})
        score, images = _number(row.get("score")), _number(row.get("images"))
        same = _number(row.get("same_person"))
        if score is not None and images and same is not None:
            text = f"{int(same)} of {int(images)} samples the same person, score {score:.2f} (step {best})"
            if same / images < settings.min_same_person:
                reasons.append(f"likeness low ({int(same)} of {int(images)} of step {best}'s samples the same "
                               f"person, fewer than {settings.min_same_person:.0%})")
            base_score = _number(baseline.get("score"))
            if base_score is not None and score <= base_score:
                reasons.append(f"likeness not rising (best step {best} scores {score:.2f}, step 0 {base_score:.2f})")
    return Verdict(subject, WEAK if reasons else OK, tuple(reasons), crops, best, text)
