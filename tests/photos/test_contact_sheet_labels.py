"""Labels a person reads on the pictures: contact-sheet reasons name files, not absolute paths; the grid's column
labels put the seed first, where cutting a long prompt keeps it."""

from __future__ import annotations

from tifactory.photos.contact_sheet import short_reason
from tifactory.sampling.prompts import SamplePrompt
from tifactory.sampling.samples import plan_columns


def test_reasons_name_files_not_paths():
    sources = ["/home/me/data/Eva Green/IMG_0042.jpg", r"C:\Users\me\Eva Green\a b.png"]
    assert short_reason("duplicate of /home/me/data/Eva Green/IMG_0042.jpg", sources) == "duplicate of IMG_0042.jpg"
    assert (short_reason(r"near-duplicate of C:\Users\me\Eva Green\a b.png (phash distance 3)", sources)
            == "near-duplicate of a b.png (phash distance 3)")
    assert short_reason("duplicate of photos/eva/x.JPG") == "duplicate of x.JPG"  # a path the manifest lacks
    assert short_reason("face too small (30px < 48)", sources) == "face too small (30px < 48)"


def test_grid_labels_put_the_seed_first():
    prompt = SamplePrompt(text="a very long prompt of {token} " + "with many words " * 10)
    columns = plan_columns([prompt], seeds=[7, 8], steps=30, guidance_scale=7.5, width=512, height=512)
    labels = [column.label("eva-green-ti") for column in columns]
    assert labels[0].startswith("seed 7 · a very long prompt of eva-green-ti") and labels[1].startswith("seed 8 · ")
