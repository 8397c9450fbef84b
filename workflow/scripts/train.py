from pathlib import Path

from tifactory.jobs import run_job
from tifactory.training.train import train_embedding


def main(smk, log):
    model = dict(smk.params.model)
    train_embedding(
        dataset_toml=Path(smk.input.dataset) / "dataset.toml", subject=smk.wildcards.subject,
        params=dict(smk.params.recipe), final_path=smk.output.embedding,
        checkpoint_dir=smk.output.checkpoints, loss_tsv=smk.output.loss, state_dir=smk.params.state_dir,
        log=log, progress_every_s=smk.config["progress_every_s"], **model)


run_job(snakemake, main)
