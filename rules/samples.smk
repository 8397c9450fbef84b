# Sample grids (base model + the transfer-check models), loss curve, likeness scores and the best step.


rule samples:
    input:
        checkpoints="results/{subject}/checkpoints",
        embedding="results/{subject}/{subject}-ti.safetensors",
        prompts=workflow_file(config["samples"]["prompts"]),
        embeddings=extra_embedding_inputs,
        model=base_model_input,
    output:
        grid="results/{subject}/samples/grid.png",
        preview=report(
            "results/{subject}/samples/grid_preview.jpg",
            caption="../workflow/report/grid.rst",
            category="{subject}",
            subcategory="sample grids",
            labels={"subject": "{subject}", "model": "base", "figure": "sample grid"},
        ),
        images="results/{subject}/samples/images.tsv",
    params:
        samples=sampling_params,
        model=model_params(),
        embeddings={
            trigger: workflow_file(path) for trigger, path in config["samples"]["embeddings"].items()
        },
        label="base",
    resources:
        gpu=1,
    conda:
        "../envs/tifactory.yaml"
    log:
        "logs/samples/{subject}.log",
    benchmark:
        "benchmarks/samples/{subject}.tsv"
    script:
        "../workflow/scripts/samples.py"


rule samples_transfer:
    input:
        checkpoints="results/{subject}/checkpoints",
        embedding="results/{subject}/{subject}-ti.safetensors",
        prompts=workflow_file(config["samples"]["prompts"]),
        embeddings=extra_embedding_inputs,
        model=eval_model_input,
    output:
        grid="results/{subject}/samples/eval/{eval_model}/grid.png",
        preview=report(
            "results/{subject}/samples/eval/{eval_model}/grid_preview.jpg",
            caption="../workflow/report/grid.rst",
            category="{subject}",
            subcategory="sample grids",
            labels={"subject": "{subject}", "model": "{eval_model}", "figure": "sample grid"},
        ),
        images="results/{subject}/samples/eval/{eval_model}/images.tsv",
    params:
        samples=sampling_params,
        model=eval_model_params,
        embeddings={
            trigger: workflow_file(path) for trigger, path in config["samples"]["embeddings"].items()
        },
        label=lambda wildcards: wildcards.eval_model,
    resources:
        gpu=1,
    conda:
        "../envs/tifactory.yaml"
    log:
        "logs/samples_transfer/{subject}-{eval_model}.log",
    benchmark:
        "benchmarks/samples_transfer/{subject}-{eval_model}.tsv"
    script:
        "../workflow/scripts/samples.py"


rule loss_plot:
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
    params:
        smoothing=0.9,
    conda:
        "../envs/tifactory.yaml"
    log:
        "logs/loss_plot/{subject}.log",
    script:
        "../workflow/scripts/loss_plot.py"


rule likeness:
    input:
        images="results/{subject}/samples/images.tsv",
        grid="results/{subject}/samples/grid.png",
        crops="results/{subject}/crops",
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
    params:
        faces=config["faces"],
        face_models=FACE_MODELS.params(),
    threads: 2
    conda:
        "../envs/tifactory.yaml"
    log:
        "logs/likeness/{subject}.log",
    benchmark:
        "benchmarks/likeness/{subject}.tsv"
    script:
        "../workflow/scripts/likeness.py"


rule best_embedding:
    input:
        summary="results/{subject}/samples/likeness.json",
        checkpoints="results/{subject}/checkpoints",
    output:
        "results/{subject}/{subject}-ti-best.safetensors",
    conda:
        "../envs/tifactory.yaml"
    log:
        "logs/best_embedding/{subject}.log",
    script:
        "../workflow/scripts/best_embedding.py"
