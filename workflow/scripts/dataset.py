from pathlib import Path

from tifactory.photos.dataset import build_dataset
from tifactory.jobs import run_job


def main(smk, log):
    crops_dir = Path(smk.input[0])
    toml_path = build_dataset(
        crops_manifest=crops_dir / "manifest.tsv", crops_dir=crops_dir, dataset_dir=smk.output[0],
        subject=smk.wildcards.subject, class_word=smk.params.class_word, repeats=smk.params.repeats,
        resolution=smk.params.resolution, bucket=dict(smk.params.bucket))
    log(f"wrote {toml_path}")


run_job(snakemake, main)
