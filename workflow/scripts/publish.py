from tifactory.jobs import run_job
from tifactory.publish import publish_embedding


def main(smk, log):
    log(publish_embedding(smk.input[0], smk.output[0], smk.params.subject,
                          replace_others=smk.params.replace_others))


run_job(snakemake, main)
