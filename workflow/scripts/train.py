from tifactory.families import ModelSpec
from tifactory.jobs import run_job
from tifactory.training.settings import TrainSettings
from tifactory.training.train import train_embedding


def main(smk, log):
    train_embedding(
        dataset_toml=smk.input.dataset, model=ModelSpec.from_params(smk.params.model), subject=smk.wildcards.subject,
        settings=TrainSettings.from_config(dict(smk.params.recipe)), final_path=smk.output.embedding,
        checkpoint_dir=smk.output.checkpoints, loss_tsv=smk.output.loss, state_dir=smk.params.state_dir,
        log=log, progress_every_s=smk.config["progress_every_s"])


run_job(snakemake, main)
