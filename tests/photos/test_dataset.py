import tomllib

import pandas as pd
import pytest
from PIL import Image

from tifactory.photos.dataset import DatasetError, build_dataset, read_dataset_toml

BUCKET = {"enable_bucket": True, "min_bucket_reso": 256, "max_bucket_reso": 2048, "bucket_reso_steps": 64,
          "bucket_no_upscale": True}


def make_crops(tmp_path, statuses):
    crops = tmp_path / "crops"
    crops.mkdir()
    rows = []
    for index, status in enumerate(statuses):
        name = f"{index:03d}_p.png" if status == "kept" else ""
        if name:
            Image.new("RGB", (64, 64), (index * 40, 0, 0)).save(crops / name)
        rows.append({"source": f"/x/{index}.jpg", "status": status,
                     "reason": "" if status == "kept" else "no face", "output": name})
    pd.DataFrame(rows).to_csv(crops / "manifest.tsv", sep="\t", index=False)
    return crops


def test_kohya_layout_and_toml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    crops = make_crops(tmp_path, ["kept", "rejected", "kept"])
    toml_path = build_dataset(crops_manifest=crops / "manifest.tsv", crops_dir=crops,
                              dataset_dir="results/eva/dataset", subject="eva", class_word="woman",
                              repeats=100, resolution=512, bucket=BUCKET)
    folder = tmp_path / "results/eva/dataset/100_eva woman"
    assert sorted(p.name for p in folder.iterdir()) == ["000_p.png", "002_p.png"]
    config = tomllib.loads(toml_path.read_text())
    assert config["general"]["enable_bucket"] is True and config["general"]["bucket_no_upscale"] is True
    assert config["general"]["min_bucket_reso"] == 256 and config["general"]["max_bucket_reso"] == 2048
    subset = config["datasets"][0]["subsets"][0]
    # absolute: kohya, run from its own folder, resolves a relative image_dir against that folder
    assert subset == {"image_dir": str(folder), "num_repeats": 100, "class_tokens": "eva woman"}
    assert config["datasets"][0]["resolution"] == 512
    parsed = read_dataset_toml(toml_path)
    assert parsed[0]["num_repeats"] == 100 and len(parsed[0]["images"]) == 2
    monkeypatch.chdir(tmp_path.parent)  # as kohya would read it, from another working directory
    assert len(read_dataset_toml(tmp_path / toml_path)[0]["images"]) == 2


def test_all_rejected_is_a_clear_error(tmp_path):
    crops = make_crops(tmp_path, ["rejected", "rejected"])
    with pytest.raises(DatasetError, match=r"subject 'eva': no usable photos \(2 rejected: no face x2\)"):
        build_dataset(crops_manifest=crops / "manifest.tsv", crops_dir=crops, dataset_dir=tmp_path / "d",
                      subject="eva", class_word="woman", repeats=100, resolution=512, bucket=BUCKET)


def test_rejection_reasons_are_counted_one_way_everywhere(tmp_path):
    """The dataset's failure message, the crop summary table and the report count reason categories alike."""
    import pandas as pd

    from tifactory.photos.dataset import summarize_rejections
    from tifactory.report import manifest_counts
    from tifactory.summary import count_reasons

    reasons = ["duplicate of /p/a.png", "duplicate of /p/b.png", "no face", "face too small (30px < 48)"]
    manifest = pd.DataFrame({"status": ["rejected"] * 4 + ["kept"], "reason": reasons + [""]})
    assert count_reasons(reasons) == {"duplicate": 2, "face too small": 1, "no face": 1}
    assert summarize_rejections(manifest) == "duplicate x2; face too small x1; no face x1"
    path = tmp_path / "manifest.tsv"
    manifest.to_csv(path, sep="\t", index=False)
    assert manifest_counts(path) == {"total": 5, "kept": 1, "rejected": 4,
                                     "reasons": {"duplicate": 2, "face too small": 1, "no face": 1}}
