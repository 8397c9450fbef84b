from pathlib import Path

from tifactory.training.embedding import load_embedding
from tifactory.jobs import run_job
from tifactory.demo.taught import other_concept, recovery_table


def main(smk, log):
    embeddings = {0: None}  # step 0: the init word alone, as the grid's first row
    for path in [*Path(smk.input.checkpoints).glob("*.safetensors"), Path(smk.input.embedding)]:
        vectors, metadata = load_embedding(path)
        embeddings[int(metadata["tifactory.step"])] = [vectors]  # the demo model is SD1.5: one encoder
    dataset_dir = Path(smk.input.dataset).parent  # the kohya image folder sits beside dataset.toml
    images = sorted(path for path in dataset_dir.rglob("*") if path.suffix.lower() == ".png")
    concept = smk.params.concept
    rows = recovery_table(smk.input.model, embeddings, concept=concept, init_word=smk.params.init_word,
                          images=images, out_tsv=smk.output[0])
    last = rows[-1]
    log(f"concept {concept!r} (vs {other_concept(concept)!r}) after step {last['step']}: conditioning distance "
        f"{last['cond_dist_target']:.3f} to it, {last['cond_dist_other']:.3f} to the other; loss gap closed "
        f"{last['gap_closed']:.2f}")


run_job(snakemake, main)
