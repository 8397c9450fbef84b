# Prepared kohya datasets (roster `prepared`, see tifactory/sources.py) skip face cropping: this rule writes
# results/{subject}/crops/ in the crop stage's place, with the collected images copied unchanged.


rule prepared_crops:
    input:
        "results/{subject}/raw/manifest.tsv",
    output:
        directory("results/{subject}/crops"),
    log:
        "logs/prepared_crops/{subject}.log",
    wildcard_constraints:
        # only prepared subjects (never matches when there are none); rule crop serves the others
        subject="|".join(PREPARED_SUBJECTS) or "(?!)",
    conda:
        "../envs/tifactory.yaml"
    params:
        resolution=lambda wildcards: subject_train_params(wildcards)["resolution"],
    script:
        "../workflow/scripts/prepared_crops.py"


ruleorder: prepared_crops > crop
