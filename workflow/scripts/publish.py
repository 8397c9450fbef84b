from tifactory.fileio import copy_file_atomic
from tifactory.jobs import run_job


def main(smk, log):
    copy_file_atomic(smk.input[0], smk.output[0])
    log(f"published {smk.input[0]} -> {smk.output[0]}")


run_job(snakemake, main)
