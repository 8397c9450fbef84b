# Sample grids (the base model and each eval model: one rule), loss curve, likeness scores and the best step.


rule samples:
    """Sample grid of every checkpoint on one model: the base model, or an eval model (transfer check)."""
    input:
        unpack(sample_inputs),
        checkpoints="results/{subject}/checkpoints",
        embedding="results/{subject}/{subject}-ti.safetensors",
    output:
        grid="results/{subject}/samples{model_dir}/grid.png",
        preview=report(
            "results/{subject}/samples{model_dir}/grid_preview.jpg",
            caption="../workflow/report/grid.rst",
            category="{subject}",
            subcategory="sample grids",
            labels=sample_report_labels,
        ),
        images="results/{subject}/samples{model_dir}/images.tsv",
    log:
        # logs/samples/S.log for the base model, logs/samples/S/eval/<name>.log for an eval model
        "logs/samples/{subject}{model_dir}.log",
    benchmark:
        "benchmarks/samples/{subject}{model_dir}.tsv"
    conda:
        "../envs/tifactory.yaml"
    resources:
        gpu=1,
    params:
        samples=sample_grid_params,
        model=lambda wildcards: MODELS[sample_model(wildcards)].as_params(),
        embeddings=sample_extra_embeddings,
        label=sample_model,
        trigger=subject_trigger,
    script:
        "../workflow/scripts/samples.py"


rule loss_plot:
    """The training loss curve, raw and smoothed."""
    input:
        "results/{subject}/train/loss.tsv",
    output:
        report(
            "results/{subject}/train/loss.png",
            caption="../workflow/report/loss.rst",
            category="{subject}",
            subcategory="training",
            labels={"subject": "{subject}", "figure": "loss"},
        ),
    log:
        "logs/loss_plot/{subject}.log",
    conda:
        "../envs/tifactory.yaml"
    params:
        smoothing=0.9,
    script:
        "../workflow/scripts/loss_plot.py"


# A checkpoint: whether there is a best step (and so an S-ti-best.safetensors to build and publish) is known
# only once the samples are scored (best_embedding_files in samples_functions.smk reads likeness.json).
checkpoint likeness:
    """Likeness of each step's samples to the training faces; the best step (none when no sample holds a face)."""
    input:
        images="results/{subject}/samples/images.tsv",
        grid="results/{subject}/samples/grid.png",
        crops=CROP_OUTPUTS["manifest"],
        checkpoints="results/{subject}/checkpoints",
    output:
        scores="results/{subject}/samples/scores.tsv",
        plot=report(
            "results/{subject}/samples/likeness.png",
            caption="../workflow/report/likeness.rst",
            category="{subject}",
            subcategory="likeness",
            labels={"subject": "{subject}", "figure": "likeness vs step"},
        ),
        summary="results/{subject}/samples/likeness.json",
    log:
        "logs/likeness/{subject}.log",
    benchmark:
        "benchmarks/likeness/{subject}.tsv"
    conda:
        "../envs/tifactory.yaml"
    threads: 2
    params:
        faces=config["faces"],
        face_models=FACE_MODELS.params(),
    script:
        "../workflow/scripts/likeness.py"


rule best_embedding:
    """A copy of the best step's embedding (by likeness) as S-ti-best.safetensors."""
    input:
        summary="results/{subject}/samples/likeness.json",
        checkpoints="results/{subject}/checkpoints",
    output:
        "results/{subject}/{subject}-ti-best.safetensors",
    log:
        "logs/best_embedding/{subject}.log",
    conda:
        "../envs/tifactory.yaml"
    script:
        "../workflow/scripts/best_embedding.py"
