# Settings and input functions of rules/samples.smk and rules/report.smk (no rules here, see `snakemake --lint`).
# Parse time stays cheap: only path checks here; torch and the face models load inside the jobs.
EVAL_MODELS = {entry["name"]: entry for entry in config.get("eval_models", [])}


wildcard_constraints:
    eval_model="|".join(EVAL_MODELS) or "no-eval-models",


def sampling_params(wildcards):
    """The samples section (demo overrides applied), plus the init word."""
    return sample_params(wildcards)


def extra_embedding_inputs(wildcards):
    return [workflow_file(path) for path in config["samples"]["embeddings"].values()]


def eval_model_params(wildcards):
    entry = EVAL_MODELS[wildcards.eval_model]
    return {"base_model": entry["path"], "base_model_config": entry.get("config", ""), "vae": entry.get("vae", "")}


def eval_model_input(wildcards):
    return [path for path in eval_model_params(wildcards).values() if path]


def samples_targets():
    """Per-subject outputs of this file and report.smk that `rule all` builds."""
    targets = [
        "results/{subject}/train/loss.png",
        "results/{subject}/samples/scores.tsv",
        "results/{subject}/report/summary.html",
        "results/{subject}/{subject}-ti-best.safetensors",
    ]
    targets += [f"results/{{subject}}/samples/eval/{name}/grid.png" for name in EVAL_MODELS]
    return expand(targets, subject=SUBJECTS) + ["results/report/roster.html"]


def subject_grids(wildcards):
    grids = {"base": f"results/{wildcards.subject}/samples/grid_preview.jpg"}
    for name in EVAL_MODELS:
        grids[name] = f"results/{wildcards.subject}/samples/eval/{name}/grid_preview.jpg"
    return grids
