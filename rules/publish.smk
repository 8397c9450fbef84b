# Optional `publish_dir` (A1111's embeddings/, ComfyUI's models/embeddings/): a copy of each final embedding
# (and of the likeness stage's best one) where the UIs look for them. `rule all` asks for them when it is set.
PUBLISH_DIR = os.path.expanduser(config.get("publish_dir") or "")


def publish_targets():
    if not PUBLISH_DIR:
        return []
    suffixes = ["-ti"] + (["-ti-best"] if LIKENESS_AVAILABLE else [])  # -ti-best exists only when scored
    return [os.path.join(PUBLISH_DIR, f"{subject}{suffix}.safetensors") for subject in SUBJECTS for suffix in suffixes]


if PUBLISH_DIR:

    localrules:
        publish,

    rule publish:
        input:
            "results/{subject}/{subject}{suffix}.safetensors",
        output:
            os.path.join(PUBLISH_DIR, "{subject}{suffix}.safetensors"),
        wildcard_constraints:
            suffix="-ti|-ti-best",
        conda:
            "../envs/tifactory.yaml"
        log:
            "logs/publish/{subject}{suffix}.log",
        script:
            "../workflow/scripts/publish.py"
