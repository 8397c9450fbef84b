from tifactory.jobs import run_job
from tifactory.prepared import adopt_prepared


def main(smk, log):
    manifest = adopt_prepared(smk.input[0], smk.output[0], resolution=smk.params.resolution)
    counts = manifest["status"].value_counts().to_dict()
    log(f"prepared dataset used as it is (no face detection, no re-cropping): {counts}")
    for row in manifest.itertuples():
        if row.reason:
            log(f"{row.status} {row.source}: {row.reason}")


run_job(snakemake, main)
