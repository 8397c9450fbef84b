"""Report pages for `snakemake --report`: a per-subject summary and the roster overview (self-contained HTML).

The summary shows the crop contact sheet (when the crop stage wrote one) and counts, the loss curve, the grid
previews (one per eval model), the likeness plot and best step, the recipe and the provenance recorded in
the final embedding. Parse-time cheap: nothing heavy imported at module top.
"""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path

from tifactory.fileio import read_tsv_rows, write_text_atomic

STYLE = """body{font-family:sans-serif;margin:1em;color:#222} table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top} th{background:#f3f3f3}
img{max-width:100%;border:1px solid #ddd} .bad{color:#b00} .good{color:#060} code{font-size:90%}"""


def read_tsv(path: str | os.PathLike) -> list[dict]:
    """A stage's table, [] when it is not there (a report shows what exists)."""
    return read_tsv_rows(path, missing_ok=True)


def manifest_counts(path: str | os.PathLike) -> dict:
    """kept / rejected counts and rejection reasons of a raw or crop manifest."""
    rows = read_tsv(path)
    from tifactory.summary import count_reasons

    reasons = count_reasons(row.get("reason", "") for row in rows if row.get("status") != "kept")
    return {"total": len(rows), "kept": sum(row.get("status") == "kept" for row in rows),
            "rejected": sum(row.get("status") != "kept" for row in rows), "reasons": reasons}


def image_tag(path: str | os.PathLike, alt: str) -> str:
    """An <img> with the file inlined as a data URI (the report page is self-contained)."""
    path = Path(path)
    mime = "image/jpeg" if path.suffix.lower() in (".jpg", ".jpeg") else "image/png"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:{mime};base64,{data}">'


def _table(rows: list[list], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _reasons(counts: dict) -> str:
    return html.escape(", ".join(f"{reason} ×{n}" for reason, n in counts["reasons"].items()) or "–")


def embedding_provenance(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of an embedding tifactory wrote, whatever its family's tensors."""
    from tifactory.training.embedding import read_embedding

    return read_embedding(path).metadata


def family_line(model: dict) -> str:
    """Which model and family trained the subject (the ModelSpec's params)."""
    from tifactory.families import family_named

    family = family_named(model["family"])
    return (f"<p>trained on <code>{html.escape(os.path.basename(str(model['path']).rstrip('/')))}</code>, "
            f"model family <b>{html.escape(family.name)}</b> ({html.escape(family.title)}, "
            f"{family.native_resolution} px)</p>")


def likeness_summary(path: str | os.PathLike) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def likeness_text(summary: dict) -> str:
    if not summary.get("scored"):
        return f'<span class="bad">likeness NOT scored: {html.escape(summary.get("reason", ""))}</span>'
    if summary.get("best_step") is None:
        return f'<span class="bad">scored, but no best step: {html.escape(summary.get("reason", ""))}</span>'
    return (f'<span class="good">best step: {summary["best_step"]}</span> '
            f'(copied to <code>{html.escape(summary["subject"])}-ti-best.safetensors</code>; '
            f'{html.escape(summary.get("recogniser", ""))})'
            + (f' <span class="bad">{html.escape(summary["reason"])}</span>' if summary.get("reason") else ""))


def subject_summary(*, subject: str, out_html: str | os.PathLike, raw_manifest: str | os.PathLike,
                    crops_dir: str | os.PathLike, loss_png: str | os.PathLike, grids: dict[str, str],
                    likeness_json: str | os.PathLike, likeness_png: str | os.PathLike, scores_tsv: str | os.PathLike,
                    embedding: str | os.PathLike, recipe: dict, samples: dict, model: dict,
                    recovery_tsv: str | os.PathLike | None = None) -> Path:
    """Write one subject's self-contained summary page (with the concept-recovery table when given)."""
    raw = manifest_counts(raw_manifest)
    crops = manifest_counts(Path(crops_dir) / "manifest.tsv")
    likeness = likeness_summary(likeness_json)
    metadata = embedding_provenance(embedding)
    parts = [f"<html><head><meta charset='utf-8'><title>{html.escape(subject)}</title><style>{STYLE}</style>"
             f"</head><body><h1>{html.escape(subject)}</h1>", family_line(model)]
    parts.append("<h2>Photos and crops</h2>")
    parts.append(_table([["raw items", raw["total"], raw["kept"], raw["rejected"], _reasons(raw)],
                         ["face crops", crops["total"], crops["kept"], crops["rejected"], _reasons(crops)]],
                        ["stage", "items", "kept", "rejected", "reasons"]))
    from tifactory.photos.crop import read_identity
    from tifactory.summary import identity_text

    identity = read_identity(crops_dir)
    if identity:
        parts.append(f"<p>identity filter: {html.escape(identity_text(identity))}"
                     + (f" &mdash; {html.escape(identity['note'])}" if identity.get("note") else "") + "</p>")
    sheet = Path(crops_dir) / "contact_sheet.png"
    if sheet.is_file():
        parts.append(image_tag(sheet, "crop contact sheet"))
    parts.append("<h2>Loss</h2>" + image_tag(loss_png, "loss curve"))
    parts.append("<h2>Likeness</h2><p>" + likeness_text(likeness) + "</p>")
    scores = read_tsv(scores_tsv)
    if scores:
        header = list(scores[0])
        parts.append(_table([[html.escape(row[c]) for c in header] for row in scores], header))
    parts.append(image_tag(likeness_png, "likeness vs step"))
    if recovery_tsv:
        parts.append(recovery_section(recovery_tsv))
    parts.append("<h2>Sample grids</h2>")
    for name, path in grids.items():
        parts.append(f"<h3>{html.escape(name)}</h3>" + image_tag(path, f"grid on {name}"))
    parts.append("<h2>Recipe</h2>")
    parts.append(_table([[html.escape(k), f"<code>{html.escape(json.dumps(v))}</code>"]
                         for k, v in sorted(recipe.items())], ["train", "value"]))
    parts.append(_table([[html.escape(k), f"<code>{html.escape(json.dumps(v))}</code>"]
                         for k, v in sorted(samples.items())], ["samples", "value"]))
    parts.append("<h2>Provenance</h2>")
    rows = [[html.escape(k), f"<code>{html.escape(str(v))}</code>"] for k, v in sorted(model.items())]
    rows += [[html.escape(k), f"<code>{html.escape(v)}</code>"] for k, v in sorted(metadata.items())
             if k != "tifactory.recipe"]
    parts.append(_table(rows, ["key", "value"]))
    parts.append("</body></html>")
    write_text_atomic(out_html, "\n".join(parts))
    return Path(out_html)


def recovery_section(recovery_tsv: str | os.PathLike) -> str:
    """The taught demo model's proof of learning: per step, how close the embedding got to the hidden concept."""
    rows = read_tsv(recovery_tsv)
    if not rows:
        return "<h2>Concept recovery</h2><p class='bad'>no recovery table</p>"
    last = rows[-1]
    closed = float(last["gap_closed"])
    verdict = "good" if closed >= 0.5 and float(last["cond_dist_target"]) < float(last["cond_dist_other"]) else "bad"
    text = (f"<p class='{verdict}'>After step {html.escape(last['step'])} the embedding closed "
            f"{100 * closed:.0f}% of the loss gap from the init word to the hidden concept's own embedding on these "
            f"images; its conditioning lies {float(last['cond_dist_target']):.2f} from the concept's and "
            f"{float(last['cond_dist_other']):.2f} from a second concept's (cosine of its move with the way to the "
            f"concept: {float(last['cond_cos_target']):.2f}).</p><p>The demo model is taught a few drawn concepts "
            "(tifactory.demo.taught), each with a hidden embedding; this subject's images are held-out images of one. "
            "Columns: conditioning (text encoder output at the trained tokens) distance to the concept's and to a "
            "second concept's, cosine of its displacement from the init word's with the direction to the "
            "concept's (in conditioning and in vector space), denoising loss on the images with the init word, "
            "the concept's embedding and the trained one, and the share of the gap closed.</p>")
    header = list(rows[0])
    return "<h2>Concept recovery</h2>" + text + _table([[html.escape(row[c]) for c in header] for row in rows], header)


def roster_overview(*, out_html: str | os.PathLike, subjects: list[dict]) -> Path:
    """One row per subject: class word, photos kept, crops kept, steps, final step, best step, likeness.
    `subjects`: dicts with subject, class_word, raw_manifest, crops_dir, likeness_json, embedding."""
    rows = []
    for entry in subjects:
        raw = manifest_counts(entry["raw_manifest"])
        crops = manifest_counts(Path(entry["crops_dir"]) / "manifest.tsv")
        likeness = likeness_summary(entry["likeness_json"])
        metadata = embedding_provenance(entry["embedding"])
        best = likeness.get("best_step")
        rows.append([html.escape(entry["subject"]), html.escape(entry["class_word"]),
                     f"{raw['kept']} / {raw['total']}", f"{crops['kept']} / {crops['total']}",
                     html.escape(metadata.get("tifactory.step", "")),
                     str(best) if likeness.get("scored") and best is not None else "not scored",
                     html.escape(likeness.get("reason", "")) if not likeness.get("scored") else
                     html.escape(likeness.get("recogniser", ""))])
    page = (f"<html><head><meta charset='utf-8'><title>roster</title><style>{STYLE}</style></head><body>"
            "<h1>Roster overview</h1>"
            + _table(rows, ["subject", "class", "photos kept", "crops kept", "final step", "best step", "likeness"])
            + "</body></html>")
    write_text_atomic(out_html, page)
    return Path(out_html)
