from tifactory.demo.photos import make_demo_photos
from tifactory.jobs import run_job


def main(smk, log):
    paths = make_demo_photos(smk.wildcards.demo_subject, smk.output[0])
    log(f"wrote {len(paths)} demo photos derived from packaged images into {smk.output[0]}")


run_job(snakemake, main)
