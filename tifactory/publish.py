"""`publish_dir`: copies of the final embeddings where the UIs look (A1111's embeddings/, ComfyUI's
models/embeddings/), without touching a file tifactory did not write.

That folder is the user's, full of files of his own. A file there named like one of ours is replaced only
when it is tifactory's own earlier copy for the same subject (its safetensors metadata says
`tifactory.subject`), or when the config's `publish_replace_others` says so; any other such file stops
that subject's publish with a message naming it. The Snakefile asks before any job runs (so a newer
file of his, which Snakemake would call up to date, is named too), and the publish job asks again.

Imported at DAG-parse time: standard library only.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from tifactory.errors import TifactoryError
from tifactory.training.model_check import ModelCheckError, read_safetensors_header

SUBJECT_KEY = "tifactory.subject"  # the metadata key every tifactory embedding carries (training/embedding.py)
BEST_SUFFIX = "-best"


class PublishError(TifactoryError, RuntimeError):
    """A copy that must not be made (a file of someone else's in the way); the message names the file."""


def output_name(row: dict) -> str:
    """The trigger and published file name of a roster row: its `output_name`, else `<subject>-ti`."""
    return row.get("output_name") or f"{row['subject']}-ti"


def published_files(name: str) -> dict[str, str]:
    """{kind: file name} in publish_dir for one output name: the final embedding and the likeness stage's best."""
    return {"final": f"{name}.safetensors", "best": f"{name}{BEST_SUFFIX}.safetensors"}


def check_publish_dir(publish_dir: str, results_dir: str = "results") -> list[str]:
    """Why `publish_dir` cannot receive copies (each message starts with `publish_dir:`); [] when it can.
    It must be a writable folder, or one that can be created, and hold no `{}` (Snakemake wildcards)."""
    if not publish_dir:
        return []
    if "{" in publish_dir or "}" in publish_dir:
        return [f"publish_dir: {publish_dir} holds '{{' or '}}', which Snakemake reads as a wildcard; "
                "choose a folder without braces"]
    folder = Path(os.path.expanduser(publish_dir))
    results = Path(results_dir).resolve()
    resolved = folder.resolve()
    if resolved == results or results in resolved.parents:
        return [f"publish_dir: {publish_dir} is inside {results_dir}/, which tifactory writes itself; choose the "
                "folder your UI reads"]
    if folder.exists() or folder.is_symlink():
        if not folder.is_dir():
            return [f"publish_dir: {publish_dir} exists and is not a folder"]
        return _writable(folder, publish_dir, "")
    ancestor = folder.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return [f"publish_dir: {publish_dir} cannot be created: {ancestor} is not a folder"]
    return _writable(ancestor, publish_dir, f" cannot be created in {ancestor}")


def _writable(folder: Path, publish_dir: str, what: str) -> list[str]:
    """A real try (a temporary folder made and removed): permissions, read-only mounts and /proc alike."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".tifactory-check-", dir=folder))
    except OSError as error:
        return [f"publish_dir: {publish_dir}{what or ' is not writable'} ({error.strerror or error})"]
    return []


def foreign_file(path: str | os.PathLike, subject: str) -> str | None:
    """Why the file at `path` is not tifactory's own earlier copy for `subject` (None: absent, or ours)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return None
    if path.is_symlink():
        return "a symbolic link"
    try:
        metadata = read_safetensors_header(path).metadata
    except ModelCheckError:
        return "not a safetensors file tifactory wrote"
    owner = metadata.get(SUBJECT_KEY)
    if owner is None:
        return f"a safetensors file without tifactory's {SUBJECT_KEY} metadata"
    if owner != subject:
        return f"tifactory's embedding of another subject ({owner!r})"
    return None


def blocked_message(path: str | os.PathLike, subject: str, why: str) -> str:
    return (f"publish_dir: {path} exists and is not tifactory's copy for subject {subject!r} ({why}); it is left "
            f"as it is and {subject!r} is not published there. Move the file away, give the subject another "
            "output_name in the roster, or set publish_replace_others: true to replace it")


def blocked_files(publish_dir: str, wanted: dict[str, str]) -> dict[str, str]:
    """{path: message} for each file name of `wanted` ({file name in publish_dir: subject}) that a file
    tifactory did not write already takes."""
    blocked = {}
    for name, subject in wanted.items():
        path = os.path.join(publish_dir, name)
        why = foreign_file(path, subject)
        if why:
            blocked[path] = blocked_message(path, subject, why)
    return blocked


def publish_embedding(source: str | os.PathLike, destination: str | os.PathLike, subject: str, *,
                      replace_others: bool) -> str:
    """Copy `source` to `destination` (atomically), unless a file tifactory did not write is there and
    `replace_others` is false. Returns a line for the log."""
    from tifactory.fileio import copy_file_atomic

    why = foreign_file(destination, subject)
    if why and not replace_others:
        raise PublishError(blocked_message(destination, subject, why))
    if Path(destination).is_symlink():
        os.unlink(destination)  # replaced: the link, never what it points at
    copy_file_atomic(source, destination)
    return f"published {source} -> {destination}" + (f" (replaced a file: {why})" if why else "")
