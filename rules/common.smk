# Roster, input functions and wildcard constraints shared by every rule. Parse time stays cheap:
# nothing here imports torch or image libraries.
import os

from tifactory.roster import (
    DEMO_MODEL_NAME,
    RosterError,
    is_demo,
    list_source_files,
    merged_section,
    read_roster,
    split_sources,
    train_params,
)
from tifactory.demo import DEMO_SUBJECTS

DEMO_MODEL_DIR = f"resources/models/{DEMO_MODEL_NAME}"
DEMO_PHOTO_ROOT = "resources/demo_photos"

try:
    ROSTER = {row["subject"]: row for row in read_roster(config["roster"])}
except RosterError as error:
    raise WorkflowError(str(error)) from None

SUBJECTS = sorted(ROSTER)


wildcard_constraints:
    subject="|".join(SUBJECTS),
    demo_subject="|".join(DEMO_SUBJECTS),


def all_targets():
    return expand(
        [
            "results/{subject}/{subject}-ti.safetensors",
            "results/{subject}/samples/grid.png",
        ],
        subject=SUBJECTS,
    ) + ["results/summary/crops.tsv"] + samples_targets()


def demo_source_subject(source):
    """The demo subject whose generated photo folder `source` names, or None."""
    folder = os.path.normpath(source)
    name = os.path.basename(folder)
    if os.path.dirname(folder) == DEMO_PHOTO_ROOT and name in DEMO_SUBJECTS:
        return name
    return None


def collect_inputs(wildcards):
    """Every photo file the subject's sources name (so an edited photo reruns that subject only);
    a demo photo folder is the output of rule demo_photos instead."""
    sources = ROSTER[wildcards.subject]["sources"]
    demo_folders = [os.path.normpath(s) for s in split_sources(sources) if demo_source_subject(s)]
    others = ";".join(s for s in split_sources(sources) if not demo_source_subject(s))
    return demo_folders + list_source_files(others)


def base_model_input(wildcards):
    if is_demo(config):
        return DEMO_MODEL_DIR
    return [path for path in (config["base_model"], config["vae"], config["base_model_config"]) if path]


def model_params():
    return {
        "base_model": DEMO_MODEL_DIR if is_demo(config) else config["base_model"],
        "base_model_config": config["base_model_config"],
        "vae": config["vae"],
    }


def subject_train_params(wildcards):
    return train_params(config, ROSTER[wildcards.subject])


def subject_repeats(wildcards):
    return ROSTER[wildcards.subject].get("repeats", config["dataset"]["repeats"])


def subject_class_word(wildcards):
    return ROSTER[wildcards.subject]["class_word"]


def sample_params(wildcards):
    params = merged_section(config, "samples")
    params["init_word"] = subject_train_params(wildcards)["init_word"]
    return params


def workflow_file(path):
    """A config path relative to the working directory, else to the workflow's folder."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    return os.path.join(workflow.basedir, path)
