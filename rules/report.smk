# Report pages for `snakemake --report report.html`: one summary per subject and the roster overview.


rule subject_summary:
    input:
        unpack(
            lambda wildcards: {
                "raw": f"results/{wildcards.subject}/raw/manifest.tsv",
                "crops": f"results/{wildcards.subject}/crops",
                "loss": f"results/{wildcards.subject}/train/loss.png",
                "likeness": f"results/{wildcards.subject}/samples/likeness.json",
                "likeness_plot": f"results/{wildcards.subject}/samples/likeness.png",
                "scores": f"results/{wildcards.subject}/samples/scores.tsv",
                "embedding": f"results/{wildcards.subject}/{wildcards.subject}-ti.safetensors",
                **{f"grid_{name}": path for name, path in subject_grids(wildcards).items()},
                **(
                    {"recovery": f"results/{wildcards.subject}/recovery/recovery.tsv"}
                    if demo_concept(wildcards.subject)
                    else {}
                ),
            }
        ),
    output:
        report(
            "results/{subject}/report/summary.html",
            caption="../workflow/report/summary.rst",
            category="{subject}",
            subcategory="summary",
            labels={"subject": "{subject}", "figure": "summary"},
        ),
    params:
        recipe=subject_train_params,
        samples=sampling_params,
        model=model_params(),
        eval_models=list(EVAL_MODELS),
    conda:
        "../envs/tifactory.yaml"
    log:
        "logs/subject_summary/{subject}.log",
    script:
        "../workflow/scripts/subject_summary.py"


rule roster_overview:
    input:
        raw=expand("results/{subject}/raw/manifest.tsv", subject=SUBJECTS),
        crops=expand("results/{subject}/crops", subject=SUBJECTS),
        likeness=expand("results/{subject}/samples/likeness.json", subject=SUBJECTS),
        embeddings=expand("results/{subject}/{subject}-ti.safetensors", subject=SUBJECTS),
    output:
        report(
            "results/report/roster.html",
            caption="../workflow/report/roster.rst",
            category="0. Roster overview",
            labels={"page": "roster overview"},
        ),
    params:
        subjects=SUBJECTS,
        class_words=[ROSTER[subject]["class_word"] for subject in SUBJECTS],
    conda:
        "../envs/tifactory.yaml"
    log:
        "logs/roster_overview/roster_overview.log",
    script:
        "../workflow/scripts/roster_overview.py"
