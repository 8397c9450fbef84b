from tifactory.jobs import run_job
from tifactory.sampling.plots import plot_loss


def main(smk, log):
    plot_loss(smk.input[0], smk.output[0], subject=smk.wildcards.subject, smoothing=smk.params.smoothing)
    log(f"wrote {smk.output[0]}")


run_job(snakemake, main)
