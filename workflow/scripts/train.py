from tifactory.jobs import run_job
from tifactory.worker_client import WorkerSettings, run_stage


def main(smk, log):
    run_stage("train", dict(
        dataset_toml=smk.input.dataset, subject=smk.wildcards.subject, recipe=dict(smk.params.recipe),
        final_path=smk.output.embedding, checkpoint_dir=smk.output.checkpoints, loss_tsv=smk.output.loss,
        state_dir=smk.params.state_dir, progress_every_s=smk.config["progress_every_s"],
        trigger=smk.params.trigger, model=dict(smk.params.model)),
        settings=WorkerSettings.from_config(smk.config), log=log)


run_job(snakemake, main)
