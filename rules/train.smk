# Resumable state lives in results/{subject}/train_state/ (not a declared output), so a killed or
# failed job restarts from its last checkpoint instead of from scratch.


rule train:
    """Textual-inversion training: the final embedding, a checkpoint every save_every_n_steps, the loss."""
    input:
        dataset="results/{subject}/dataset/dataset.toml",
        model=base_model_input,
    output:
        embedding="results/{subject}/{subject}-ti.safetensors",
        checkpoints=directory("results/{subject}/checkpoints"),
        loss="results/{subject}/train/loss.tsv",
    log:
        "logs/train/{subject}.log",
    benchmark:
        "benchmarks/train/{subject}.tsv"
    conda:
        "../envs/tifactory.yaml"
    resources:
        gpu=1,
    params:
        recipe=subject_train_params,
        model=MODELS["base"].as_params(),
        state_dir="results/{subject}/train_state",
    script:
        "../workflow/scripts/train.py"
