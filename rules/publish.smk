# Optional `publish_dir` (A1111's embeddings/, ComfyUI's models/embeddings/): a copy of each final embedding
# (and of the likeness stage's best one) where the UIs look, named by the roster's output_name (default S-ti).
# `rule all` asks for them when it is set and the base model is not the demo's (publish_targets in common.smk);
# a file there that tifactory did not write is never replaced unless publish_replace_others is true.
if PUBLISH_DIR:

    localrules:
        publish,

    rule publish:
        """A copy of a final (or best) embedding in publish_dir, where the UIs look."""
        input:
            publish_source,
        output:
            os.path.join(PUBLISH_DIR, "{published}.safetensors"),
        log:
            "logs/publish/{published}.log",
        wildcard_constraints:
            published=subject_regex(),
        conda:
            "../envs/tifactory.yaml"
        params:
            subject=publish_subject,
            replace_others=config["publish_replace_others"],
        script:
            "../workflow/scripts/publish.py"
