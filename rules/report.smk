# Report pages for `snakemake --report report.html`: one summary per subject and the roster overview.


rule subject_summary:
    """One subject's report page: counts, crops, loss, likeness, grids, recipe, provenance."""

    # it also asks for the best step's embedding (and its published copy) where the likeness job chose one
    input:
        unpack(
            lambda wildcards: {
                "raw": f"results/{wildcards.subject}/raw/manifest.tsv",
                "crops": f"results/{wildcards.subject}/crops/manifest.tsv",
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
        best=best_embedding_files,
    output:
        report(
            "results/{subject}/report/summary.html",
            caption="../workflow/report/summary.rst",
            category="{subject}",
            subcategory="summary",
            labels={"subject": "{subject}", "figure": "summary"},
        ),
    log:
        "logs/subject_summary/{subject}.log",
    conda:
        "../envs/tifactory.yaml"
    params:
        recipe=subject_train_params,
        samples=sample_settings,
        model=MODELS["base"].as_params(),
        eval_models=EVAL_MODELS,
        verdict=config["verdict"],
    message:
        "subject_summary {wildcards.subject}: the subject's page -> {output} (log: {log})"
    script:
        "../workflow/scripts/subject_summary.py"


rule roster_overview:
    """The roster page to open first: each subject's verdict, a sample, a crop, likeness, a link."""
    input:
        raw=expand("results/{subject}/raw/manifest.tsv", subject=SUBJECTS),
        crops=expand(CROP_OUTPUTS["manifest"], subject=SUBJECTS),
        likeness=expand("results/{subject}/samples/likeness.json", subject=SUBJECTS),
        embeddings=expand("results/{subject}/{subject}-ti.safetensors", subject=SUBJECTS),
        images=expand("results/{subject}/samples/images.tsv", subject=SUBJECTS),
        scores=expand("results/{subject}/samples/scores.tsv", subject=SUBJECTS),
    output:
        report(
            "results/report/roster.html",
            caption="../workflow/report/roster.rst",
            category="0. Roster overview",
            labels={"page": "roster overview"},
        ),
    log:
        "logs/roster_overview/roster_overview.log",
    conda:
        "../envs/tifactory.yaml"
    params:
        subjects=SUBJECTS,
        class_words=[ROSTER[subject]["class_word"] for subject in SUBJECTS],
        triggers=[output_name(ROSTER[subject]) for subject in SUBJECTS],
        verdict=config["verdict"],
    # one line instead of Snakemake's job info, which lists four files per subject
    message:
        f"roster_overview (roster): the page to open first, {len(SUBJECTS)} subject(s) -> {{output}} (log: {{log}})"
    script:
        "../workflow/scripts/roster_overview.py"
