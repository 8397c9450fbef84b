# Optional `publish_dir` (A1111's embeddings/, ComfyUI's models/embeddings/): a copy of each final embedding
# (and of the likeness stage's best one) where the UIs look for them. `rule all` asks for them when it is set
# (publish_targets in common.smk).
if PUBLISH_DIR:

    localrules:
        publish,

    rule publish:
        input:
            "results/{subject}/{subject}{suffix}.safetensors",
        output:
            os.path.join(PUBLISH_DIR, "{subject}{suffix}.safetensors"),
        log:
            "logs/publish/{subject}{suffix}.log",
        wildcard_constraints:
            suffix="-ti|-ti-best",
        conda:
            "../envs/tifactory.yaml"
        script:
            "../workflow/scripts/publish.py"
