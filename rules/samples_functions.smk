# Models, settings, paths and targets of rules/samples.smk and rules/report.smk (no rules here, see
# `snakemake --lint`). Parse time stays cheap: only path checks here; torch and the face models load inside the jobs.


# Every model gets the same grid from one `samples` rule. The base model is the model named "base" (the
# schema keeps that name out of `eval_models`), beside each `eval_models` entry (transfer check): MODELS, the
# ModelSpecs of rules/common.smk.
EVAL_MODELS = [name for name in MODELS if name != "base"]


def samples_dir(subject, model):
    """The folder of one model's grid: results/S/samples for the base model, results/S/samples/eval/<name> for
    an eval model (README's paths). Rule `samples` writes to results/{subject}/samples{model_dir}/."""
    return os.path.join(f"results/{subject}/samples", *([] if model == "base" else ["eval", model]))


wildcard_constraints:
    # the tail of a grid folder after results/S/samples: "" (the base model) or /eval/<an eval model's name>
    model_dir=f"(?:/eval/(?:{'|'.join(EVAL_MODELS)}))?" if EVAL_MODELS else "(?:)",


def sample_model(wildcards):
    """The model name of a `samples` job: "base", or the eval model its folder names."""
    return os.path.basename(wildcards.model_dir) or "base"


def sample_settings(wildcards):
    """One subject's samples settings, read here and nowhere else: config `samples` (demo overrides
    applied) plus the subject's init word. The report shows them as they are; rule `samples` takes the
    files as inputs (sample_inputs) and the rest as params (sample_grid_params)."""
    settings = native_sizes(merged_section(config, "samples"), NATIVE_RESOLUTION, ("width", "height"))
    settings["init_word"] = subject_train_params(wildcards)["init_word"]
    return settings


SAMPLE_FILE_KEYS = ("prompts", "embeddings")


def sample_extra_embeddings(wildcards):
    """{trigger: file} of the extra embeddings the prompts may use (paths resolved by workflow_file)."""
    extra = sample_settings(wildcards)["embeddings"]
    return {trigger: workflow_file(path) for trigger, path in extra.items()}


def sample_inputs(wildcards):
    """The files a grid is made from besides the checkpoints: prompts, extra embeddings, the model's files."""
    return {
        "prompts": workflow_file(sample_settings(wildcards)["prompts"]),
        "embeddings": list(sample_extra_embeddings(wildcards).values()),
        "model": model_files(MODELS[sample_model(wildcards)]),
    }


def sample_grid_params(wildcards):
    """The grid's settings, as tifactory.sampling.samples.SampleSettings.from_config takes them (files aside)."""
    settings = sample_settings(wildcards)
    return {key: value for key, value in settings.items() if key not in SAMPLE_FILE_KEYS}


def sample_report_labels(wildcards):
    return {"subject": wildcards.subject, "model": sample_model(wildcards), "figure": "sample grid"}


def samples_targets():
    """Per-subject outputs of this file and report.smk that `rule all` builds."""
    targets = [
        "results/{subject}/train/loss.png",
        "results/{subject}/samples/scores.tsv",
        "results/{subject}/report/summary.html",
    ]
    # S-ti-best.safetensors is not listed here: whether there is one is known after the likeness job
    # (best_embedding_files, asked for by the subject's report page)
    grids = [f"{samples_dir(subject, name)}/grid.png" for subject in SUBJECTS for name in EVAL_MODELS]
    return expand(targets, subject=SUBJECTS) + grids + ["results/report/roster.html"]


def subject_grids(wildcards):
    """model -> the grid preview of each model, for the subject's report page."""
    return {name: f"{samples_dir(wildcards.subject, name)}/grid_preview.jpg" for name in MODELS}


def best_embedding_files(wildcards):
    """S-ti-best.safetensors (and its copy in publish_dir) when the likeness job chose a best step, else nothing.
    Likeness is a checkpoint (until its job has run this raises, and Snakemake asks again after it).
    No best step (no face in any sample, or a demo concept subject, whose images hold no face): no file, and
    the report pages and the end summary say "not scored" (tifactory.verdict)."""
    from tifactory.verdict import likeness_best_step

    if demo_concept(wildcards.subject):
        return []
    summary = checkpoints.likeness.get(subject=wildcards.subject).output.summary
    if likeness_best_step(summary) is None:
        return []
    best = f"results/{wildcards.subject}/{wildcards.subject}-ti-best.safetensors"
    return [best] + publish_targets([best])
