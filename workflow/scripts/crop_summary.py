from tifactory.jobs import run_job
from tifactory.summary import summarize_crops


def main(smk, log):
    manifests = dict(zip(smk.params.subjects, smk.input))
    table = summarize_crops(manifests, smk.output[0])
    log(f"summary of {len(table)} subject(s) written to {smk.output[0]}")


run_job(snakemake, main)
