# Demo inputs built on first use: photos derived from images shipped in installed packages, and the taught
# tiny SD1.5-shaped model (tifactory.demo.taught: it knows a few drawn concepts, so a subject whose images show one
# of them (resources/demo_concepts/) learns it; face subjects still learn nothing meaningful on it).


rule demo_photos:
    """Demo raw photos of one demo subject, derived from images shipped in installed packages."""
    output:
        directory(f"{DEMO_PHOTO_ROOT}/{{demo_subject}}"),
    log:
        "logs/demo_photos/{demo_subject}.log",
    conda:
        "../envs/tifactory.yaml"
    script:
        "../workflow/scripts/demo_photos.py"


rule demo_model:
    """The demo's tiny SD1.5-shaped model, taught a few drawn concepts (no download)."""
    output:
        directory(DEMO_MODEL_DIR),
    log:
        "logs/demo_model/demo_model.log",
    conda:
        "../envs/tifactory.yaml"
    params:
        seed=0,
        num_vectors=config["train"]["num_vectors"],
        teach_steps=config["demo_model"]["teach_steps"],
    script:
        "../workflow/scripts/demo_model.py"


rule concept_recovery:
    """How close a demo concept subject's embedding came to the concept the demo model was taught."""
    input:
        model=DEMO_MODEL_DIR,
        embedding="results/{subject}/{subject}-ti.safetensors",
        checkpoints="results/{subject}/checkpoints",
        dataset="results/{subject}/dataset/dataset.toml",
    output:
        "results/{subject}/recovery/recovery.tsv",
    log:
        "logs/concept_recovery/{subject}.log",
    conda:
        "../envs/tifactory.yaml"
    params:
        concept=lambda wildcards: demo_concept(wildcards.subject),
        init_word=lambda wildcards: subject_train_params(wildcards)["init_word"],
    script:
        "../workflow/scripts/concept_recovery.py"
