from pathlib import Path

from tifactory.families import ModelSpec
from tifactory.jobs import run_job
from tifactory.sampling.samples import SampleSettings, render_sample_grid


def main(smk, log):
    render_sample_grid(
        model=ModelSpec.from_params(smk.params.model), settings=SampleSettings.from_config(dict(smk.params.samples)),
        subject=smk.wildcards.subject, checkpoint_dir=smk.input.checkpoints, prompts_file=smk.input.prompts,
        out_dir=Path(smk.output.grid).parent, extra_embeddings=dict(smk.params.embeddings),
        model_label=smk.params.label, log=log, progress_every_s=smk.config["progress_every_s"])


run_job(snakemake, main)
