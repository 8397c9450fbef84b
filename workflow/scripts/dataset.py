from pathlib import Path

from tifactory.fileio import empty_folder
from tifactory.jobs import run_job
from tifactory.photos.dataset import build_dataset


def main(smk, log):
    crops_manifest = Path(smk.input[0])
    dataset_dir = empty_folder(Path(smk.output[0]).parent)  # no image folder of earlier settings stays behind
    toml_path = build_dataset(
        crops_manifest=crops_manifest, crops_dir=crops_manifest.parent, dataset_dir=dataset_dir,
        subject=smk.wildcards.subject, class_word=smk.params.class_word, repeats=smk.params.repeats,
        resolution=smk.params.resolution, bucket=dict(smk.params.bucket))
    log(f"wrote {toml_path}")


run_job(snakemake, main)
