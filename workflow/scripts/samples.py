from pathlib import Path

from tifactory.jobs import run_job
from tifactory.sampling.samples import render_sample_grid


def main(smk, log):
    render_sample_grid(
        subject=smk.wildcards.subject, checkpoint_dir=smk.input.checkpoints, prompts_file=smk.input.prompts,
        out_dir=Path(smk.output.grid).parent, extra_embeddings=dict(smk.params.embeddings),
        model_label=smk.params.label, log=log, progress_every_s=smk.config["progress_every_s"],
        **dict(smk.params.samples), **dict(smk.params.model))


run_job(snakemake, main)
