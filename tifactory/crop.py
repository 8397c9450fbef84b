"""Stage 2: find the subject's face in every kept raw photo and cut a square, face-centred crop.

One manifest row per raw-manifest row; rows rejected by collect stay rejected with their reason.
Face and crop boxes are integer pixels of the EXIF-upright full-resolution source photo; a crop box
may reach outside the photo (negative crop_x/crop_y or beyond the far edge) where it was padded.
Every measured value behind a decision is a manifest column.

Speed: JPEGs are decoded twice at reduced DCT scale (PIL draft mode): once just large enough for the
detector (~640 px), once just large enough that the crop is not upscaled by the reduced decode.
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
    "detector",
    "face_px",
    "face_share",
    "face_center_y",
    "eye_angle",
    "rotation",
    "pad_share",
    "upscale",
    "sharpness",
    "identity_score",
]
_INT_COLUMNS = ["face_x", "face_y", "face_w", "face_h", "crop_x", "crop_y", "crop_size", "n_faces", "face_px"]
_FLOAT_COLUMNS = ["det_score", "face_share", "face_center_y", "eye_angle", "rotation", "pad_share", "upscale",
                  "sharpness", "identity_score"]
PAD_MODES = ("edge", "blur")
UPSCALE_POLICIES = ("reject", "flag")
SHARPNESS_SIDE = 128  # the face region is resampled to this side before measuring blur (scale-free)
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
    max_pad_share: float = 0.0,
    max_face_share: float = 1.0,
    max_shift: float = 1.0,
) -> tuple[int, int, int] | None:
    """Square crop (x, y, size) in source pixels for a face box (x, y, w, h) in an image (width, height).

    size = max(w, h) / face_share; the face centre sits at the crop's horizontal centre and at
    `face_center_y` of its height. Then the square is shifted towards the inside of the image; what
    shifting cannot fix (a square larger than the image side) is padding. When the padded share of
    the crop's area would exceed `max_pad_share`, the crop is tightened (smaller square, larger face
    share) up to `max_face_share`; returns None when even that needs too much padding.
    """
    plan = frame_face(face_box, image_size, face_share=face_share, face_center_y=face_center_y,
                      max_pad_share=max_pad_share, max_face_share=max(max_face_share, face_share),
                      max_shift=max_shift)
    if plan is None:
        return None
    left, top, size, _pad = plan
    return int(round(left)), int(round(top)), int(round(size))


def _place(ideal_start: float, size: float, limit: float, max_move: float) -> float:
    """Shift a 1-D window [start, start+size) to overlap [0, limit) as much as possible, moving least
    and at most `max_move`."""
    low, high = (0.0, limit - size) if size <= limit else (limit - size, 0.0)
    start = min(max(ideal_start, low), high)
    return min(max(start, ideal_start - max_move), ideal_start + max_move)


def pad_share_of(left: float, top: float, size: float, width: int, height: int) -> float:
    overlap_w = max(0.0, min(left + size, width) - max(left, 0.0))
    overlap_h = max(0.0, min(top + size, height) - max(top, 0.0))
    return max(0.0, 1.0 - overlap_w * overlap_h / (size * size))


def frame_face(face_box, image_size, *, face_share: float, face_center_y: float, max_pad_share: float,
               max_face_share: float, max_shift: float = 1.0):
    """(left, top, size, pad_share) as floats in source pixels, or None when it cannot be framed.

    `max_shift`: how far (share of the crop side) the square may move off its ideal place to stay
    inside the photo; what remains is padding."""
    x, y, w, h = face_box
    width, height = image_size
    side = max(w, h, 1e-6)
    cx, cy = x + w / 2.0, y + h / 2.0
    def placed(size: float):
        left = _place(cx - size / 2.0, size, width, max_shift * size)
        top = _place(cy - face_center_y * size, size, height, max_shift * size)
        return left, top, size, pad_share_of(left, top, size, width, height)

    size = side / face_share
    first = placed(size)
    if first[3] <= max_pad_share + 1e-9:
        return first
    smallest = side / max_face_share
    if smallest >= size or placed(smallest)[3] > max_pad_share + 1e-9:
        return None
    # tighten: the largest square whose padding fits the cap (padding grows with the square)
    low, high = smallest, size
    for _ in range(40):
        middle = (low + high) / 2.0
        if placed(middle)[3] <= max_pad_share + 1e-9:
            low = middle
        else:
            high = middle
    return placed(low)


def eye_angle(face) -> float | None:
    """Angle of the eye line in degrees (positive: the image-right eye is lower), None without landmarks."""
    if len(face.landmarks) < 2:
        return None
    (rx, ry), (lx, ly) = face.landmarks[0], face.landmarks[1]
    import math

    return math.degrees(math.atan2(ly - ry, lx - rx))


def _extract(pixels, x0: int, y0: int, x1: int, y1: int, pad_mode: str, blur_sigma: float):
    """Region [x0, x1) x [y0, y1) of an (H, W, 3) array, padded where it leaves the image; plus a mask
    that is 255 on real pixels and 0 on padding."""
    import numpy as np

    height, width = pixels.shape[:2]
    ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    if ix1 <= ix0 or iy1 <= iy0:
        return np.full((y1 - y0, x1 - x0, 3), 127, np.uint8), mask
    inner = pixels[iy0:iy1, ix0:ix1]
    pads = ((iy0 - y0, y1 - iy1), (ix0 - x0, x1 - ix1))
    region = np.pad(inner, pads + ((0, 0),), mode="edge")
    mask[pads[0][0]:pads[0][0] + inner.shape[0], pads[1][0]:pads[1][0] + inner.shape[1]] = 255
    if pad_mode == "blur" and any(sum(p) for p in pads):
        import cv2

        blurred = cv2.GaussianBlur(region, (0, 0), sigmaX=blur_sigma)
        blurred[mask > 0] = region[mask > 0]
        region = blurred
    return np.ascontiguousarray(region), mask


def render_crop(image, box: tuple[float, float, float], *, resolution: int, rotation: float = 0.0,
                pivot: tuple[float, float] | None = None, pad_mode: str = "edge"):
    """Cut the square `box` (left, top, size; image pixels, may leave the image) out of a PIL RGB
    image, rotated by `rotation` degrees (counter-clockwise, about `pivot`), resized to `resolution`
    with LANCZOS. Returns (crop, padded share of the output's pixels)."""
    import math

    import numpy as np
    from PIL import Image

    left, top, size = box
    if rotation:
        px, py = pivot if pivot is not None else (left + size / 2.0, top + size / 2.0)
        # the rotated square stays within its farthest corner's distance of the pivot
        reach = max(math.hypot(cx - px, cy - py) for cx in (left, left + size) for cy in (top, top + size))
        x0, y0 = int(math.floor(px - reach)) - 2, int(math.floor(py - reach)) - 2
        x1, y1 = int(math.ceil(px + reach)) + 2, int(math.ceil(py + reach)) + 2
    else:
        x0, y0 = int(math.floor(left)) - 1, int(math.floor(top)) - 1
        x1, y1 = int(math.ceil(left + size)) + 1, int(math.ceil(top + size)) + 1
    # only the pixels the region needs become an array (a full decode is large)
    ix0, iy0 = min(max(x0, 0), image.width), min(max(y0, 0), image.height)
    ix1, iy1 = max(min(x1, image.width), ix0), max(min(y1, image.height), iy0)
    part = np.asarray(image.crop((ix0, iy0, ix1, iy1))) if ix1 > ix0 and iy1 > iy0 else np.zeros((0, 0, 3), np.uint8)
    region, mask = _extract(part, x0 - ix0, y0 - iy0, x1 - ix0, y1 - iy0, pad_mode,
                            blur_sigma=max(2.0, size / 40.0))
    region_image, mask_image = Image.fromarray(region), Image.fromarray(mask)
    if rotation:
        centre = (px - x0, py - y0)
        region_image = region_image.rotate(rotation, resample=Image.Resampling.BICUBIC, center=centre)
        mask_image = mask_image.rotate(rotation, resample=Image.Resampling.BILINEAR, center=centre)
    crop_box = (left - x0, top - y0, left - x0 + size, top - y0 + size)
    out = region_image.resize((resolution, resolution), Image.Resampling.LANCZOS, box=crop_box)
    out_mask = mask_image.resize((resolution, resolution), Image.Resampling.BILINEAR, box=crop_box)
    pad = 1.0 - float(np.asarray(out_mask, dtype=np.float64).mean()) / 255.0
    return out, max(0.0, pad)


def face_sharpness(image, face_box: tuple[float, float, float, float]) -> float:
    """Blur measure: variance of the Laplacian of the face region resampled to 128 px (scale-free).

    `image` is a PIL RGB image, `face_box` (x, y, w, h) in its pixels. Higher is sharper.
    """
    import cv2
    import numpy as np

    x, y, w, h = face_box
    x0, y0 = max(0, int(round(x))), max(0, int(round(y)))
    x1, y1 = min(image.width, int(round(x + w))), min(image.height, int(round(y + h)))
    if x1 - x0 < 4 or y1 - y0 < 4:
        return 0.0
    grey = np.asarray(image.crop((x0, y0, x1, y1)).convert("L"))
    interpolation = cv2.INTER_AREA if min(grey.shape) >= SHARPNESS_SIDE else cv2.INTER_CUBIC
    grey = cv2.resize(grey, (SHARPNESS_SIDE, SHARPNESS_SIDE), interpolation=interpolation)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


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
    row.update(source=source, status=status, reason=reason, output="", detector="")
    return row


def _scaled_face(face, sx: float, sy: float):
    from tifactory.detect import Face

    return Face(x=face.x * sx, y=face.y * sy, w=face.w * sx, h=face.h * sy, score=face.score,
                landmarks=tuple((px * sx, py * sy) for px, py in face.landmarks))


def robust_reference(embeddings, threshold: float, rounds: int = 3):
    """Unit mean of the embeddings after dropping, `rounds` times, those below `threshold` cosine to it."""
    import numpy as np

    vectors = np.asarray(embeddings, dtype=np.float64)
    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    keep = np.ones(len(vectors), bool)
    mean = vectors.mean(axis=0)
    for _ in range(rounds):
        mean = vectors[keep].mean(axis=0)
        mean /= np.linalg.norm(mean) or 1.0
        new_keep = vectors @ mean >= threshold
        if not new_keep.any() or (new_keep == keep).all():
            break
        keep = new_keep
    return mean


def reference_face_embeddings(sources, detector, recogniser, say=None) -> list:
    """Embeddings of the largest face in each reference photo (`sources`: files, folders or globs).

    Photos that cannot be read or show no face are skipped, and `say` (a log function) names them."""
    import numpy as np

    from tifactory.collect import _expand_source
    from tifactory.imageio import open_upright

    say = say or (lambda message: None)
    files: list[str] = []
    for source in sources:
        found, problem, *_ = _expand_source(os.fspath(source))
        if problem:
            say(f"reference {source}: {problem}")
        files.extend(f for f in found if f not in files)
    embeddings = []
    for path in files:
        name = Path(path).name
        try:
            image, _ = open_upright(path, min_long_side=getattr(detector, "max_side", 640), max_pixels=200_000_000)
            pixels = np.asarray(image)
            faces = detector.detect(pixels)
            if not faces:
                say(f"reference {name}: no face, not used")
                continue
            embeddings.append(np.asarray(recogniser.embed(pixels, faces[0]), dtype=np.float64))
        except Exception as exc:  # noqa: BLE001 - a bad reference photo is reported, not fatal
            say(f"reference {name}: not used ({_short_error(exc)})")
            continue
        if len(faces) > 1:
            say(f"reference {name}: {len(faces)} faces, the largest is used")
    say(f"identity: {len(embeddings)} of {len(files)} reference photo(s) usable")
    return embeddings


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
    detector: str = "yunet",
    insightface_root: str = "~/.insightface",
    insightface_pack: str = "buffalo_l",
    identity_threshold: float = 0.40,
    rotate: bool = False,
    max_rotation_deg: float = 30.0,
    pad_mode: str = "edge",
    max_shift: float = 0.2,
    max_pad_share: float = 0.15,
    max_face_share: float = 0.7,
    max_face_outside: float = 0.05,
    max_upscale: float = 2.5,
    upscale_policy: str = "reject",
    min_sharpness: float = 0.0,
    contact_sheet: bool = True,
    workers: int = 1,
    recogniser=None,
    reference_embeddings=None,
    reference_photos=None,
    log=None,
):
    """Crop the subject's face from every kept raw photo; write PNGs + the crop manifest TSV atomically.

    Decisions, in order (the first that fails is the row's reason):
      `no face`; `ambiguous: N faces of similar size` (another face's area exceeds 1/dominance_ratio
      of the largest); `face too small (Npx < min)` (max(w, h) in source pixels); `face cut at border`
      (more than max_face_outside of the face box outside the photo); identity (only with a
      recogniser: cosine to the reference below identity_threshold; reference = mean of
      `reference_embeddings` if given, else the robust mean of the subject's faces); `needs N% padding`
      (even tightened to max_face_share); `upscale xN > max` (policy reject; `flag` keeps it and notes
      it in reason); `blurry (sharpness S < min)`.
    Crops: `<row:03d>_<stem>.png` (row = 0-based row of the raw manifest) at `resolution` with LANCZOS;
    `contact_sheet.png` in out_dir shows every decision. PNGs in out_dir that look like crops
    (`NNN_name.png`) but are not in the new manifest are removed.
    `detector`: auto | yunet | insightface | haar (see tifactory.detect.make_detector).
    `reference_photos`: photos of the subject (files, folders or globs; the roster's `reference`
    column): with a recogniser, the reference is the mean embedding of their largest faces (plus any
    `reference_embeddings`); without one they are not used and the log says so.
    """
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import pandas as pd

    from tifactory.collect import read_raw_manifest
    from tifactory.detect import make_detector
    from tifactory.fileio import sha256_file
    from tifactory.imageio import open_upright

    if not 0.0 < face_share <= 1.0:
        raise ValueError(f"face_share must be in (0, 1], got {face_share}")
    if not 0.0 <= face_center_y <= 1.0:
        raise ValueError(f"face_center_y must be in [0, 1], got {face_center_y}")
    if dominance_ratio < 1.0:
        raise ValueError(f"dominance_ratio must be >= 1, got {dominance_ratio}")
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
    if upscale_policy not in UPSCALE_POLICIES:
        raise ValueError(f"upscale_policy must be one of {UPSCALE_POLICIES}, got {upscale_policy!r}")
    say = log or (lambda message: None)

    raw = read_raw_manifest(raw_manifest_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    jobs: list[tuple[int, dict, str, str]] = []  # (raw index, row, file, expected file hash)
    for index, raw_row in enumerate(raw.to_dict("records")):
        source = str(raw_row["source"])
        if raw_row["status"] != "kept":
            rows.append(_empty_row(source, "rejected", str(raw_row["reason"]) or "rejected by collect"))
            continue
        row = _empty_row(source, "rejected", "")
        rows.append(row)
        jobs.append((index, row, str(raw_row.get("file") or source), str(raw_row.get("file_sha256") or "")))

    local = threading.local()
    notes: list[str] = []
    workers = max(1, int(workers))
    if workers > 1:
        import cv2

        cv2.setNumThreads(1)  # parallelism comes from the photo workers

    def get_detector():
        if not hasattr(local, "detector"):
            local.detector, note = make_detector(detector, score_threshold=det_score_threshold,
                                                 insightface_root=insightface_root,
                                                 insightface_pack=insightface_pack)
            if not notes:
                notes.append(note)
        return local.detector

    def run(function, items):
        if workers > 1 and len(items) > 1:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                return list(pool.map(function, items))
        return [function(item) for item in items]

    if jobs:
        get_detector()  # fails here, once, when an explicitly requested detector is unusable
        say(notes[0])
    if recogniser is None and jobs:
        recogniser = getattr(get_detector(), "recogniser", None)
    if isinstance(reference_photos, (str, os.PathLike)):
        reference_photos = [reference_photos]
    reference_photos = [os.fspath(p) for p in reference_photos or []]
    if jobs and recogniser is None:
        say("identity filter: off (no face recogniser: it needs an insightface pack with a recognition "
            "model, see the detector line above)" + ("; reference photos not used" if reference_photos else ""))
    elif jobs and reference_photos:
        found = reference_face_embeddings(reference_photos, get_detector(), recogniser, say)
        reference_embeddings = [*(reference_embeddings if reference_embeddings is not None else []), *found]

    def detect_one(job):
        """Pass 1: decode small, detect, choose the subject's face; return the plan or None (rejected)."""
        index, row, file_path, expected = job
        found = get_detector()
        row["detector"] = found.name
        try:
            if expected and sha256_file(file_path) != expected:
                row["reason"] = "source changed since collect (re-run collect)"
                return None
            image, info = open_upright(file_path, min_long_side=found.max_side)
        except Exception as exc:  # noqa: BLE001 - gone or changed since collect: data, not a crash
            row["reason"] = f"unreadable: {_short_error(exc)}"
            return None
        try:
            faces = [_scaled_face(f, info.scale_x, info.scale_y) for f in found.detect(np.asarray(image))]
        except Exception as exc:  # noqa: BLE001
            row["reason"] = f"detection failed: {_short_error(exc)}"
            return None
        row["n_faces"] = len(faces)
        if not faces:
            row["reason"] = "no face"
            return None
        subject = faces[0]
        fx, fy, fw, fh = _clip_box(subject, info.width, info.height)
        side = max(subject.w, subject.h)
        row.update(face_x=int(round(fx)), face_y=int(round(fy)), face_w=int(round(fw)), face_h=int(round(fh)),
                   det_score=round(float(subject.score), 4), face_px=int(round(side)))
        angle = eye_angle(subject)
        if angle is not None:
            row["eye_angle"] = round(angle, 2)
        rivals = [f for f in faces if f.area * dominance_ratio > subject.area]
        if len(rivals) > 1:
            row["reason"] = f"ambiguous: {len(rivals)} faces of similar size"
            return None
        if side < min_face_px:
            row["reason"] = f"face too small ({int(round(side))}px < {min_face_px})"
            return None
        outside = 1.0 - (fw * fh) / max(subject.w * subject.h, 1e-9)
        if outside > max_face_outside:
            row["reason"] = f"face cut at border ({outside:.0%} of the face box outside the photo)"
            return None
        embedding = None
        if recogniser is not None:
            small = _scaled_face(subject, 1.0 / info.scale_x, 1.0 / info.scale_y)
            try:
                embedding = np.asarray(recogniser.embed(np.asarray(image), small), dtype=np.float64)
            except Exception as exc:  # noqa: BLE001
                row["reason"] = f"recognition failed: {_short_error(exc)}"
                return None
        plan = {"index": index, "row": row, "file": file_path, "face": subject, "size": (info.width, info.height),
                "embedding": embedding}
        if fused:
            plan["decoded"] = (image, info)  # framed right away: the decode may serve the crop too
        return plan

    fused = recogniser is None  # no identity step between detection and framing: one pass per photo
    thumbnails: dict = {}
    if fused:
        plans = []
    else:
        plans = [plan for plan in run(detect_one, jobs) if plan is not None]

    if recogniser is not None and plans:
        if reference_embeddings is not None and len(reference_embeddings):
            reference = robust_reference(reference_embeddings, -1.0, rounds=1)
            say(f"identity: reference = mean of {len(reference_embeddings)} reference face(s)")
        else:
            reference = robust_reference([p["embedding"] for p in plans], identity_threshold)
            say(f"identity: reference = robust mean of the subject's {len(plans)} face(s)")
        passed = []
        for plan in plans:
            vector = plan["embedding"] / (np.linalg.norm(plan["embedding"]) or 1.0)
            score = float(vector @ reference)
            plan["row"]["identity_score"] = round(score, 4)
            if score < identity_threshold:
                plan["row"]["reason"] = f"identity: cosine {score:.2f} < {identity_threshold:.2f} to the subject's reference"
            else:
                passed.append(plan)
        plans = passed

    def detect_and_frame(job):
        plan = detect_one(job)
        if plan is not None:
            frame_one(plan)

    def frame_one(plan):
        """Pass 2: frame, gate, decode just large enough, render and save."""
        row, face = plan["row"], plan["face"]
        width, height = plan["size"]
        framed = frame_face((face.x, face.y, face.w, face.h), (width, height), face_share=face_share,
                            face_center_y=face_center_y, max_pad_share=max_pad_share,
                            max_face_share=max(max_face_share, face_share), max_shift=max_shift)
        if framed is None:
            need = pad_share_of(*frame_face((face.x, face.y, face.w, face.h), (width, height),
                                            face_share=max(max_face_share, face_share), face_center_y=face_center_y,
                                            max_pad_share=1.0, max_face_share=1.0, max_shift=max_shift)[:3],
                                width, height)
            row["reason"] = (f"too much padding needed ({need:.0%} even at face share {max(max_face_share, face_share):.2f} "
                             f"; max {max_pad_share:.0%})")
            return
        left, top, size, _ = framed
        side = max(face.w, face.h)
        upscale = resolution / size
        row.update(crop_x=int(round(left)), crop_y=int(round(top)), crop_size=int(round(size)),
                   face_share=round(side / size, 4),
                   face_center_y=round((face.y + face.h / 2.0 - top) / size, 4), upscale=round(upscale, 3))
        flag = ""
        if upscale > max_upscale:
            if upscale_policy == "reject":
                row["reason"] = f"upscale x{upscale:.2f} > {max_upscale:g} (crop side {size:.0f}px)"
                return
            flag = f"flagged: upscaled x{upscale:.2f} > {max_upscale:g}"
        rotation = 0.0
        angle = row["eye_angle"]
        if rotate and angle is not None and 1.0 <= abs(angle) <= max_rotation_deg:
            rotation = float(angle)
        row["rotation"] = round(rotation, 2)
        long_side = max(width, height)
        need = None if upscale >= 1.0 else int(np.ceil(long_side * upscale))
        try:
            decoded = plan.pop("decoded", None)
            if decoded is not None and (max(decoded[0].size) >= need if need is not None
                                        else decoded[1].scale_x == decoded[1].scale_y == 1.0):
                image, info = decoded  # the detection decode is already large enough
            else:
                image, info = open_upright(plan["file"], min_long_side=need)
        except Exception as exc:  # noqa: BLE001
            row["reason"] = f"unreadable: {_short_error(exc)}"
            return
        sx, sy = info.scale_x, info.scale_y
        small_face = (face.x / sx, face.y / sy, face.w / sx, face.h / sy)
        sharpness = face_sharpness(image, small_face)
        row["sharpness"] = round(sharpness, 1)
        if sharpness < min_sharpness:
            row["reason"] = f"blurry (sharpness {sharpness:.0f} < {min_sharpness:g})"
            return
        pivot = ((face.x + face.w / 2.0) / sx, (face.y + face.h / 2.0) / sy)
        if rotation:
            # landmark detectors underestimate tilt: re-measure the eye line on the rotated crop and
            # solve residual(rotation) = 0 by the secant method
            def measure(turn: float):
                probe, _ = render_crop(image, (left / sx, top / sy, size / sx), resolution=320, rotation=turn,
                                       pivot=pivot, pad_mode=pad_mode)
                found = get_detector().detect(np.asarray(probe))
                return eye_angle(found[0]) if found else None

            start = measure(0.0)  # at crop scale the landmarks are better than on the small detection copy
            previous = (0.0, float(start if start is not None else angle))
            rotation = max(-max_rotation_deg, min(max_rotation_deg, previous[1]))
            for _ in range(4):
                residual = measure(rotation)
                if residual is None or abs(residual) < 0.5:
                    break
                slope = (residual - previous[1]) / (rotation - previous[0]) if rotation != previous[0] else -1.0
                if slope >= -0.05:  # not moving the right way: stop where we are
                    break
                previous, rotation = (rotation, residual), rotation - residual / slope
                rotation = max(-max_rotation_deg, min(max_rotation_deg, rotation))
            row["rotation"] = round(rotation, 2)
        crop, pad = render_crop(image, (left / sx, top / sy, size / sx), resolution=resolution, rotation=rotation,
                                pivot=pivot, pad_mode=pad_mode)
        row["pad_share"] = round(pad, 4)
        name = crop_file_name(plan["index"], row["source"])
        target = out_dir / name
        assert target.parent == out_dir and _CROP_NAME.match(name), name
        with atomic_path(target) as tmp_path:
            # zlib Huffman-only: for photographic crops as small as level 1 and faster (no match search)
            crop.save(tmp_path, format="PNG", compress_level=1, compress_type=2)
        row.update(status="kept", output=name, reason=flag)
        if contact_sheet:
            from tifactory.contact_sheet import crop_thumbnail

            thumbnails[name] = crop_thumbnail(crop)

    if fused:
        run(detect_and_frame, jobs)
    else:
        run(frame_one, plans)

    frame = pd.DataFrame(rows, columns=CROP_MANIFEST_COLUMNS)
    for column in _INT_COLUMNS:
        frame[column] = frame[column].astype("Int64")
    for column in _FLOAT_COLUMNS:
        frame[column] = frame[column].astype("Float64")
    for column in ("source", "status", "reason", "output", "detector"):
        frame[column] = frame[column].astype(object)
    write_tsv_atomic(manifest_path, frame)

    wanted = {name for name in frame["output"] if name}
    for stale in sorted(out_dir.iterdir()):
        if stale.is_file() and _CROP_NAME.match(stale.name) and stale.name not in wanted:
            stale.unlink()
    if contact_sheet:
        from tifactory.contact_sheet import make_contact_sheet

        make_contact_sheet(frame, out_dir, out_dir / "contact_sheet.png",
                           files={str(r["source"]): str(r.get("file") or r["source"]) for r in raw.to_dict("records")},
                           thumbnails=thumbnails)
    return frame
