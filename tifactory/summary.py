"""Per-roster summary of the crop stage: kept / rejected counts by reason, one row per subject."""

from __future__ import annotations

import os
import re
from collections import Counter

from tifactory.fileio import write_tsv_atomic

_CATEGORY = re.compile(r"^(.*?)(?:\s+of\s.*|\s*[:(].*|\s+x[0-9].*|\s+[0-9].*)?$")


def reason_category(reason: str) -> str:
    """The stable head of a reason: 'duplicate of /a.png' -> 'duplicate', 'face too small (30px < 48)' ->
    'face too small', 'upscale x3.1 > 2' -> 'upscale'."""
    reason = " ".join(str(reason).split())
    if not reason:
        return "rejected"
    match = _CATEGORY.match(reason)
    head = (match.group(1) if match else reason).strip() or reason
    return head


def count_reasons(reasons) -> dict[str, int]:
    """{reason category: count} of rejection reasons (e.g. every `duplicate of <path>` counts as one
    `duplicate`), most frequent first, ties by name: the one way every table and report counts them."""
    counts = Counter(reason_category(reason or "") for reason in reasons)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def identity_text(identity: dict) -> str:
    """One cell for the crop stage's identity filter (tifactory.photos.crop's identity.json): model, metric, outcome."""
    if not identity:
        return ""
    if identity.get("filter") == "off":
        return "off"
    head = f"{identity.get('model', '?')} {identity.get('metric', '?')}: {identity['filter']}"
    if identity["filter"] == "on":
        return f"{head} ({identity.get('reference')}, {identity.get('rejected', 0)} rejected)"
    return (f"{head} ({identity.get('reference')}: largest group {identity.get('group', 0)} of "
            f"{identity.get('faces', 0)} faces)")


def summarize_crops(manifests: dict[str, str | os.PathLike], out_path: str | os.PathLike):
    """Write (atomically) and return a TSV: subject, photos, kept, rejected, identity (the identity filter's
    model, metric and outcome), then one column per rejection reason category (counts). `manifests`:
    subject -> crop manifest TSV (its folder's identity.json is read when present)."""
    import json
    from pathlib import Path

    import pandas as pd

    rows = []
    categories: set[str] = set()
    for subject in sorted(manifests):
        frame = pd.read_csv(manifests[subject], sep="\t", dtype=str, keep_default_na=False)
        rejected = frame[frame["status"] != "kept"]
        counts = count_reasons(rejected["reason"])
        categories.update(counts)
        identity_json = Path(manifests[subject]).parent / "identity.json"
        identity = json.loads(identity_json.read_text(encoding="utf-8")) if identity_json.is_file() else {}
        rows.append({"subject": subject, "photos": len(frame), "kept": int((frame["status"] == "kept").sum()),
                     "rejected": len(rejected), "identity": identity_text(identity), **counts})
    columns = ["subject", "photos", "kept", "rejected", "identity", *sorted(categories)]
    table = pd.DataFrame(rows, columns=columns)
    for column in [c for c in columns[1:] if c != "identity"]:
        table[column] = table[column].fillna(0).astype(int)
    write_tsv_atomic(out_path, table)
    return table
