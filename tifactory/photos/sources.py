"""Roster sources: what a `sources` entry names, listed one way for the DAG and for the collect job.

A source is a folder (read recursively), a single file (a photo or a URL-list file) or a glob pattern
(`**` = any depth). `expand_source` is the one listing: the Snakefile's input functions use its files
(`list_source_files`), the collect job also its problems (missing source, broken symlink, FIFO, ...).

Prepared kohya datasets: `prepared_image_folders` tells whether a folder is a dataset someone already
cut (`100_sks woman/` holding images, or a folder holding such folders); such a subject's images are used
as they are (see tifactory.photos.prepared). Imported at DAG-parse time: no image libraries, no torch.
"""

from __future__ import annotations

import errno
import glob
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from tifactory.errors import TifactoryError

# kohya sd-scripts' DreamBooth folder name: `<repeats>_<class tokens>`, e.g. `100_sks woman`
KOHYA_FOLDER = re.compile(r"^(\d+)_(\S.*)$")
# the image files kohya reads from a dataset folder; prepared images keep their bytes, so only these qualify
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# caption files beside an image (`a.png` + `a.txt`); `.txt` first, as tifactory's dataset.toml names it
CAPTION_EXTENSIONS = (".txt", ".caption")
# the roster's `prepared` column
PREPARED_MODES = ("auto", "yes", "no")


@dataclass(frozen=True)
class SourceListing:
    """One source expanded: `files` (regular files, sorted, paths as the source spells them), `problem`
    (why the source gives nothing: 'source not found', 'no files matched', ...), `entry_problems`
    ({path: why} for entries that are not photos: broken symlinks, FIFOs, symlinked folders)."""

    files: list[str]
    problem: str | None
    entry_problems: dict[str, str]

    def absolute(self) -> "SourceListing":
        """The same listing with absolute paths (what the collect job records; the crop job's reference
        photos)."""
        return SourceListing([os.path.abspath(path) for path in self.files], self.problem,
                             {os.path.abspath(path): why for path, why in self.entry_problems.items()})


def split_sources(sources: str) -> list[str]:
    return [part.strip() for part in sources.split(";") if part.strip()]


def is_glob(pattern: str) -> bool:
    return any(char in pattern for char in "*?[")


def expand_glob(pattern: str) -> list[str]:
    """Paths matching a glob pattern (`**` = any depth), hidden entries skipped, sorted.

    Unlike glob.glob(recursive=True), `**` never descends into symlinked folders: with a symlink loop
    (`photos/loop -> .`) glob.glob walks loop/loop/loop/... and, with two loops, effectively forever.
    """
    parts = Path(pattern).parts
    first_magic = next((i for i, part in enumerate(parts) if is_glob(part)), len(parts))
    if "**" not in parts[first_magic:]:
        return sorted(glob.glob(pattern))  # no recursion: nothing to loop over
    root = Path(*parts[:first_magic]) if first_magic else Path(".")
    relative = list(parts[first_magic:]) + (["*"] if parts[-1] == "**" else [])  # `a/**`: everything below a
    try:  # pathlib's `**` does not follow symlinks (Python 3.11-3.13 default)
        hits = list(root.glob("/".join(relative)))
    except ValueError:  # e.g. "a**b": glob.glob reads it as a plain wildcard, without recursion
        return sorted(glob.glob(pattern))
    return sorted(str(hit) for hit in hits
                  if not any(part.startswith(".") for part in hit.relative_to(root).parts))


def entry_problem(path: str) -> str | None:
    """Why a directory entry that is not a regular file cannot be a photo (None: it is a regular file).

    Such entries become rejected rows instead of vanishing: broken symlinks, symlinks that point at
    themselves or at a folder above them (loops), other symlinked folders (not followed: a loop could
    never end and a link could lead anywhere; name the target in `sources`), FIFOs, sockets, devices
    (opening a FIFO would block the job forever).
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        if os.path.islink(path):
            return "symlink loop" if error.errno == errno.ELOOP else "broken symlink"
        return f"unreadable: {type(error).__name__}"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        target = os.path.realpath(path)
        parent = os.path.realpath(os.path.dirname(path))
        if os.path.commonpath([target, parent]) == target:  # the link leads to its own folder or above it
            return "symlink loop (folder not followed)"
        return "symlinked folder not followed (name its target in sources)"
    return "not a regular file"


def source_link_loop(path: str) -> str | None:
    """Why a source that is itself a symlinked folder is not read (None: it is not one, or it leads
    elsewhere): a link to its own folder or one above it (`loop -> .`, `root -> /`) would read that whole
    tree, the other subjects' photos or the file system with them."""
    link = path.rstrip(os.sep) or path
    if not os.path.islink(link) or not os.path.isdir(link):
        return None
    target = os.path.realpath(link)
    parent = os.path.realpath(os.path.dirname(os.path.abspath(link)))
    if os.path.commonpath([target, parent]) == target:
        return f"symlink loop: {link} links to {target}, its own folder or one above it (not followed)"
    return None


def expand_source(source: str) -> SourceListing:
    """List one source (a folder, a file, or a glob pattern; `~` expanded). Hidden files and folders are
    skipped; symlinked folders are listed as problems, not entered (so symlink loops end)."""
    path = os.path.expanduser(source)
    entry_problems: dict[str, str] = {}
    loop = source_link_loop(path)
    if loop:
        return SourceListing([], loop, entry_problems)
    if os.path.isdir(path):  # an existing folder wins, even with glob characters in its name
        files = []
        for dirpath, dirnames, filenames in os.walk(path):  # symlinked folders are listed, not entered
            for name in dirnames:
                full = os.path.join(dirpath, name)
                if not name.startswith(".") and os.path.islink(full):
                    entry_problems[full] = entry_problem(full)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in filenames:
                if name.startswith("."):
                    continue
                full = os.path.join(dirpath, name)
                problem = entry_problem(full)
                if problem is None:
                    files.append(full)
                else:
                    entry_problems[full] = problem
        return SourceListing(sorted(files), None, entry_problems)
    if os.path.isfile(path):
        return SourceListing([path], None, entry_problems)
    if is_glob(source):
        matched = []
        for hit in expand_glob(path):
            if os.path.basename(hit).startswith("."):
                continue
            problem = entry_problem(hit)
            if problem is None:
                matched.append(hit)
            elif not os.path.isdir(hit) or os.path.islink(hit):  # plain folders matched by a glob are fine
                entry_problems[hit] = problem
        if not matched and not entry_problems:
            return SourceListing([], "no files matched", entry_problems)
        return SourceListing(sorted(matched), None, entry_problems)
    if os.path.islink(path):
        return SourceListing([], entry_problem(path), entry_problems)
    return SourceListing([], "source not found", entry_problems)


def list_source_files(sources: str) -> list[str]:
    """Every existing file the `;`-separated sources name (the Snakefile's inputs), sorted. Missing
    folders and empty globs contribute nothing here; the collect stage reports them as rows."""
    files: set[str] = set()
    for source in split_sources(sources):
        files.update(expand_source(source).files)
    return sorted(files)


# ----------------------------------------------------------------------------- prepared kohya datasets

@dataclass(frozen=True)
class ImageFolder:
    """A folder of prepared training images: `repeats` and `class_tokens` from its kohya name (None when
    the name is not a kohya one, for a folder forced prepared)."""

    path: str
    repeats: int | None
    class_tokens: str | None


def kohya_folder_name(name: str) -> tuple[int, str] | None:
    """(repeats, class tokens) of a kohya folder name (`100_sks woman` -> (100, 'sks woman')), else None."""
    match = KOHYA_FOLDER.match(name)
    if not match or int(match.group(1)) < 1:
        return None
    return int(match.group(1)), match.group(2).strip()


def class_word_of(class_tokens: str | None, class_words) -> str | None:
    """The class word a kohya folder names: its last word when that is one of `class_words`."""
    words = (class_tokens or "").split()
    return words[-1].lower() if words and words[-1].lower() in class_words else None


def _entries(folder: str) -> tuple[list[str], list[str]]:
    """(non-hidden subfolder names, non-hidden file names) directly in `folder`; symlinks not followed."""
    folders, files = [], []
    try:
        with os.scandir(folder) as scan:
            for entry in scan:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    folders.append(entry.name)
                elif entry.is_file():
                    files.append(entry.name)
    except OSError:
        pass
    return sorted(folders), sorted(files)


def _has_images(names: list[str]) -> bool:
    return any(os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS for name in names)


def prepared_image_folders(folder: str, *, force: bool = False) -> list[ImageFolder] | None:
    """The image folders of a prepared kohya dataset at `folder`, or None when it is not one.

    Recognised (auto): (a) a folder named `N_tokens` (`100_sks woman`) holding image files
    (png/jpg/jpeg/webp/bmp) directly; (b) a folder holding no image files directly and at least one
    such kohya folder (kohya's `train_data_dir`): its kohya subfolders are the image folders.
    With `force` (the roster's `prepared: yes`) any folder is prepared: (a) or (b) when they apply, else
    the folder itself is the image folder (repeats and class word then come from the roster or config).
    """
    folder = os.path.expanduser(folder)
    if not os.path.isdir(folder):
        return None
    subfolders, files = _entries(folder)
    own_name = kohya_folder_name(os.path.basename(os.path.normpath(folder)))
    if own_name and _has_images(files):
        return [ImageFolder(folder, *own_name)]
    kohya = []
    for name in subfolders:
        parsed = kohya_folder_name(name)
        if parsed and _has_images(_entries(os.path.join(folder, name))[1]):
            kohya.append(ImageFolder(os.path.join(folder, name), *parsed))
    if kohya and (force or not _has_images(files)):
        return kohya
    if force:
        return [ImageFolder(folder, *own_name) if own_name else ImageFolder(folder, None, None)]
    return None


@dataclass(frozen=True)
class SourceKind:
    """What a subject's sources are: `prepared` and, when prepared, the image folders."""

    prepared: bool
    image_folders: list[ImageFolder]


class SourceKindError(TifactoryError, ValueError):
    """The sources cannot be read as the `prepared` mode asks; the message says why."""


def source_kind(sources: str, mode: str = "auto") -> SourceKind:
    """Decide whether a subject's sources are a prepared dataset (mode `auto`: by recognising it, `yes`,
    `no`). Prepared and raw sources cannot be mixed in one subject (one goes through face cropping, the
    other not); sources that do not exist decide nothing (the collect stage reports them)."""
    if mode not in PREPARED_MODES:
        raise SourceKindError(f"unknown prepared mode {mode!r} (one of {', '.join(PREPARED_MODES)})")
    if mode == "no":
        return SourceKind(False, [])
    prepared, raw = [], []
    for source in split_sources(sources):
        path = os.path.expanduser(source)
        folders = prepared_image_folders(path, force=mode == "yes")
        if folders:
            prepared.append((source, folders))
        elif os.path.exists(path) or os.path.islink(path) or is_glob(source):
            raw.append(source)
    if mode == "yes" and raw:
        raise SourceKindError(f"prepared: yes needs dataset folders; not a folder: {', '.join(raw)}")
    if prepared and raw:
        raise SourceKindError(
            f"sources mix prepared kohya dataset folders ({', '.join(s for s, _ in prepared)}) and raw photos "
            f"({', '.join(raw)}): put them in two subjects, or set the prepared column to yes or no")
    return SourceKind(bool(prepared), [folder for _, folders in prepared for folder in folders])


CAPTION = "caption"  # prepared_file_roles' role of a caption file beside an image


def prepared_file_roles(files: list[str], image_folders: list[str]) -> dict[str, str | None]:
    """{file: None (an image to use) | CAPTION (a caption beside an image) | why it is not used}.

    Paths are compared as given (the caller passes absolute paths for both). kohya reads the image
    folders' own files only, so files elsewhere (a parent folder's notes, a subfolder) are not used.
    """
    folders = {os.path.normpath(folder) for folder in image_folders}
    images_by_stem = {os.path.splitext(path)[0] for path in files
                      if os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS}
    roles: dict[str, str | None] = {}
    for path in files:
        stem, extension = os.path.splitext(path)
        extension = extension.lower()
        if os.path.normpath(os.path.dirname(path)) not in folders:
            roles[path] = "not in a prepared image folder (kohya reads only the files of the `N_name class/` folders)"
        elif extension in IMAGE_EXTENSIONS:
            roles[path] = None
        elif extension in CAPTION_EXTENSIONS:
            roles[path] = CAPTION if stem in images_by_stem else "caption without an image of the same name"
        else:
            roles[path] = (f"not an image type kohya reads ({extension or 'no extension'}; "
                           f"{' '.join(IMAGE_EXTENSIONS)}): convert it, or set prepared to no to crop it")
    return roles
