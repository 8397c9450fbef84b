from tifactory.jobs import run_job
from tifactory.demo.tinymodel import build_tiny_model


def main(smk, log):
    build_tiny_model(smk.output[0], seed=smk.params.seed)
    log(f"built the demo-tiny model in {smk.output[0]}: random weights, SD1.5-shaped. Embeddings trained "
        "on it are MEANINGLESS; set base_model in config.yaml to a real SD1.5 checkpoint for real ones.")


run_job(snakemake, main)
