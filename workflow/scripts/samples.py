from pathlib import Path

from tifactory.jobs import run_job
from tifactory.sampling.samples import render_sample_grid


def main(smk, log):
    samples = dict(smk.params.samples)
    samples.pop("prompts")
    samples.pop("embeddings", None)
    render_sample_grid(
        subject=smk.wildcards.subject, checkpoint_dir=smk.input.checkpoints, prompts_file=smk.input.prompts,
        out_dir=Path(smk.output.grid).parent, extra_embeddings=dict(smk.params.embeddings),
        model_label=smk.params.label, log=log, **samples, **dict(smk.params.model))


run_job(snakemake, main)
