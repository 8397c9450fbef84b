"""Stage 4, training: `train` runs the phases and the loop, `data` the data pipeline (images, buckets, latents,
the step plan, prompts), `settings` the recipe (TrainSettings), `model_check` names a wrong model and answers its
family at DAG time, `templates` holds the prompt templates and token strings, `sd15` the shipped SD1.5 configs and
tokenizer, and `embedding` owns the embedding file format (tensor keys, file names, the checkpoint listing and the
one reader). What differs between model families (loading included) lives in tifactory.families.
"""
