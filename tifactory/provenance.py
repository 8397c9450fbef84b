"""Provenance sidecar of every Snakemake job: what made its outputs, from what, with which code.

`logs/<rule>/<name>.provenance.json` beside the job's log (one record per job, so no results folder
gets extra files): the job's params (every setting reaches a job through `params:`) and their SHA-256
(`config_sha256`), the SHA-256 of every input and output file (folders: every file inside, hidden ones
skipped), package versions and the git commit. No timestamps or host names, so two runs of the same
inputs write the same record. Embeddings also carry their own provenance in their metadata.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

from tifactory.fileio import OWNED_FOLDERS, sha256_file, write_text_atomic

FORMAT = 1


def sidecar_path(log_path: str | os.PathLike) -> Path:
    log_path = Path(log_path)
    return log_path.with_name(f"{log_path.stem}.provenance.json")


def path_hashes(path: str | os.PathLike) -> dict[str, str]:
    """{file: sha256} for a file, or for every non-hidden file under a folder (paths as given, sorted)."""
    path = Path(path)
    if path.is_file():
        return {str(path): sha256_file(path)}
    hashes = {}
    if path.is_dir():
        for root, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                file = Path(root) / name
                if not name.startswith(".") and file.is_file():
                    hashes[str(file)] = sha256_file(file)
    return dict(sorted(hashes.items()))


def canonical_json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=False)


def job_record(*, rule: str, wildcards: dict, params: dict, inputs: list[str], outputs: list[str]) -> dict:
    from tifactory.training.embedding import git_commit, package_versions

    params = json.loads(canonical_json(params))  # plain JSON types (Snakemake's Namedlists become lists)
    input_hashes: dict[str, str] = {}
    for item in inputs:
        input_hashes.update(path_hashes(item))
    output_hashes: dict[str, str] = {}
    for item in outputs:
        output_hashes.update(path_hashes(item))
    return {
        "format": FORMAT,
        "rule": rule,
        "wildcards": dict(sorted(wildcards.items())),
        "config_sha256": hashlib.sha256(canonical_json(params).encode("utf-8")).hexdigest(),
        "params": params,
        "inputs": input_hashes,
        "outputs": output_hashes,
        "package_versions": package_versions(),
        "python": platform.python_version(),
        "git_commit": git_commit(),
    }


def write_job_provenance(smk) -> Path:
    """Write the sidecar of a finished Snakemake job (`smk` = the script's `snakemake` object). Its outputs are
    the declared ones and every file in the folders the job emptied for itself (fileio.OWNED_FOLDERS: the crop
    images beside the crop manifest, the kohya image folder beside dataset.toml)."""
    params = dict(smk.params.items()) if hasattr(smk.params, "items") else {}
    wildcards = dict(smk.wildcards.items()) if hasattr(smk.wildcards, "items") else {}
    record = job_record(rule=smk.rule, wildcards=wildcards, params=params, inputs=[str(p) for p in smk.input],
                        outputs=[str(p) for p in smk.output] + [str(folder) for folder in OWNED_FOLDERS])
    target = sidecar_path(smk.log[0])
    write_text_atomic(target, json.dumps(record, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    return target
