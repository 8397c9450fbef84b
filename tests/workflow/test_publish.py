"""`publish_dir`: the final embeddings (and the best one when likeness picks it) are copied where UIs look."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from support.modelfiles import SD15_SHAPES, safetensors_header_file, tifactory_embedding


def make_workdir(root: Path, repo_config: dict, **config) -> Path:
    """Two subjects on a real-looking SD1.5 file (header only: what the DAG reads); the demo model never publishes."""
    for subject in ("eva", "tom"):
        (root / "photos" / subject).mkdir(parents=True)
    safetensors_header_file(root / "sd15.safetensors", SD15_SHAPES)
    (root / "roster.tsv").write_text("subject\tclass_word\tsources\neva\twoman\tphotos/eva\ntom\tman\tphotos/tom\n")
    (root / "config.yaml").write_text(yaml.safe_dump(dict(repo_config, roster="roster.tsv",
                                                          base_model="sd15.safetensors", **config)))
    return root


def planned(plan: str, rule: str) -> list[str]:
    return sorted(re.findall(rf"rule {rule}:\n(?:    .*\n)*?    output: (\S+)", plan))


@pytest.mark.slow
def test_rule_all_asks_for_published_copies_only_when_publish_dir_is_set(tmp_path, repo_config, run_snakemake):
    off = make_workdir(tmp_path / "off", repo_config)
    assert planned(run_snakemake(off, "-n", cores=1).stdout, "publish") == []

    publish = tmp_path / "webui" / "embeddings"
    variants = {"default": {}}
    if "likeness_pack" in repo_config["samples"]:  # a pack as the parse-time check sees one: -ti-best files
        pack = tmp_path / "pack"
        pack.mkdir()
        (pack / "model.onnx").write_bytes(b"")
        variants["likeness"] = {"samples": dict(repo_config["samples"], likeness_pack=str(pack))}
    for name, extra in variants.items():
        on = make_workdir(tmp_path / name, repo_config, publish_dir=str(publish), **extra)
        plan = run_snakemake(on, "-n", cores=1).stdout
        best = [Path(output).name for output in planned(plan, "best_embedding")]
        expected = sorted(str(publish / f"{subject}-ti.safetensors") for subject in ("eva", "tom"))
        expected = sorted(expected + [str(publish / file) for file in best])  # S-ti-best wherever one is built
        assert planned(plan, "publish") == expected
        if name == "likeness":
            assert len(best) == 2


@pytest.mark.slow
def test_publish_copies_the_embedding_bytes(tmp_path, repo_config, run_snakemake):
    publish = tmp_path / "ComfyUI" / "models" / "embeddings"
    workdir = make_workdir(tmp_path / "w", repo_config, publish_dir=str(publish))
    final = workdir / "results" / "eva" / "eva-ti.safetensors"
    best = workdir / "results" / "eva" / "eva-ti-best.safetensors"
    final.parent.mkdir(parents=True)
    tifactory_embedding(final, "eva")
    tifactory_embedding(best, "eva")
    best.write_bytes(best.read_bytes() + b"best")
    # only the publish rule may run: the embeddings above stand in for trained ones
    run_snakemake(workdir, str(publish / "eva-ti.safetensors"), str(publish / "eva-ti-best.safetensors"),
                  "--allowed-rules", "publish", cores=1)
    assert (publish / "eva-ti.safetensors").read_bytes() == final.read_bytes()
    assert (publish / "eva-ti-best.safetensors").read_bytes() == best.read_bytes()
    assert not list(publish.glob(".*"))  # no temp files left behind
    final.write_bytes(final.read_bytes() + b"retrained")  # a newer embedding replaces tifactory's own earlier copy
    run_snakemake(workdir, str(publish / "eva-ti.safetensors"), "--allowed-rules", "publish", cores=1)
    assert (publish / "eva-ti.safetensors").read_bytes() == final.read_bytes()
