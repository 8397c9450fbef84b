"""Whose face is this? The subject's reference identity and the same-person check against it.

The reference is the roster's `reference` photos (the mean embedding of their largest faces) when given, else
the majority identity of the subject's own faces: the largest group of faces that the recogniser's metric
calls one person, refined around its mean. That group must hold more than `min_share` of the faces; when it
does not (two people in equal numbers, or every photo someone else), there is no clear majority, and the
caller says so instead of guessing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tifactory.faces.recognition import Metric


@dataclass(frozen=True)
class Reference:
    vector: object | None  # None: nothing to compare with (no clear majority, or no face at all)
    kind: str  # "reference photos" | "majority" | "no clear majority" | "no faces"
    faces: int  # faces the reference was chosen from
    group: int  # faces that make it up
    note: str  # one sentence for the log and the report
    members: tuple[int, ...] = field(default=())  # indexes (of the faces given) in the group

    @property
    def usable(self) -> bool:
        return self.vector is not None


def majority_reference(embeddings, metric: Metric, *, min_share: float, rounds: int = 3) -> Reference:
    """The identity most of `embeddings` share, or a Reference without a vector that says why not."""
    import numpy as np

    vectors = [np.asarray(vector, dtype=np.float64) for vector in embeddings]
    count = len(vectors)
    if count == 0:
        return Reference(None, "no faces", 0, 0, "no face to take a reference from")
    values = metric.pairwise(vectors)
    same = np.asarray(metric.same(values), bool)  # elementwise on an array
    np.fill_diagonal(same, True)
    # the face with the most look-alikes seeds the group; ties go to the one closest to its group
    sizes = same.sum(axis=1)
    closeness = [metric.similarity(float(values[i][same[i]].mean())) for i in range(count)]
    seed = max(range(count), key=lambda i: (sizes[i], closeness[i], -i))
    members = np.flatnonzero(same[seed])
    for _ in range(rounds):
        centre = metric.mean([vectors[i] for i in members])
        regrouped = np.array([i for i in range(count) if metric.same(metric.compare(vectors[i], centre))], int)
        if len(regrouped) == 0 or set(regrouped) == set(members):
            break
        members = regrouped
    centre = metric.mean([vectors[i] for i in members])
    group = len(members)
    if count == 1:
        return Reference(centre, "majority", 1, 1, "one face only: it is the reference (nothing to compare)",
                         (0,))
    if group > min_share * count and group >= 2:
        return Reference(centre, "majority", count, group,
                         f"reference = the majority identity: {group} of {count} faces are one person",
                         tuple(int(i) for i in members))
    return Reference(None, "no clear majority", count, group,
                     f"no clear majority among {count} faces (the largest group of one person has {group}, "
                     f"needs more than {min_share:.0%}): identity NOT filtered; add `reference` photos to the "
                     "roster row", tuple(int(i) for i in members))


def photo_reference(embeddings, metric: Metric, photos: int) -> Reference:
    """The mean of the reference photos' face embeddings."""
    if not len(embeddings):
        return Reference(None, "no faces", 0, 0, f"none of the {photos} reference photo(s) shows a usable face")
    return Reference(metric.mean(embeddings), "reference photos", len(embeddings), len(embeddings),
                     f"reference = the mean of {len(embeddings)} face(s) in the roster's reference photo(s)")


def check(embedding, reference: Reference, metric: Metric) -> tuple[float, str]:
    """(metric value, "" when the same person else the reject reason)."""
    value = metric.compare(embedding, reference.vector)
    if metric.same(value):
        return value, ""
    return value, f"different person ({metric.explain(value)} to the subject's reference)"


def reference_photo_embeddings(sources, detector, recogniser, say: Callable[[str], None],
                               max_pixels: int) -> tuple[list, int]:
    """(embeddings of the largest face in each reference photo, photos found). `sources`: files, folders or
    globs. Photos that cannot be read or show no face are skipped, and `say` names them."""
    import numpy as np

    from tifactory.photos.sources import expand_source
    from tifactory.faces import load_rgb, short_error

    files: list[str] = []
    for source in sources:
        listing = expand_source(os.fspath(source)).absolute()
        if listing.problem:
            say(f"reference {source}: {listing.problem}")
        files.extend(f for f in listing.files if f not in files)
    embeddings = []
    for path in files:
        name = Path(path).name
        try:
            pixels = load_rgb(path, min_long_side=detector.max_side, max_pixels=max_pixels)
            faces = detector.detect(pixels)
            if not faces:
                say(f"reference {name}: no face, not used")
                continue
            embeddings.append(np.asarray(recogniser.embed(pixels, faces[0]), dtype=np.float64))
        except Exception as exc:  # noqa: BLE001 - a bad reference photo is reported, not fatal
            say(f"reference {name}: not used ({short_error(exc)})")
            continue
        if len(faces) > 1:
            say(f"reference {name}: {len(faces)} faces, the largest is used")
    say(f"identity: {len(embeddings)} of {len(files)} reference photo(s) usable")
    return embeddings, len(files)
