# Roster, input functions and wildcard constraints shared by every rule. Parse time stays cheap:
# nothing here imports torch or image libraries.
import copy
import functools
import os
import re
import sys

from tifactory.roster import (
    DEMO_MODEL_NAME,
    RESERVED_SUBJECTS,
    RosterError,
    is_demo,
    keep_explicit_settings,
    list_source_files,
    merged_section,
    native_sizes,
    read_roster_rows,
    recipe_problems,
    split_sources,
    subject_regex,
    train_params,
)
from tifactory.configuration import non_finite_numbers
from tifactory.families import family_named
from tifactory.publish import blocked_files, check_publish_dir, output_name, published_files
from tifactory.demo.photos import DEMO_SUBJECTS
from tifactory.training.model_check import check_subject_tokens, model_specs, tokenizer_folder
from tifactory.faces.models import FaceModelError, FaceSettings, resolve as resolve_face_models
from tifactory.jobs import share_compile_cache
from tifactory.run_mark import mark_run

# every GPU job this run starts (and, on a cluster, every job that re-parses this file) compiles into
# one cache folder: only a roster's first job compiles from scratch
share_compile_cache(config["compile_cache"])
# the run's name for its GPU jobs: they share one GPU worker per slot, never another run's (tifactory.worker_client)
if workflow.is_main_process:
    mark_run()

DEMO_MODEL_DIR = f"resources/models/{DEMO_MODEL_NAME}"
DEMO_PHOTO_ROOT = "resources/demo_photos"


class Roster(dict):
    """Subject -> roster row. A subject not in the roster (a mistyped target) fails with this message in
    whichever input function asks first: the `subject` wildcard is a pattern, not the list of names."""

    def __missing__(self, subject):
        raise WorkflowError(f"subject {subject!r} is not in the roster {config['roster']} ({len(self)} subjects)")


try:
    _good_rows, ROSTER_PROBLEMS = read_roster_rows(config["roster"])
except RosterError as error:
    raise WorkflowError(str(error)) from None
if not _good_rows:
    raise WorkflowError(
        f"roster {config['roster']}: no usable subjects" + "".join(f"\n  {problem}" for problem in ROSTER_PROBLEMS)
    )
if ROSTER_PROBLEMS:  # the good rows go on; the job roster_check fails with these messages
    print(
        f"WARNING: roster {config['roster']}: {len(ROSTER_PROBLEMS)} bad row(s) left out (job roster_check "
        "fails with them; the other subjects still run with --keep-going):"
        + "".join(f"\n  {problem}" for problem in ROSTER_PROBLEMS),
        file=sys.stderr,
    )
ROSTER = Roster((row["subject"], row) for row in _good_rows)
if set(RESERVED_SUBJECTS) & set(ROSTER):
    raise WorkflowError(f"roster {config['roster']}: subject names {RESERVED_SUBJECTS} are reserved (results/<name>/)")

SUBJECTS = sorted(ROSTER)
# A user's roster on the demo's toy model: said loudly now and again in the end summary (tifactory.run_summary)
from tifactory.run_summary import demo_model_warning

DEMO_MODEL_WARNING = (
    demo_model_warning(DEMO_MODEL_NAME, {s: split_sources(ROSTER[s]["sources"]) for s in SUBJECTS})
    if is_demo(config)
    else ""
)
if DEMO_MODEL_WARNING:
    print(f"\n{'!' * 78}\n{DEMO_MODEL_WARNING}\n{'!' * 78}\n", file=sys.stderr)
# subjects whose sources are prepared kohya datasets (tifactory.photos.sources): rule prepared_crops replaces the crop
PREPARED_SUBJECTS = [subject for subject in SUBJECTS if ROSTER[subject]["prepared"] == "yes"]

# NaN and infinite numbers pass the schema's bounds (every comparison with NaN is false): named here.
_non_finite = non_finite_numbers(config)
if _non_finite:
    raise WorkflowError("config: numbers must be finite:\n  " + "\n  ".join(_non_finite))

# With the demo model, a setting given with --config wins over demo_overrides (and the log says so).
for _note in keep_explicit_settings(config, dict(workflow.config_settings.config or {})):
    print(f"note: {_note}", file=sys.stderr)

# Every model as the ModelSpec the jobs get (its family detected from its files), and wrong models and a
# publish_dir that cannot receive copies named before any job runs (file headers and key names only; no
# torch). "base" is the base model; the others are the eval_models entries by name.
MODELS, _model_problems = model_specs(config, demo_model_dir=DEMO_MODEL_DIR)
_model_problems += check_publish_dir(os.path.expanduser(config.get("publish_dir") or ""))
if _model_problems:
    raise WorkflowError("model settings in the config are not usable:\n  " + "\n  ".join(_model_problems))


# The subject pattern of the roster schema, not an alternation of every name: Snakemake copies the
# constraint into every output pattern and rescans it for every job (about 1 s at 800 subjects).
wildcard_constraints:
    subject=f"(?!(?:{'|'.join(RESERVED_SUBJECTS)})/){subject_regex()}",
    demo_subject="|".join(DEMO_SUBJECTS),


def all_targets():
    targets = (
        expand(
            [
                "results/{subject}/{subject}-ti.safetensors",
                "results/{subject}/samples/grid.png",
            ],
            subject=SUBJECTS,
        )
        + ["results/summary/roster_check.txt", "results/summary/crops.tsv"]
        + samples_targets()
    )
    return targets + publish_targets(targets)


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


def model_files(spec):
    """The files and folders a ModelSpec names (the model, its config folder, its VAE): a job's inputs."""
    return [path for path in (spec.path, spec.config_dir, spec.vae) if path]


def base_model_input(wildcards):
    return model_files(MODELS["base"])


# train.resolution (the crops' side too) and the grid's width/height say "auto" = the base model family's
# native resolution (SD1.5 512, SDXL 1024).
NATIVE_RESOLUTION = family_named(MODELS["base"].family).native_resolution


@functools.cache  # several params of several rules ask, for every job: resolve each subject once
def _train_params(subject):
    return native_sizes(train_params(config, ROSTER[subject]), NATIVE_RESOLUTION, ("resolution",))


# Step and checkpoint counts a run could never finish (or that would fill the disk) are named before any job.
_recipe_problems = [problem for subject in SUBJECTS for problem in recipe_problems(subject, _train_params(subject))]
if _recipe_problems:
    raise WorkflowError("training recipe:\n  " + "\n  ".join(_recipe_problems[:20]))


# Subjects named like a word of the tokenizer train under a derived token (the trigger stays the file name).
_token_notes, _token_problems = check_subject_tokens(
    {subject: _train_params(subject)["num_vectors"] for subject in SUBJECTS},
    tokenizer_folder(config, demo_model_dir=DEMO_MODEL_DIR, demo_model_name=DEMO_MODEL_NAME),
)
if _token_problems:
    raise WorkflowError("training tokens:\n  " + "\n  ".join(_token_problems))
if _token_notes:
    print(
        f"note: {len(_token_notes)} subject name(s) are words of the tokenizer; they train under new tokens "
        f"(triggers stay the output names, <subject>-ti by default): {', '.join(_token_notes[:10])}{' ...' if len(_token_notes) > 10 else ''}",
        file=sys.stderr,
    )


def subject_train_params(wildcards):
    return copy.deepcopy(_train_params(wildcards.subject))  # each rule gets its own copy


def subject_repeats(wildcards):
    return ROSTER[wildcards.subject].get("repeats", config["dataset"]["repeats"])


def subject_trigger(wildcards):
    """The word people type for the subject's embedding: its file name (the roster's output_name, else <subject>-ti)."""
    return output_name(ROSTER[wildcards.subject])


def subject_class_word(wildcards):
    return ROSTER[wildcards.subject]["class_word"]


def workflow_file(path):
    """A config path relative to the working directory, else to the workflow's folder."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    return os.path.join(workflow.basedir, path)


# The face models (config `faces:`), resolved from file checks alone: a setting that cannot work here is
# named before any job runs; the resolved names are params of the crop and likeness rules, so unpacking an
# insightface pack reruns what it changes.
try:
    FACE_MODELS = resolve_face_models(FaceSettings.from_config(config["faces"]))
except FaceModelError as error:
    raise WorkflowError(str(error)) from None


# The crop stage's declared files, the same for rule crop (raw photos) and rule prepared_crops (prepared
# datasets), so each can be asked for by name. The crop images beside them are data (the manifest's `output`
# column names them): each job empties results/S/crops/ first, so nothing of an earlier run stays.
CROP_OUTPUTS = {
    "manifest": "results/{subject}/crops/manifest.tsv",
    "identity": "results/{subject}/crops/identity.json",
    **({"sheet": "results/{subject}/crops/contact_sheet.png"} if config["crop"]["contact_sheet"] else {}),
}


def crop_reference_photos(wildcards):
    """The roster's optional `reference` photos for the identity filter (files, folders, globs)."""
    return split_sources(ROSTER[wildcards.subject].get("reference", ""))


def crop_reference_files(wildcards):
    """Every file the `reference` entries name (so replacing a reference photo reruns the crop)."""
    return list_source_files(ROSTER[wildcards.subject].get("reference", ""))


# collect settings that change what a run keeps (params: changing them reruns collect); the network ones
# (cache folder, timeout, retries, backoff, size cap) only decide how files are fetched, so the script
# reads them from the config and changing them reruns nothing
COLLECT_NETWORK_KEYS = ("url_cache", "max_download_mb", "timeout_s", "retries", "backoff_s")


def collect_params(wildcards):
    """The collect settings; `prepared: True` only for a prepared subject (raw subjects' params unchanged)."""
    params = {key: value for key, value in config["collect"].items() if key not in COLLECT_NETWORK_KEYS}
    if ROSTER[wildcards.subject]["prepared"] == "yes":
        params["prepared"] = True
    return params


# optional `publish_dir`: rule publish (rules/publish.smk) copies the final embeddings there, as
# <output_name>.safetensors (+ <output_name>-best.safetensors); never from the demo model, never over a file
# tifactory did not write (tifactory.publish), unless publish_replace_others is set
PUBLISH_DIR = os.path.expanduser(config.get("publish_dir") or "")
if PUBLISH_DIR and is_demo(config):
    print(
        f"WARNING: publish_dir: {PUBLISH_DIR} is set, but base_model is {DEMO_MODEL_NAME}: nothing is published "
        "there (the toy model's embeddings are no use in a real UI). Set base_model to your SD1.5 model to publish.",
        file=sys.stderr,
    )
# rule publish exists whenever publish_dir is set; this says whether it may run
PUBLISHING = bool(PUBLISH_DIR) and not is_demo(config)
# published file name (without .safetensors) -> (subject, results/ file it copies)
PUBLISHED = {}
for _subject in SUBJECTS:
    for _kind, _file in published_files(output_name(ROSTER[_subject])).items():
        _source = f"results/{_subject}/{_subject}-ti{'-best' if _kind == 'best' else ''}.safetensors"
        PUBLISHED[_file.removesuffix(".safetensors")] = (_subject, _source)
# files of someone else's in the way ({path: message}), found now so a newer one is named too; such a
# subject publishes none of its files (not its -best without its final one)
PUBLISH_BLOCKED = (
    {}
    if not PUBLISHING or config["publish_replace_others"]
    else blocked_files(PUBLISH_DIR, {f"{name}.safetensors": subject for name, (subject, _) in PUBLISHED.items()})
)
_blocked_subjects = {PUBLISHED[os.path.basename(path).removesuffix(".safetensors")][0] for path in PUBLISH_BLOCKED}
if PUBLISH_BLOCKED:
    print(
        f"WARNING: {len(PUBLISH_BLOCKED)} file(s) in publish_dir are not tifactory's; those copies are not made:"
        + "".join(f"\n  {message}" for message in PUBLISH_BLOCKED.values()),
        file=sys.stderr,
    )


def publish_targets(targets):
    """Copies in `publish_dir` (made by the publish rule) of the embeddings among `targets`, that is each
    final results/S/S-ti.safetensors and, where one is built, S-ti-best.safetensors, under the subject's
    output name; none when publishing is off, none over a file tifactory did not write."""
    if not PUBLISHING:
        return []
    wanted = set(targets)
    paths = (
        os.path.join(PUBLISH_DIR, f"{name}.safetensors") for name, (_, source) in PUBLISHED.items() if source in wanted
    )
    return sorted(
        path
        for path in paths
        if PUBLISHED[os.path.basename(path).removesuffix(".safetensors")][0] not in _blocked_subjects
    )


def publish_source(wildcards):
    """The results/ embedding a publish_dir file copies; a name of no subject, or a file tifactory did not
    write in its place, stops here (before Snakemake would replace it); so does the demo model."""
    if not PUBLISHING:
        raise WorkflowError(f"publish_dir: nothing built on the demo model ({DEMO_MODEL_NAME}) is published")
    if wildcards.published not in PUBLISHED:
        raise WorkflowError(f"publish_dir: {wildcards.published}.safetensors is no subject's output name")
    blocked = PUBLISH_BLOCKED.get(os.path.join(PUBLISH_DIR, f"{wildcards.published}.safetensors"))
    if blocked:
        raise WorkflowError(blocked)
    return PUBLISHED[wildcards.published][1]


def publish_subject(wildcards):
    return PUBLISHED[wildcards.published][0]


def roster_run_summary(since):
    """The end-of-run summary of the roster (Snakefile's onsuccess/onerror): see tifactory.run_summary."""
    from tifactory.run_summary import run_summary

    from tifactory.verdict import VerdictSettings

    summary = run_summary(
        SUBJECTS,
        since=since,
        roster_problems=ROSTER_PROBLEMS,
        publish_dir=PUBLISH_DIR if PUBLISHING else "",
        verdict_settings=VerdictSettings.from_config(config["verdict"]),
        warning=DEMO_MODEL_WARNING,
        triggers={subject: output_name(ROSTER[subject]) for subject in SUBJECTS},
    )
    if PUBLISH_BLOCKED:
        summary += (
            f"\n  not published ({len(PUBLISH_BLOCKED)} file(s) in publish_dir are not tifactory's): "
            + ", ".join(PUBLISH_BLOCKED)
        )
    return summary


def demo_concept(subject):
    """The taught concept a demo subject shows (its name is a concept of tifactory.demo.taught and its sources are a
    prepared dataset), else None: such a subject gets a concept-recovery table in its report page."""
    from tifactory.demo.taught import CONCEPTS

    row = ROSTER[subject]
    if is_demo(config) and subject in CONCEPTS and row.get("prepared") == "yes":
        return subject
    return None
