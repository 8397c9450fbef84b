"""A roster from a folder of folders: one row per subfolder (`tifactory roster DATA_DIR`).

The subject is the folder's name made to fit the roster's subject pattern (accents dropped, lower case,
other characters to `-`); the class word comes from a kohya folder name (`100_evagreen woman`) when there
is one, else from --class; prepared kohya datasets become `prepared: yes` rows. Every folder that is
renamed, clashes with another after renaming, or is skipped is reported with the reason.
"""

from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass, field

from tifactory.roster import RESERVED_SUBJECTS, periodic_tail, resolve_sources, roster_schema, subject_regex
from tifactory.photos.sources import class_word_of, kohya_folder_name, prepared_image_folders

# letters NFKD does not take apart into a base letter + accent
_TRANSLITERATE = str.maketrans({"ø": "o", "æ": "ae", "œ": "oe", "ß": "ss", "đ": "d", "ł": "l", "þ": "th",
                                "ð": "d", "ı": "i", "ħ": "h", "ŧ": "t"})
ROSTER_COLUMNS = ["subject", "class_word", "sources", "prepared"]
_UNSAFE_IN_A_CELL = set(";\t\r\n")  # would split the roster's cell or row


@dataclass
class FolderRoster:
    rows: list[dict[str, str]] = field(default_factory=list)
    renamed: list[tuple[str, str]] = field(default_factory=list)  # (folder, subject)
    clashes: list[tuple[str, str, str]] = field(default_factory=list)  # (folder, subject, folder that has the name)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (folder, why)

    def report_lines(self) -> list[str]:
        lines = [f"renamed: {folder!r} -> {subject}" for folder, subject in self.renamed]
        lines += [f"clash:   {folder!r} -> {subject} (its name is taken by {other})"
                  for folder, subject, other in self.clashes]
        lines += [f"skipped: {folder!r} ({why})" for folder, why in self.skipped]
        return lines

    def tsv(self) -> str:
        lines = ["\t".join(ROSTER_COLUMNS)] + ["\t".join(row[c] for c in ROSTER_COLUMNS) for row in self.rows]
        return "\n".join(lines) + "\n"


def subject_name(folder_name: str, max_length: int) -> str:
    """`Zoë Saldaña` -> `zoe-saldana`: ASCII lower case, runs of other characters -> `-`, starting with a
    letter or digit, at most max_length characters ("" when nothing is left)."""
    text = unicodedata.normalize("NFKD", folder_name.strip().lower().translate(_TRANSLITERATE))
    text = "".join(char for char in text if not unicodedata.combining(char))
    text = re.sub(r"[^a-z0-9_-]+", "-", text)
    text = re.sub(r"-{2,}", "-", text).lstrip("-_")
    text = text[:max_length].rstrip("-_")
    while (piece := periodic_tail(text)) is not None:  # `aaaa…a`: Snakemake refuses such wildcard values
        text = text[:-len(piece)].rstrip("-_")
    return text


def symlink_problem(path: str, data_dir: str) -> str | None:
    """Why a symlinked subfolder of DATA_DIR is not followed (None: not a symlink). A link that leaves
    DATA_DIR could lead anywhere (`root -> /`); one that points back into it (`loop -> .`, `alias -> eva`)
    would train on another subject's photos."""
    if not os.path.islink(path):
        return None
    target = os.path.realpath(path)
    root = os.path.realpath(data_dir)
    if os.path.commonpath([target, root]) == root:
        return f"a symlink pointing back into {data_dir} ({os.readlink(path)}); not followed"
    return f"a symlink leaving {data_dir} (to {target}); not followed: move the folder in, or name it in a roster row"


def _has_files(folder: str) -> bool:
    for _root, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if any(not name.startswith(".") for name in filenames):
            return True
    return False


def roster_from_folders(data_dir: str | os.PathLike, class_word: str | None = None) -> FolderRoster:
    """One roster row per subfolder of `data_dir` (sorted by name; sources are absolute paths)."""
    schema = roster_schema()["properties"]
    class_words = schema["class_word"]["enum"]
    max_length = schema["subject"]["maxLength"]
    pattern = re.compile(subject_regex())
    if class_word is not None and class_word not in class_words:
        raise ValueError(f"--class must be one of {', '.join(class_words)}, not {class_word!r}")
    data_dir = os.path.abspath(os.path.expanduser(os.fspath(data_dir)))
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"{data_dir}: not a folder")
    result = FolderRoster()
    taken: dict[str, str] = {name: f"the roster-wide results/{name}/" for name in RESERVED_SUBJECTS}
    for name in sorted(os.listdir(data_dir)):
        path = os.path.join(data_dir, name)
        if name.startswith("."):
            result.skipped.append((name, "hidden"))
            continue
        link = symlink_problem(path, data_dir)
        if link:
            result.skipped.append((name, link))
            continue
        if not os.path.isdir(path):
            result.skipped.append((name, "not a folder"))
            continue
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            result.skipped.append((name, "its name is not valid UTF-8 (a roster is UTF-8 text): rename the folder"))
            continue
        if name != name.strip():
            result.skipped.append((name, "its name starts or ends in a blank, which a roster cell drops: rename "
                                         "the folder"))
            continue
        if _UNSAFE_IN_A_CELL & set(name):
            result.skipped.append((name, "its name holds ';', a tab or a line break, which a roster cell cannot"))
            continue
        if not _has_files(path):
            result.skipped.append((name, "no files"))
            continue
        folders = prepared_image_folders(path)
        found = {class_word_of(folder.class_tokens, class_words) for folder in folders or []} - {None}
        subject_class = found.pop() if len(found) == 1 else class_word
        if subject_class is None:
            why = ("its kohya folders name different class words" if len(found) > 1 else
                   "no class word in a kohya folder name (`100_name woman`)")
            result.skipped.append((name, f"{why}: pass --class {'|'.join(class_words)}"))
            continue
        base = name
        own = kohya_folder_name(name)
        if own:  # `100_evagreen woman` given directly: the subject is the tokens without the class word
            words = own[1].split()
            if len(words) > 1 and class_word_of(own[1], class_words):
                words = words[:-1]
            base = " ".join(words)
        subject = subject_name(base, max_length)
        if not subject or not pattern.fullmatch(subject):
            result.skipped.append((name, "no letter or digit left for a subject name: rename the folder"))
            continue
        if subject in taken:
            number = 2
            while f"{subject[:max_length - 1 - len(str(number))]}-{number}" in taken:
                number += 1
            wanted, subject = subject, f"{subject[:max_length - 1 - len(str(number))]}-{number}"
            result.clashes.append((name, subject, taken[wanted]))
        elif subject != name:
            result.renamed.append((name, subject))
        row = {"subject": subject, "class_word": subject_class, "sources": path, "prepared": "yes" if folders else "no"}
        problem = resolve_sources(dict(row), class_words)  # as the workflow will read the row
        if problem:
            result.skipped.append((name, problem.split(": ", 1)[-1]))
            continue
        taken[subject] = repr(name)
        result.rows.append(row)
    return result
