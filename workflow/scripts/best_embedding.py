from tifactory.jobs import run_job
from tifactory.sampling.likeness import copy_best


def main(smk, log):
    copy_best(smk.input.summary, smk.output[0])
    log(f"copied the best checkpoint to {smk.output[0]}")


run_job(snakemake, main)
