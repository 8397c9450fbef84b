"""Roster and recipe: read + validate the roster TSV, resolve each subject's training parameters.

Imported by the Snakefile at DAG-parse time, so it must stay cheap (no torch, no image libraries).
"""

from __future__ import annotations

import codecs
import copy
import csv
import math
import os
import re
from pathlib import Path
from typing import Any

import yaml

# source listing lives in tifactory.photos.sources (one listing for the DAG and the collect job); re-exported here
from tifactory import REPO_ROOT
from tifactory.photos.sources import (  # noqa: F401
    SourceKindError,
    class_word_of,
    expand_glob,
    is_glob,
    list_source_files,
    source_kind,
    split_sources,
)
from tifactory.errors import TifactoryError

SCHEMA_DIR = REPO_ROOT / "workflow" / "schemas"
DEMO_MODEL_NAME = "demo-tiny"
DEMO_MODEL_FAMILY = "sd15"  # the demo model (tifactory.demo.tinymodel) is SD1.5-shaped
# results/summary/ and results/report/ hold roster-wide outputs: no subject may take those names.
RESERVED_SUBJECTS = ("summary", "report")
INTEGER_COLUMNS = {"num_vectors", "max_train_steps", "gradient_accumulation_steps", "save_every_n_steps",
                   "seed", "repeats"}
NUMBER_COLUMNS = {"learning_rate"}


class RosterError(TifactoryError, ValueError):
    """A roster problem; the message names the file, row and column."""


def _load_schema(name: str) -> dict:
    with open(SCHEMA_DIR / name, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def roster_schema() -> dict:
    """The roster's JSON schema (workflow/schemas/roster.schema.yaml): columns, subject pattern, class words."""
    return _load_schema("roster.schema.yaml")


def _convert_cell(column: str, text: str) -> Any:
    if column in INTEGER_COLUMNS:
        try:
            return int(text)
        except ValueError:
            return text  # left as a string: the schema then names the column and the expected type
    if column in NUMBER_COLUMNS:
        try:
            number = float(text)
        except ValueError:
            return text
        return number if math.isfinite(number) else text  # nan, inf, 1e400: named by the schema as text
    return text


def read_roster(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read and validate the roster; return one dict per subject (empty cells dropped).

    Raises RosterError listing every bad row as `row N (subject 'x'), column 'c': problem`.
    Row numbers count the header as row 1, as a spreadsheet shows them.
    """
    subjects, problems = read_roster_rows(path)
    if problems:
        raise RosterError(f"roster {path}:\n  " + "\n  ".join(problems))
    if not subjects:
        raise RosterError(f"roster {path}: no subjects")
    return subjects


def read_roster_rows(path: str | os.PathLike) -> tuple[list[dict[str, Any]], list[str]]:
    """(good rows, one message per bad row): a bad row does not stop the good ones (the workflow fails
    its `roster_check` job with the messages, so `--keep-going` still finishes every good subject).
    A missing or empty file raises RosterError. Of duplicate subjects the first row is kept."""
    import jsonschema

    path = Path(path)
    if not path.is_file():
        raise RosterError(f"roster {path}: file not found")
    lines = [(number, line) for number, line in enumerate(roster_lines(path), start=1)
             if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise RosterError(f"roster {path}: empty (needs a header: subject, class_word, sources)")
    header_cells, header_problem = _split_line(lines[0][1])
    if header_problem:
        raise RosterError(f"roster {path}: the header (line {lines[0][0]}) {header_problem}")
    header = [cell.strip() for cell in header_cells]
    validator = jsonschema.Draft202012Validator(_load_schema("roster.schema.yaml"))
    problems: list[str] = []
    subjects: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    row_of: dict[str, int] = {}
    for row_number, (_, line) in enumerate(lines[1:], start=2):
        cells, problem = _split_line(line)
        if problem:
            problems.append(f"row {row_number}: {problem}")
            continue
        if len(cells) > len(header):
            problems.append(f"row {row_number}: {len(cells)} cells but the header has {len(header)} columns")
            continue
        problems_before = len(problems)
        record = {}
        for column, cell in zip(header, cells):
            cell = cell.strip()
            if cell:
                record[column] = _convert_cell(column, cell)
        label = f"row {row_number} (subject {record.get('subject', '?')!r})"
        for error in sorted(validator.iter_errors(record), key=lambda e: list(e.path)):
            if error.validator == "additionalProperties":
                extra = sorted(set(record) - set(validator.schema["properties"]))
                problems.append(f"{label}: unknown column(s) {extra}; allowed: "
                                f"{sorted(validator.schema['properties'])}")
            elif error.validator == "required":
                problems.append(f"{label}: {error.message}")
            else:
                column = error.path[0] if error.path else "?"
                problems.append(f"{label}, column {column!r}: {error.message}")
        for column in ("subject", "output_name"):
            repeated = periodic_tail(record.get(column))
            if repeated and len(problems) == problems_before:
                problems.append(f"{label}, column {column!r}: it ends in {repeated!r} repeated "
                                f"{PERIODIC_REPEATS} times or more, which Snakemake refuses in a file name "
                                "(PeriodicWildcardError); shorten the repetition")
        subject = record.get("subject")
        if isinstance(subject, str):
            if subject in seen:
                problems.append(f"{label}, column 'subject': duplicate of row {seen[subject]}")
            else:
                seen[subject] = row_number
        if len(problems) == problems_before:
            problem = resolve_sources(record, validator.schema["properties"]["class_word"]["enum"])
            if problem:
                problems.append(f"{label}{problem}")
            else:
                subjects.append(record)
                row_of[record["subject"]] = row_number
    return _unique_output_names(subjects, row_of, problems), problems


PERIODIC_REPEATS = 20  # Snakemake's PeriodicityDetector: a piece repeated this often ends a runaway wildcard
_PERIODIC = re.compile(rf"(.+?)\1{{{PERIODIC_REPEATS - 1},}}$")


def periodic_tail(name) -> str | None:
    """The piece a name ends in when it is repeated PERIODIC_REPEATS times or more (`xxxx…x` -> 'x'): Snakemake
    stops the whole DAG (PeriodicWildcardError) at a wildcard value like that. None for other names."""
    if not isinstance(name, str):
        return None
    match = _PERIODIC.search(name)
    return match.group(1) if match else None


def _unique_output_names(subjects: list[dict[str, Any]], row_of: dict[str, int],
                         problems: list[str]) -> list[dict[str, Any]]:
    """The rows whose output names (trigger, published files) clash with nothing before them; each other
    row becomes a problem. An explicit output_name may not be another subject's name either."""
    names = set(row_of)
    taken: dict[str, int] = {}
    kept = []
    for record in subjects:
        subject, row_number = record["subject"], row_of[record["subject"]]
        label = f"row {row_number} (subject {subject!r}), column 'output_name'"
        name = record.get("output_name") or f"{subject}-ti"
        files = (name, f"{name}-best")
        if "output_name" in record and name in names - {subject}:
            problems.append(f"{label}: {name!r} is the name of the subject on row {row_of[name]}; "
                            "choose another output name")
            continue
        clash = next((file for file in files if file in taken), None)
        if clash is not None:
            problems.append(f"{label}: {name!r} gives the file name {clash}.safetensors, which row "
                            f"{taken[clash]} already gives; set a different output_name")
            continue
        for file in files:
            taken[file] = row_number
        kept.append(record)
    return kept


def roster_lines(path: str | os.PathLike) -> list[str]:
    """The roster's lines, decoded: UTF-8 (a leading BOM dropped) or UTF-16 with its BOM (a spreadsheet's
    "Unicode text"). Any other encoding raises RosterError naming the first line that is not UTF-8."""
    data = Path(path).read_bytes()
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            text = data.decode("utf-16")
        except UnicodeDecodeError as error:
            raise RosterError(f"roster {path}: starts like UTF-16 but is not ({error.reason})") from None
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            line = data[:error.start].count(b"\n") + 1
            raise RosterError(
                f"roster {path}: line {line} is not UTF-8 (byte 0x{data[error.start]:02x}; Latin-1 or another "
                "legacy encoding?); save the roster as UTF-8 (or UTF-16 with its BOM)") from None
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _split_line(line: str) -> tuple[list[str], str | None]:
    """One line's tab-separated cells (a cell may be quoted, "" for a quote inside it), or why not. Each
    line is one row: a quote never runs on into the next lines and swallows them."""
    try:
        cells = next(csv.reader([line], delimiter="\t", strict=True), [])
    except csv.Error as error:
        return [], f"a cell's quotes do not balance ({error}); remove the '\"' or close it"
    return cells, None


def resolve_sources(record: dict[str, Any], class_words) -> str | None:
    """Decide whether the row's sources are a prepared kohya dataset; fill what its folder names give.

    Sets record["prepared"] to "yes" or "no"; for a prepared subject, `repeats` and `class_word` come
    from the kohya folder names (`100_sks woman`) unless the row sets them. Returns None, or the problem
    as `, column 'c': why` to append to the row's label.
    """
    try:
        kind = source_kind(record["sources"], record.get("prepared", "auto"))
    except SourceKindError as error:
        return f", column 'sources': {error}"
    record["prepared"] = "yes" if kind.prepared else "no"
    names = ", ".join(repr(os.path.basename(os.path.normpath(f.path))) for f in kind.image_folders)
    if kind.prepared and "repeats" not in record:
        repeats = {folder.repeats for folder in kind.image_folders if folder.repeats is not None}
        if len(repeats) > 1:
            return f", column 'repeats': the prepared folders ({names}) name different repeats; set the column"
        if repeats:
            record["repeats"] = repeats.pop()
    if "class_word" not in record:
        found = {class_word_of(folder.class_tokens, class_words) for folder in kind.image_folders}
        found.discard(None)
        if len(found) != 1:
            why = (f"the prepared folders ({names}) name different class words" if found else
                   f"no prepared folder name (`100_name woman`) gives one" if kind.prepared else
                   "the sources are raw photos, not a prepared kohya folder that names it")
            return f", column 'class_word': required ({' | '.join(class_words)}): {why}"
        record["class_word"] = found.pop()
    return None


def subject_regex() -> str:
    """The roster schema's subject pattern, unanchored: the Snakefile's `subject` wildcard constraint."""
    pattern = _load_schema("roster.schema.yaml")["properties"]["subject"]["pattern"]
    return pattern.removeprefix("^").removesuffix("$")


def is_demo(config: dict) -> bool:
    return config["base_model"] == DEMO_MODEL_NAME


def merged_section(config: dict, section: str) -> dict:
    """config[section], with demo_overrides[section] applied when the demo model is in use."""
    merged = copy.deepcopy(config[section])
    if is_demo(config):
        merged.update(config.get("demo_overrides", {}).get(section, {}))
    return merged


def keep_explicit_settings(config: dict, explicit: dict) -> list[str]:
    """With the demo model, a setting given on the command line (`--config 'train={max_train_steps: 50}'`,
    Snakemake's `explicit`) wins over demo_overrides: the override is dropped from `config` (in place).
    Returns one note per dropped override, for the log."""
    if not is_demo(config):
        return []
    notes = []
    for section, overrides in (config.get("demo_overrides") or {}).items():
        given = explicit.get(section)
        if not isinstance(given, dict) or not isinstance(overrides, dict):
            continue
        for key in sorted(set(given) & set(overrides)):
            notes.append(f"{section}.{key}: {config[section][key]!r} from the command line wins over "
                         f"demo_overrides.{section}.{key} ({overrides.pop(key)!r})")
    return notes


# Bounds a recipe must keep (checked before any job runs, per subject): a step count past the schema's
# maximum, or this many checkpoints or samples, is a typo, not a run (10^13 steps would write 5·10^10 files).
MAX_CHECKPOINTS = 1000
MAX_TRAIN_SAMPLES = 2_000_000  # max_train_steps x train_batch_size x gradient_accumulation_steps


def recipe_problems(subject: str, params: dict) -> list[str]:
    """Why a subject's resolved recipe cannot run: too many checkpoints or samples (each names the keys)."""
    problems = []
    steps, every = params["max_train_steps"], params["save_every_n_steps"]
    checkpoints = -(-steps // every)
    if checkpoints > MAX_CHECKPOINTS:
        problems.append(f"subject {subject!r}: max_train_steps {steps} / save_every_n_steps {every} writes "
                        f"{checkpoints} checkpoints (at most {MAX_CHECKPOINTS}); raise save_every_n_steps")
    samples = steps * params["train_batch_size"] * params["gradient_accumulation_steps"]
    if samples > MAX_TRAIN_SAMPLES:
        problems.append(f"subject {subject!r}: max_train_steps x train_batch_size x gradient_accumulation_steps = "
                        f"{samples} samples (at most {MAX_TRAIN_SAMPLES})")
    return problems


AUTO = "auto"  # a size setting that follows the base model family's native resolution


def native_sizes(section: dict, native_resolution: int, keys: tuple[str, ...]) -> dict:
    """`section` with each of `keys` that says "auto" set to `native_resolution` (the base model family's:
    SD1.5 512, SDXL 1024). train.resolution is the one size setting of crops and training; samples.width and
    samples.height follow it the same way."""
    return {key: (native_resolution if key in keys and value == AUTO else value) for key, value in section.items()}


def train_params(config: dict, subject_row: dict) -> dict:
    """The full training recipe for one subject: config.train (+ demo overrides) + roster overrides."""
    params = merged_section(config, "train")
    for key, value in subject_row.items():
        if key in params:
            params[key] = value
    if not params["init_word"]:
        params["init_word"] = subject_row["class_word"]
    return params
