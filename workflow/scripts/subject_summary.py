from pathlib import Path

from tifactory.jobs import run_job
from tifactory.report import subject_summary
from tifactory.verdict import VerdictSettings


def main(smk, log):
    grids = {"base": smk.input.grid_base}
    grids.update({name: smk.input[f"grid_{name}"] for name in smk.params.eval_models})
    subject_summary(subject=smk.wildcards.subject, out_html=smk.output[0], raw_manifest=smk.input.raw,
                    crops_dir=Path(smk.input.crops).parent, loss_png=smk.input.loss, grids=grids,
                    likeness_json=smk.input.likeness, likeness_png=smk.input.likeness_plot,
                    scores_tsv=smk.input.scores, embedding=smk.input.embedding, recipe=dict(smk.params.recipe),
                    samples=dict(smk.params.samples), model=dict(smk.params.model),
                    recovery_tsv=smk.input.get("recovery"),
                    verdict_settings=VerdictSettings.from_config(smk.params.verdict))
    log(f"wrote {smk.output[0]}")


run_job(snakemake, main)
