from pathlib import Path

from tifactory.faces.models import FaceSettings
from tifactory.jobs import run_job
from tifactory.sampling.likeness import score_subject


def main(smk, log):
    score_subject(subject=smk.wildcards.subject, images_tsv=smk.input.images, crops_dir=Path(smk.input.crops).parent,
                  checkpoint_dir=smk.input.checkpoints, scores_tsv=smk.output.scores, plot_png=smk.output.plot,
                  summary_json=smk.output.summary, settings=FaceSettings.from_config(smk.params.faces), workers=smk.threads,
                  log=log)


# the guard: dlib's worker processes are spawned on Windows and macOS, and a spawned worker imports this script
if __name__ == "__main__":
    run_job(snakemake, main)
