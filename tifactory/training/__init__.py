"""Stage 4, training: `models` loads an SD1.5 base model (diffusers folder or single file, offline, with the
shipped configs and tokenizer of `sd15`), `model_check` names a wrong model at DAG time, `templates` holds the
prompt templates and token strings, `train` is the loop, and `embedding` owns the embedding file format (tensor key, file names, the checkpoint
listing and the one reader).
A new model family (SDXL) adds its loader, checks and format here.
"""
