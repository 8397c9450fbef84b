from pathlib import Path

from tifactory.fileio import empty_folder
from tifactory.jobs import run_job
from tifactory.photos.prepared import adopt_prepared


def main(smk, log):
    out_dir = empty_folder(Path(smk.output.manifest).parent)  # no image of an earlier run stays behind
    manifest = adopt_prepared(smk.input[0], out_dir, resolution=smk.params.resolution,
                              contact_sheet=smk.params.contact_sheet)
    counts = manifest["status"].value_counts().to_dict()
    log(f"prepared dataset used as it is (no face detection, no re-cropping): {counts}")
    for row in manifest.itertuples():
        if row.reason:
            log(f"{row.status} {row.source}: {row.reason}")


run_job(snakemake, main)
