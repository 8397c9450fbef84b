"""Roster and recipe: read + validate the roster TSV, resolve each subject's training parameters.

Imported by the Snakefile at DAG-parse time, so it must stay cheap (no torch, no image libraries).
"""

from __future__ import annotations

import copy
import csv
import os
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
            return float(text)
        except ValueError:
            return text
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
    with open(path, encoding="utf-8", newline="") as handle:
        lines = [line for line in handle if line.strip() and not line.lstrip().startswith("#")]
    reader = csv.reader(lines, delimiter="\t")
    rows = list(reader)
    if not rows:
        raise RosterError(f"roster {path}: empty (needs a header: subject, class_word, sources)")
    header = [cell.strip() for cell in rows[0]]
    validator = jsonschema.Draft202012Validator(_load_schema("roster.schema.yaml"))
    problems: list[str] = []
    subjects: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for row_number, cells in enumerate(rows[1:], start=2):
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
    return subjects, problems


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


def train_params(config: dict, subject_row: dict) -> dict:
    """The full training recipe for one subject: config.train (+ demo overrides) + roster overrides."""
    params = merged_section(config, "train")
    for key, value in subject_row.items():
        if key in params:
            params[key] = value
    if not params["init_word"]:
        params["init_word"] = subject_row["class_word"]
    return params
