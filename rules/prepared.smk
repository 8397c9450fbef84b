# Prepared kohya datasets (roster `prepared`, see tifactory/photos/sources.py) skip face cropping: this rule writes
# the crop stage's files (CROP_OUTPUTS) in rule crop's place, with the collected images copied unchanged.


rule prepared_crops:
    """A prepared dataset's images used as they are, in the crop stage's place (manifest, contact sheet)."""
    input:
        "results/{subject}/raw/manifest.tsv",
    output:
        **CROP_OUTPUTS,
    log:
        "logs/prepared_crops/{subject}.log",
    wildcard_constraints:
        # only prepared subjects (never matches when there are none); rule crop serves the others
        subject="|".join(PREPARED_SUBJECTS) or "(?!)",
    conda:
        "../envs/tifactory.yaml"
    params:
        resolution=lambda wildcards: subject_train_params(wildcards)["resolution"],
        contact_sheet=config["crop"]["contact_sheet"],
    script:
        "../workflow/scripts/prepared_crops.py"


# both rules declare the same files (CROP_OUTPUTS): for a prepared subject this one makes them
ruleorder: prepared_crops > crop
