from tifactory.jobs import run_job
from tifactory.likeness import InsightfaceRecogniser, insightface_pack_available, insightface_pack_dir, score_subject


def main(smk, log):
    recogniser, reason = None, ""
    if insightface_pack_available(smk.params.pack, smk.params.root):
        recogniser = InsightfaceRecogniser(smk.params.pack, smk.params.root)
    else:
        reason = (f"no insightface model pack at {insightface_pack_dir(smk.params.pack, smk.params.root)} "
                  "(set samples.likeness_pack / likeness_root; nothing is downloaded)")
    score_subject(subject=smk.wildcards.subject, images_tsv=smk.input.images, crops_dir=smk.input.crops,
                  checkpoint_dir=smk.input.checkpoints, scores_tsv=smk.output.scores, plot_png=smk.output.plot,
                  summary_json=smk.output.summary, recogniser=recogniser, reason=reason, log=log)


run_job(snakemake, main)
