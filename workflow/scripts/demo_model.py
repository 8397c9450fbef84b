from tifactory.jobs import run_job
from tifactory.demo.taught import build_taught_model
from tifactory.roster import DEMO_MODEL_FAMILY


def main(smk, log):
    build_taught_model(smk.output[0], family=DEMO_MODEL_FAMILY, num_vectors=smk.params.num_vectors,
                       steps=smk.params.teach_steps, seed=smk.params.seed, log=log)
    log(f"built the taught demo model in {smk.output[0]}: tiny and SD1.5-shaped, it knows only a few drawn "
        "concepts (tifactory.demo.taught). Set base_model in config.yaml to a real SD1.5 checkpoint for real embeddings.")


run_job(snakemake, main)
