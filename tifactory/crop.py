"""Stage 2: find the subject's face in every kept raw photo and cut a square, face-centred crop.

One manifest row per raw-manifest row; rows rejected by collect stay rejected with their reason.
Face and crop boxes are integer pixels of the EXIF-upright source photo.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from tifactory.fileio import atomic_path, write_tsv_atomic

CROP_MANIFEST_COLUMNS = [
    "source",
    "status",
    "reason",
    "face_x",
    "face_y",
    "face_w",
    "face_h",
    "crop_x",
    "crop_y",
    "crop_size",
    "det_score",
    "n_faces",
    "output",
]
_INT_COLUMNS = ["face_x", "face_y", "face_w", "face_h", "crop_x", "crop_y", "crop_size", "n_faces"]
_CROP_NAME = re.compile(r"^\d{3,}_[A-Za-z0-9._-]+\.png$")
_MAX_STEM_CHARS = 80


def sanitize_stem(stem: str) -> str:
    """File-name-safe version of a source stem: [A-Za-z0-9._-] only, no leading dots, <= 80 chars."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-")[:_MAX_STEM_CHARS].strip("._-")
    return safe or "photo"


def crop_file_name(index: int, source: str) -> str:
    """`<index:03d>_<sanitised source stem>.png` (a bare name: it cannot point outside out_dir)."""
    return f"{index:03d}_{sanitize_stem(Path(source).stem)}.png"


def compute_crop_box(
    face_box: tuple[float, float, float, float],
    image_size: tuple[int, int],
    *,
    face_share: float = 0.45,
    face_center_y: float = 0.45,
) -> tuple[int, int, int]:
    """Square crop (x, y, size) for a face box (x, y, w, h) inside an image of (width, height).

    size = max(w, h) / face_share, at most the image's short side; the face centre sits at
    `face_center_y` of the crop height and at its horizontal centre; then the square is shifted
    (never shrunk further) so it lies inside the image.
    """
    x, y, w, h = face_box
    width, height = image_size
    short_side = min(width, height)
    size = int(round(max(w, h) / face_share))
    size = max(1, min(size, short_side))
    cx, cy = x + w / 2.0, y + h / 2.0
    left = int(round(cx - size / 2.0))
    top = int(round(cy - face_center_y * size))
    left = min(max(left, 0), width - size)
    top = min(max(top, 0), height - size)
    return left, top, size


def _clip_box(face, width: int, height: int) -> tuple[float, float, float, float]:
    x0, y0 = max(0.0, face.x), max(0.0, face.y)
    x1, y1 = min(float(width), face.x + face.w), min(float(height), face.y + face.h)
    return x0, y0, max(0.0, x1 - x0), max(0.0, y1 - y0)


def _short_error(exc: BaseException) -> str:
    message = " ".join((str(exc) or type(exc).__name__).split())
    message = f"{type(exc).__name__}: {message}"
    return message[:117] + "..." if len(message) > 120 else message


def _empty_row(source: str, status: str, reason: str) -> dict:
    row = {column: None for column in CROP_MANIFEST_COLUMNS}
    row.update(source=source, status=status, reason=reason, output="")
    return row


def crop_faces(
    raw_manifest_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    manifest_path: str | os.PathLike,
    *,
    resolution: int = 512,
    face_share: float = 0.45,
    face_center_y: float = 0.45,
    min_face_px: int = 48,
    dominance_ratio: float = 2.0,
    det_score_threshold: float = 0.6,
):
    """Crop the subject's face from every kept raw photo; write PNGs + the crop manifest TSV atomically.

    The subject's face is the largest detected face. A photo is rejected when no face is found
    (`no face`), when another face's area exceeds 1/dominance_ratio of the largest
    (`ambiguous: N faces of similar size`), or when the largest face's side max(w, h) is below
    `min_face_px` (`face too small (Npx < min)`). Crops are saved as `<row:03d>_<stem>.png`
    (row = 0-based row of the raw manifest), resized to `resolution` with LANCZOS. PNGs in out_dir
    that look like crops (`NNN_name.png`) but are not in the new manifest are removed.
    """
    import numpy as np
    import pandas as pd
    from PIL import Image

    from tifactory.collect import load_upright_rgb, pixel_sha256, read_raw_manifest
    from tifactory.detect import YuNetDetector

    if not 0.0 < face_share <= 1.0:
        raise ValueError(f"face_share must be in (0, 1], got {face_share}")
    if not 0.0 <= face_center_y <= 1.0:
        raise ValueError(f"face_center_y must be in [0, 1], got {face_center_y}")
    if dominance_ratio < 1.0:
        raise ValueError(f"dominance_ratio must be >= 1, got {dominance_ratio}")
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")

    raw = read_raw_manifest(raw_manifest_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    detector = None
    rows: list[dict] = []

    for index, raw_row in enumerate(raw.to_dict("records")):
        source = str(raw_row["source"])
        if raw_row["status"] != "kept":
            rows.append(_empty_row(source, "rejected", str(raw_row["reason"]) or "rejected by collect"))
            continue
        row = _empty_row(source, "rejected", "")
        rows.append(row)

        try:
            image = load_upright_rgb(source)
        except Exception as exc:  # noqa: BLE001 - gone or changed since collect: data, not a crash
            row["reason"] = f"unreadable: {_short_error(exc)}"
            continue
        expected_hash = str(raw_row.get("pixel_sha256") or "")
        if expected_hash and pixel_sha256(image) != expected_hash:
            row["reason"] = "source changed since collect (re-run collect)"
            continue

        if detector is None:
            detector = YuNetDetector(score_threshold=det_score_threshold)
        try:
            faces = detector.detect(np.asarray(image))
        except Exception as exc:  # noqa: BLE001
            row["reason"] = f"detection failed: {_short_error(exc)}"
            continue
        row["n_faces"] = len(faces)
        if not faces:
            row["reason"] = "no face"
            continue

        subject = faces[0]
        fx, fy, fw, fh = _clip_box(subject, image.width, image.height)
        row.update(
            face_x=int(round(fx)),
            face_y=int(round(fy)),
            face_w=int(round(fw)),
            face_h=int(round(fh)),
            det_score=round(float(subject.score), 4),
        )
        rivals = [f for f in faces if f.area * dominance_ratio > subject.area]
        if len(rivals) > 1:
            row["reason"] = f"ambiguous: {len(rivals)} faces of similar size"
            continue
        face_side = int(round(max(fw, fh)))
        if face_side < min_face_px:
            row["reason"] = f"face too small ({face_side}px < {min_face_px})"
            continue

        left, top, size = compute_crop_box(
            (fx, fy, fw, fh), image.size, face_share=face_share, face_center_y=face_center_y
        )
        crop = image.crop((left, top, left + size, top + size))
        if size != resolution:
            crop = crop.resize((resolution, resolution), Image.Resampling.LANCZOS)
        name = crop_file_name(index, source)
        target = out_dir / name
        assert target.parent == out_dir and _CROP_NAME.match(name), name
        with atomic_path(target) as tmp_path:
            crop.save(tmp_path, format="PNG")
        row.update(status="kept", crop_x=left, crop_y=top, crop_size=size, output=name)

    frame = pd.DataFrame(rows, columns=CROP_MANIFEST_COLUMNS)
    for column in _INT_COLUMNS:
        frame[column] = frame[column].astype("Int64")
    frame["det_score"] = frame["det_score"].astype("Float64")
    for column in ("source", "status", "reason", "output"):
        frame[column] = frame[column].astype(object)
    write_tsv_atomic(manifest_path, frame)

    wanted = {name for name in frame["output"] if name}
    for stale in sorted(out_dir.iterdir()):
        if stale.is_file() and _CROP_NAME.match(stale.name) and stale.name not in wanted:
            stale.unlink()
    return frame
