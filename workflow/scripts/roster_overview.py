from pathlib import Path

from tifactory.jobs import run_job
from tifactory.report import roster_overview
from tifactory.verdict import VerdictSettings


def main(smk, log):
    subjects = [
        {"subject": subject, "class_word": class_word, "raw_manifest": raw, "crops_dir": str(Path(crops).parent),
         "likeness_json": likeness, "embedding": embedding, "images_tsv": images, "trigger": trigger}
        for subject, class_word, trigger, raw, crops, likeness, embedding, images in zip(
            smk.params.subjects, smk.params.class_words, smk.params.triggers, smk.input.raw, smk.input.crops,
            smk.input.likeness, smk.input.embeddings, smk.input.images)
    ]
    roster_overview(out_html=smk.output[0], subjects=subjects,
                    verdict_settings=VerdictSettings.from_config(smk.params.verdict), results_dir="results")
    log(f"wrote {smk.output[0]}: {len(subjects)} subjects")


run_job(snakemake, main)
