from pathlib import Path

from tifactory.jobs import run_job
from tifactory.worker_client import WorkerSettings, run_stage


def main(smk, log):
    run_stage("samples", dict(
        subject=smk.wildcards.subject, checkpoint_dir=smk.input.checkpoints, prompts_file=smk.input.prompts,
        out_dir=str(Path(smk.output.grid).parent), extra_embeddings=dict(smk.params.embeddings),
        model_label=smk.params.label, trigger=smk.params.trigger, progress_every_s=smk.config["progress_every_s"],
        samples=dict(smk.params.samples), model=dict(smk.params.model)),
        settings=WorkerSettings.from_config(smk.config), log=log)


run_job(snakemake, main)
