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


def data_uri(path: str | os.PathLike) -> str:
    """The file as a data URI (the report pages are self-contained)."""
    path = Path(path)
    mime = "image/jpeg" if path.suffix.lower() in (".jpg", ".jpeg") else "image/png"
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _table(rows: list[list], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _reasons(counts: dict) -> str:
    return ", ".join(f"{reason} ×{n}" for reason, n in counts["reasons"].items()) or "–"


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


SUBJECT_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{{ subject }}</title><style>{{ style }}</style></head><body>
<p><a href="../../report/roster.html#{{ subject }}">&larr; roster</a></p>
<h1>{{ subject }}</h1>
{{ family }}
{% if verdict %}<p class="{{ 'good' if verdict.status == 'ok' else 'bad' }}"><b>verdict: {{ verdict.status }}</b>
{% for reason in verdict.reasons %}<br>&bull; {{ reason }}{% endfor %}</p>{% endif %}
{% macro table(header, rows) %}<table><tr>{% for cell in header %}<th>{{ cell }}</th>{% endfor %}</tr>
{% for row in rows %}<tr>{% for cell in row %}<td>{{ cell }}</td>{% endfor %}</tr>{% endfor %}</table>{% endmacro %}
<h2>Photos and crops</h2>
{{ table(["stage", "items", "kept", "rejected", "reasons"], counts) }}
{% if identity %}<p>identity filter: {{ identity }}{% if identity_note %} &mdash; {{ identity_note }}{% endif %}</p>{% endif %}
{% if sheet %}<img alt="crop contact sheet" src="{{ sheet }}">{% endif %}
<h2>Loss</h2><img alt="loss curve" src="{{ loss }}">
<h2>Likeness</h2><p>
{% if not likeness.scored %}<span class="bad">likeness NOT scored: {{ likeness.reason }}</span>
{% elif likeness.best_step is none %}<span class="bad">scored, but no best step: {{ likeness.reason }}</span>
{% else %}<span class="good">best step: {{ likeness.best_step }}</span> (copied to
<code>{{ subject }}-ti-best.safetensors</code>; {{ likeness.recogniser }}){% if likeness.reason %}
<span class="bad">{{ likeness.reason }}</span>{% endif %}{% endif %}</p>
{% if scores %}{{ table(scores[0].keys(), scores_rows) }}{% endif %}
<img alt="likeness vs step" src="{{ likeness_png }}">
{{ recovery }}
<h2>Sample grids</h2>
{% for name, uri in grids %}<h3>{{ name }}</h3><img alt="grid on {{ name }}" src="{{ uri }}">{% endfor %}
<h2>Recipe</h2>
{{ table(["train", "value"], recipe) }}
{{ table(["samples", "value"], samples) }}
<h2>Provenance</h2>
{{ table(["key", "value"], provenance) }}
</body></html>
"""


def subject_summary(*, subject: str, out_html: str | os.PathLike, raw_manifest: str | os.PathLike,
                    crops_dir: str | os.PathLike, loss_png: str | os.PathLike, grids: dict[str, str],
                    likeness_json: str | os.PathLike, likeness_png: str | os.PathLike, scores_tsv: str | os.PathLike,
                    embedding: str | os.PathLike, recipe: dict, samples: dict, model: dict,
                    recovery_tsv: str | os.PathLike | None = None, verdict_settings=None) -> Path:
    """Write one subject's self-contained page with Jinja2 (with the concept-recovery table when given; with its
    verdict and reasons when `verdict_settings` is given)."""
    import jinja2
    from markupsafe import Markup

    from tifactory.photos.crop import read_identity
    from tifactory.summary import identity_text

    raw = manifest_counts(raw_manifest)
    crops = manifest_counts(Path(crops_dir) / "manifest.tsv")
    metadata = embedding_provenance(embedding)
    identity = read_identity(crops_dir)
    verdict = None
    if verdict_settings is not None:
        from tifactory.verdict import subject_verdict

        verdict = subject_verdict(subject, verdict_settings, Path(out_html).parent.parent.parent)
    scores = read_tsv(scores_tsv)
    sheet = Path(crops_dir) / "contact_sheet.png"
    provenance = [[key, Markup("<code>{}</code>").format(value)] for key, value in sorted(model.items())]
    provenance += [[key, Markup("<code>{}</code>").format(value)] for key, value in sorted(metadata.items())
                   if key != "tifactory.recipe"]
    page = jinja2.Environment(autoescape=True).from_string(SUBJECT_PAGE).render(
        subject=subject, style=STYLE, verdict=verdict, family=Markup(family_line(model)),
        counts=[["raw items", raw["total"], raw["kept"], raw["rejected"], _reasons(raw)],
                ["face crops", crops["total"], crops["kept"], crops["rejected"], _reasons(crops)]],
        identity=identity_text(identity) if identity else "", identity_note=(identity or {}).get("note", ""),
        sheet=data_uri(sheet) if sheet.is_file() else "", loss=data_uri(loss_png),
        likeness=likeness_summary(likeness_json), scores=scores,
        scores_rows=[list(row.values()) for row in scores], likeness_png=data_uri(likeness_png),
        recovery=Markup(recovery_section(recovery_tsv)) if recovery_tsv else "",
        grids=[(name, data_uri(path)) for name, path in grids.items()],
        recipe=[[key, Markup("<code>{}</code>").format(json.dumps(value))] for key, value in sorted(recipe.items())],
        samples=[[key, Markup("<code>{}</code>").format(json.dumps(value))] for key, value in sorted(samples.items())],
        provenance=provenance)
    write_text_atomic(out_html, page)
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


ROSTER_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>tifactory roster: {{ rows|length }} subject(s)</title>
<style>{{ style }}
.verdict-ok{color:#060;font-weight:bold} .verdict-weak{color:#b60;font-weight:bold}
.verdict-failed,.verdict-not-built{color:#b00;font-weight:bold} td.pics{white-space:nowrap}
td.pics img{width:128px;max-width:none;height:auto;margin-right:4px} td.name,td.files{white-space:nowrap}
ul.reasons{margin:.2em 0;padding-left:1.2em} .small{font-size:85%;color:#555}</style></head>
<body><h1>Roster: {{ rows|length }} subject(s)</h1>
<p>{% for status, n in counts %}<span class="verdict-{{ status|replace(' ', '-') }}">{{ n }} {{ status }}</span>{{ ", " if not loop.last }}{% endfor %}.
Each subject's own page (crops, loss, likeness per step, sample grids, recipe) is linked from its name.
A subject is <em>weak</em> when it trained on few crops, without the identity filter, or its samples do not
look like the person; the reasons are listed. The prompt to type in a UI is the published file's name:
<code>photo of &lt;subject&gt;-ti</code>, or the roster's <code>output_name</code> (the embedding column).</p>
<table><tr><th>subject</th><th>verdict</th><th>sample · training crop</th><th>likeness</th><th>photos kept</th>
<th>crops kept</th><th>final step</th><th>embedding</th></tr>
{% for row in rows %}<tr id="{{ row.subject }}">
<td class="name"><a href="{{ row.page }}">{{ row.subject }}</a><div class="small">{{ row.class_word }}</div></td>
<td><span class="verdict-{{ row.status|replace(' ', '-') }}">{{ row.status }}</span>
{% if row.reasons %}<ul class="reasons">{% for reason in row.reasons %}<li>{{ reason }}</li>{% endfor %}</ul>{% endif %}</td>
<td class="pics">{% if row.sample %}<img alt="{{ row.sample_alt }}" title="{{ row.sample_alt }}" src="{{ row.sample }}">{% endif %}
{% if row.crop %}<img alt="training crop" title="a training crop" src="{{ row.crop }}">{% endif %}
<div class="small">{{ row.sample_alt }}</div></td>
<td>{{ row.likeness or "not scored" }}</td><td>{{ row.photos }}</td><td>{{ row.crops }}</td><td>{{ row.final_step }}</td>
<td class="files">{% for file in row.files %}<code>{{ file }}</code><br>{% endfor %}</td></tr>
{% endfor %}</table></body></html>
"""
THUMBNAIL_PX = 256  # the roster page's pictures (shown at 128 px: sharp on high-density screens)


def thumbnail_uri(path: str | os.PathLike, side: int = THUMBNAIL_PX) -> str:
    """A small JPEG of the image at `path` as a data URI (the roster page stays one self-contained file)."""
    import io

    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        image.thumbnail((side, side))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def shown_sample(images_tsv: str | os.PathLike, best_step: int | None) -> tuple[Path, int] | None:
    """The first sample image of the best step, else of the last step (the final embedding): (file, step)."""
    rows = read_tsv(images_tsv)
    steps = sorted({int(row["step"]) for row in rows if row.get("step", "").isdigit()})
    if not steps:
        return None
    step = best_step if best_step in steps else steps[-1]
    first = min((row for row in rows if row.get("step") == str(step)), key=lambda row: int(row.get("column") or 0))
    return Path(images_tsv).parent / first["file"], step


def roster_overview(*, out_html: str | os.PathLike, subjects: list[dict], verdict_settings,
                    results_dir: str | os.PathLike | None = None) -> Path:
    """The page a person opens first (results/report/roster.html), built with Jinja2: per subject its verdict
    with the reasons (tifactory.verdict), the best (or last) step's sample beside a training crop, the likeness
    value, counts, the embedding files and a link to the subject's page (results/S/report/summary.html).
    `subjects`: dicts with subject, class_word, raw_manifest, crops_dir, likeness_json, embedding, images_tsv and
    optionally trigger (the roster's output name; default `<subject>-ti`). `results_dir`: where results/S/ are (default: the folder above the page's)."""
    import jinja2

    from tifactory.publish import published_files
    from tifactory.verdict import likeness_best_step, subject_verdict

    out_html = Path(out_html)
    results = Path(results_dir) if results_dir is not None else out_html.parent.parent
    rows, counts = [], {}
    for entry in subjects:
        subject = entry["subject"]
        raw = manifest_counts(entry["raw_manifest"])
        crops = manifest_counts(Path(entry["crops_dir"]) / "manifest.tsv")
        verdict = subject_verdict(subject, verdict_settings, results)
        counts[verdict.status] = counts.get(verdict.status, 0) + 1
        metadata = embedding_provenance(entry["embedding"]) if Path(entry["embedding"]).is_file() else {}
        sample = shown_sample(entry["images_tsv"], verdict.best_step) if entry.get("images_tsv") else None
        kept = [row["output"] for row in read_tsv(Path(entry["crops_dir"]) / "manifest.tsv")
                if row.get("status") == "kept" and row.get("output")]
        crop = Path(entry["crops_dir"]) / kept[0] if kept else None
        # S-ti-best is built where the likeness job chose a step (maybe after this page): named from that choice
        names = published_files(entry.get("trigger") or f"{subject}-ti")  # as published, the name is the trigger
        files = [names["final"]] + (
            [names["best"]] if likeness_best_step(entry["likeness_json"]) is not None else [])
        page = Path(os.path.relpath(results / subject / "report" / "summary.html", out_html.parent)).as_posix()
        rows.append({
            "subject": subject, "class_word": entry["class_word"], "status": verdict.status,
            "reasons": list(verdict.reasons), "likeness": verdict.likeness, "page": page,
            "photos": f"{raw['kept']} / {raw['total']}", "crops": f"{crops['kept']} / {crops['total']}",
            "final_step": metadata.get("tifactory.step", ""), "files": files,
            "sample": thumbnail_uri(sample[0]) if sample and sample[0].is_file() else "",
            "sample_alt": (f"{'best' if sample[1] == verdict.best_step else 'last'} step {sample[1]}" if sample
                           else ""),
            "crop": thumbnail_uri(crop) if crop is not None and crop.is_file() else ""})
    page = jinja2.Environment(autoescape=True).from_string(ROSTER_PAGE).render(
        rows=rows, style=STYLE, counts=sorted(counts.items()))
    write_text_atomic(out_html, page)
    return out_html
