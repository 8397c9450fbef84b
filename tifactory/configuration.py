"""Command-line config values to the schema's types, before the schema validates them.

Snakemake reads `--config 'train={max_train_steps: 5, flip_aug: true}'` with YAML's BaseLoader: every
nested scalar arrives as a string ('5', 'true'), which the schema then rejects ("'5' is not of type
'integer'"). `coerce_to_schema` walks the config along the schema and, where the schema asks for a
number, integer, boolean or null but finds a string, reads that string as YAML; the result is kept
only when it has a type the schema allows, so anything else still fails validation with the schema's
own message. Text the schema takes as a string is never touched (`init_word: '5'` stays text;
`compile: false` becomes the boolean, since the string 'false' is none of compile's names).

Parse-time cheap: yaml only.
"""

from __future__ import annotations

import math
from pathlib import Path

import yaml
from tifactory import REPO_ROOT

SCHEMA_PATH = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"
_NON_STRING_TYPES = ("integer", "number", "boolean", "null")


def load_schema(path: str | Path = SCHEMA_PATH) -> dict:
    with open(path, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def coerce_to_schema(config: dict, schema: dict | None = None) -> dict:
    """Convert string values in `config` (in place) to the types `schema` asks for; returns `config`."""
    schema = load_schema() if schema is None else schema
    return _coerce(config, schema, schema)


def _resolve(node: dict, root: dict) -> dict:
    while isinstance(node, dict) and "$ref" in node:
        reference = node["$ref"]
        if not reference.startswith("#/"):
            return {}
        target = root
        for part in reference[2:].split("/"):
            target = target.get(part, {}) if isinstance(target, dict) else {}
        node = target
    return node if isinstance(node, dict) else {}


def _alternatives(node: dict, root: dict) -> list[dict]:
    """The node itself plus every allOf/oneOf/anyOf branch (resolved), flattened."""
    node = _resolve(node, root)
    found = [node]
    for keyword in ("allOf", "oneOf", "anyOf"):
        for branch in node.get(keyword, []):
            found += _alternatives(branch, root)
    return found


def _types(branches: list[dict]) -> set[str]:
    types: set[str] = set()
    for branch in branches:
        declared = branch.get("type")
        if isinstance(declared, str):
            types.add(declared)
        elif isinstance(declared, list):
            types.update(declared)
    return types


def _string_fits(value: str, branches: list[dict]) -> bool:
    """Some branch takes this text as a string (type string, and its enum, if any, lists it)."""
    for branch in branches:
        declared = branch.get("type")
        if declared == "string" or isinstance(declared, list) and "string" in declared:
            if "enum" not in branch or value in branch["enum"]:
                return True
    return False


def _matches(value, types: set[str]) -> bool:
    if isinstance(value, bool):
        return "boolean" in types
    if isinstance(value, int):
        return "integer" in types or "number" in types
    if isinstance(value, float):
        return "number" in types or ("integer" in types and value.is_integer())
    return value is None and "null" in types


def _coerce(value, node: dict, root: dict):
    branches = _alternatives(node, root)
    types = _types(branches)
    if isinstance(value, str):
        if _string_fits(value, branches) or not types & set(_NON_STRING_TYPES):
            return value
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            return value
        if isinstance(parsed, str) and types & {"number", "integer"}:
            try:  # YAML 1.1 reads 1e-3 (no dot) as text; Python reads it as a number
                parsed = float(value)
            except ValueError:
                return value
        if isinstance(parsed, float) and parsed.is_integer() and "integer" in types and "number" not in types:
            parsed = int(parsed)
        return parsed if _matches(parsed, types) else value
    if isinstance(value, dict):
        for key in list(value):
            child = _child_schema(branches, key, root)
            if child is not None:
                value[key] = _coerce(value[key], child, root)
        return value
    if isinstance(value, list):
        items = [branch["items"] for branch in branches if isinstance(branch.get("items"), dict)]
        if items:
            for index, item in enumerate(value):
                value[index] = _coerce(item, {"allOf": items}, root)
        return value
    return value


def _child_schema(branches: list[dict], key: str, root: dict) -> dict | None:
    children = [branch["properties"][key] for branch in branches
                if isinstance(branch.get("properties"), dict) and key in branch["properties"]]
    if not children:
        children = [branch["additionalProperties"] for branch in branches
                    if isinstance(branch.get("additionalProperties"), dict)]
    return {"allOf": children} if children else None


def non_finite_numbers(config, where: str = "") -> list[str]:
    """`key.path: nan` for every NaN or infinite number in the config (`.nan`, `1e400` in YAML): the schema's
    minimum/maximum do not catch them (every comparison with NaN is false), the jobs would."""
    if isinstance(config, float) and not math.isfinite(config):
        return [f"{where or 'config'}: {config} is not a finite number"]
    if isinstance(config, dict):
        return [problem for key, value in config.items()
                for problem in non_finite_numbers(value, f"{where}.{key}" if where else str(key))]
    if isinstance(config, list):
        return [problem for index, value in enumerate(config)
                for problem in non_finite_numbers(value, f"{where}[{index}]")]
    return []
