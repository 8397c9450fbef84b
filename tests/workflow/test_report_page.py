"""results/report/roster.html, the page a person opens first: per subject the verdict with its reasons, the
best (or last) sample beside a training crop, the likeness value and a link to the subject's page; checked as
HTML here and, where Chromium is installed, as a rendered page (a screenshot with both pictures drawn)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tifactory.report import roster_overview
from tifactory.verdict import VerdictSettings

SETTINGS = VerdictSettings(min_crops=2, min_same_person=0.5)
SCORES = "step\timages\tfaces\tface_share\tlikeness\tsame_person\tscore\tbest\tstatus\tmodel\tmetric\n"


def make_subject(results: Path, subject: str, *, crops: int, likeness: dict, scores: str, colour) -> dict:
    from safetensors.numpy import save_file

    folder = results / subject
    for sub in ("raw", "crops", "samples"):
        (folder / sub).mkdir(parents=True)
    (folder / "raw" / "manifest.tsv").write_text("source\tstatus\treason\n" + "p.jpg\tkept\t\n" * crops)
    for index in range(crops):
        Image.new("RGB", (64, 64), (40, 200, 40)).save(folder / "crops" / f"{index:03d}.png")
    (folder / "crops" / "manifest.tsv").write_text("source\tstatus\treason\toutput\n" + "".join(
        f"p{i}.jpg\tkept\t\t{i:03d}.png\n" for i in range(crops)))
    (folder / "crops" / "identity.json").write_text(json.dumps({"filter": "on"}))
    lines = ["step\tcolumn\tfile"]
    for step in (0, 10, 20):
        for column in (0, 1):
            name = f"step{step:08d}_p00_s{column}.png"
            Image.new("RGB", (64, 64), colour(step, column)).save(folder / "samples" / name)
            lines.append(f"{step}\t{column}\t{name}")
    (folder / "samples" / "images.tsv").write_text("\n".join(lines) + "\n")
    (folder / "samples" / "likeness.json").write_text(json.dumps(likeness))
    (folder / "samples" / "scores.tsv").write_text(SCORES + scores)
    save_file({"emb_params": np.zeros((2, 768), np.float32)}, str(folder / f"{subject}-ti.safetensors"),
              metadata={"tifactory.step": "20"})
    return {"subject": subject, "class_word": "woman", "raw_manifest": folder / "raw" / "manifest.tsv",
            "crops_dir": folder / "crops", "likeness_json": folder / "samples" / "likeness.json",
            "embedding": folder / f"{subject}-ti.safetensors", "images_tsv": folder / "samples" / "images.tsv"}


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.images = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "a":
            self.links.append(attrs["href"])
        if tag == "img":
            self.images.append(attrs)


@pytest.fixture
def roster_page(tmp_path) -> Path:
    results = tmp_path / "results"
    good = make_subject(results, "eva-green", crops=3, colour=lambda step, column: (255, 0, 0) if step == 10 else (0, 0, 255),
                        likeness={"scored": True, "best_step": 10, "best_checkpoint": "ck10", "reason": ""},
                        scores="0\t2\t2\t1\t0.8\t0\t0.2\t\tscored\tdlib\tdistance\n"
                               "10\t2\t2\t1\t0.3\t2\t0.7\tyes\tscored\tdlib\tdistance\n"
                               "20\t2\t2\t1\t0.4\t1\t0.6\t\tscored\tdlib\tdistance\n")
    noface = make_subject(results, "zoe-saldana", crops=1, colour=lambda step, column: (0, 0, 255),
                          likeness={"scored": False, "best_step": None, "best_checkpoint": "",
                                    "reason": "no face in any sample of the 2 checkpoint(s) (4 images): likeness "
                                              "not scored, no best step"},
                          scores="")
    noface["trigger"] = "zoe_v2"  # the roster's output_name: the published name
    out = results / "report" / "roster.html"
    roster_overview(out_html=out, subjects=[good, noface], verdict_settings=SETTINGS)
    return out


def test_roster_page_links_verdicts_and_pictures(roster_page):
    text = roster_page.read_text(encoding="utf-8")
    page = Page()
    page.feed(text)
    assert page.links == ["../eva-green/report/summary.html", "../zoe-saldana/report/summary.html"]
    for link in page.links:  # relative to the page: they point at results/S/report/summary.html
        assert (roster_page.parent / link).resolve().parent.parent.name in ("eva-green", "zoe-saldana")
    assert re.search(r'class="verdict-ok">ok</span>', text) and re.search(r'class="verdict-weak">weak</span>', text)
    assert "too few crops (1 kept, fewer than 2)" in text and "likeness not scored, no best step (no face in any sample" in text
    assert "2 of 2 samples the same person, score 0.70 (step 10)" in text  # the likeness value, not the metric's name
    assert "<code>eva-green-ti.safetensors</code><br><code>eva-green-ti-best.safetensors</code>" in text
    assert "<code>zoe_v2.safetensors</code>" in text
    assert "zoe-saldana-ti" not in text and "zoe_v2-best" not in text  # no best step, no -best file named
    alts = [image["alt"] for image in page.images]
    assert alts == ["best step 10", "training crop", "last step 20", "training crop"]
    assert all(image["src"].startswith("data:image/jpeg;base64,") for image in page.images)


def test_roster_page_renders_in_chromium(roster_page, tmp_path):
    """A real browser draws it: the best step's sample (red) and the training crop (green) are on the screen."""
    browser = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)),
                   None)
    if browser is None:
        pytest.skip("no Chromium here (apt-get install chromium)")
    shot = tmp_path / "roster.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1400,700", roster_page.as_uri()],
                   capture_output=True, timeout=120, check=False)
    assert shot.is_file(), "Chromium wrote no screenshot"
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 60) & (pixels[..., 2] < 60)
    green = (pixels[..., 1] > 170) & (pixels[..., 0] < 80) & (pixels[..., 2] < 80)
    assert red.sum() > 128 * 100 and green.sum() > 2 * 128 * 100  # the pictures are drawn at 128 px


def test_subject_page_shows_verdict_links_back_and_escapes(roster_page):
    from tifactory.report import subject_summary

    results = roster_page.parent.parent
    for subject in ("eva-green", "zoe-saldana"):
        folder = results / subject
        for name in ("train/loss.png", "samples/likeness.png", "samples/grid_preview.jpg"):
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (32, 32), (9, 9, 9)).save(folder / name)
        out = subject_summary(
            subject=subject, out_html=folder / "report" / "summary.html", raw_manifest=folder / "raw" / "manifest.tsv",
            crops_dir=folder / "crops", loss_png=folder / "train" / "loss.png",
            grids={"base": str(folder / "samples" / "grid_preview.jpg")},
            likeness_json=folder / "samples" / "likeness.json", likeness_png=folder / "samples" / "likeness.png",
            scores_tsv=folder / "samples" / "scores.tsv", embedding=folder / f"{subject}-ti.safetensors",
            recipe={"init_word": "<script>alert(1)</script>"}, samples={"seeds": [1, 2]},
            model={"path": "/models/<b>m.safetensors", "family": "sdxl", "config_dir": "", "vae": ""},
            verdict_settings=SETTINGS)
        text = out.read_text(encoding="utf-8")
        page = Page()
        page.feed(text)
        assert page.links == [f"../../report/roster.html#{subject}"]
        assert (out.parent / "../../report/roster.html").resolve() == roster_page.resolve()
        assert "<script>" not in text and "&lt;script&gt;" in text
        assert "<code>&lt;b&gt;m.safetensors</code>, model family <b>sdxl</b>" in text
        assert [image["alt"] for image in page.images] == ["loss curve", "likeness vs step", "grid on base"]
        assert all(image["src"].startswith("data:image/") for image in page.images)
        if subject == "eva-green":
            assert "verdict: ok" in text and "best step: 10" in text and "eva-green-ti-best.safetensors" in text
        else:
            assert "verdict: weak" in text and "too few crops (1 kept, fewer than 2)" in text
            assert "likeness NOT scored: no face in any sample" in text and "ti-best" not in text
