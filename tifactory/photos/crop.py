"""Stage 2: find the subject's face in every kept raw photo and cut a square, face-centred crop.

One manifest row per raw-manifest row; rows rejected by collect stay rejected with their reason.
Face and crop boxes are integer pixels of the EXIF-upright full-resolution source photo; a crop box
may reach outside the photo (negative crop_x/crop_y or beyond the far edge) where it was padded.
Every measured value behind a decision is a manifest column.

Speed: JPEGs are decoded twice at reduced DCT scale (PIL draft mode): once just large enough for the
detector (~640 px), once just large enough that the crop is not upscaled by the reduced decode.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from tifactory.errors import TifactoryError
from tifactory.faces import short_error
from tifactory.faces.models import FaceModels, FaceSettings
from tifactory.fileio import atomic_path, write_text_atomic, write_tsv_atomic

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
    "identity_metric",
]
_TEXT_COLUMNS = ["source", "status", "reason", "output", "detector", "identity_metric"]
_INT_COLUMNS = ["face_x", "face_y", "face_w", "face_h", "crop_x", "crop_y", "crop_size", "n_faces", "face_px"]
_FLOAT_COLUMNS = ["det_score", "face_share", "face_center_y", "eye_angle", "rotation", "pad_share", "upscale",
                  "sharpness", "identity_score"]
PAD_MODES = ("edge", "blur")
UPSCALE_POLICIES = ("reject", "flag")
SHARPNESS_SIDE = 128  # the face region is resampled to this side before measuring blur (scale-free)
_CROP_NAME = re.compile(r"^\d{3,}_[A-Za-z0-9._-]+\.png$")
_MAX_STEM_CHARS = 80


class CropError(TifactoryError, ValueError):
    """A crop setting is out of range or unknown (config.yaml's `crop:` section, a roster override, --config)."""


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
    face_share: float,
    face_center_y: float,
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


# ---------------------------------------------------------------------------------------------
# Settings: one frozen object built from config (crop + faces sections); nothing defaulted here
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CropSettings:
    """config.yaml's `crop:` section, its `faces:` section and the collect stage's pixel guard."""

    resolution: int
    face_share: float
    face_center_y: float
    min_face_px: int
    dominance_ratio: float
    identity_filter: bool
    identity_majority: float
    rotate: bool
    max_rotation_deg: float
    max_shift: float
    pad_mode: str
    max_pad_share: float
    max_face_share: float
    max_face_outside: float
    max_upscale: float
    upscale_policy: str
    min_sharpness: float
    contact_sheet: bool
    max_megapixels: float
    faces: FaceSettings = field(repr=False)

    def __post_init__(self):
        checks = [(0.0 < self.face_share <= 1.0, f"face_share must be in (0, 1], got {self.face_share}"),
                  (0.0 <= self.face_center_y <= 1.0, f"face_center_y must be in [0, 1], got {self.face_center_y}"),
                  (self.dominance_ratio >= 1.0, f"dominance_ratio must be >= 1, got {self.dominance_ratio}"),
                  (self.resolution >= 1, f"resolution must be >= 1, got {self.resolution}"),
                  (self.pad_mode in PAD_MODES, f"pad_mode must be one of {PAD_MODES}, got {self.pad_mode!r}"),
                  (self.upscale_policy in UPSCALE_POLICIES,
                   f"upscale_policy must be one of {UPSCALE_POLICIES}, got {self.upscale_policy!r}"),
                  (0.0 <= self.identity_majority < 1.0,
                   f"identity_majority must be in [0, 1), got {self.identity_majority}")]
        for ok, message in checks:
            if not ok:
                raise CropError(f"bad crop setting: crop.{message} (config.yaml's crop section or its override)")

    @classmethod
    def from_config(cls, config: dict, **overrides) -> "CropSettings":
        """From the whole config (its crop, faces and collect sections); `overrides`: crop keys, or
        `faces={...}` for face-model keys. `resolution` (the crop side) is not a crop key: it is train.resolution
        as resolved for the base model's family (rule crop passes it in the crop params)."""
        faces = FaceSettings.from_config(config["faces"], **overrides.pop("faces", {}))
        values = {**config["crop"], "max_megapixels": config["collect"]["max_megapixels"], **overrides}
        names = {f.name for f in fields(cls)} - {"faces"}
        unknown = sorted(set(values) - names)
        if unknown:
            raise CropError(f"unknown crop setting(s) {unknown}; the crop section knows {sorted(names - {'resolution'})}")
        if "resolution" not in values:
            raise CropError("the crop side (resolution) is the training resolution, train.resolution resolved "
                            "for the base model's family: pass resolution=")
        return cls(faces=faces, **{name: values[name] for name in names if name in values})

    @property
    def max_pixels(self) -> int:
        return int(self.max_megapixels * 1e6)


# ---------------------------------------------------------------------------------------------
# Per-photo steps
# ---------------------------------------------------------------------------------------------


def _clip_box(face, width: int, height: int) -> tuple[float, float, float, float]:
    x0, y0 = max(0.0, face.x), max(0.0, face.y)
    x1, y1 = min(float(width), face.x + face.w), min(float(height), face.y + face.h)
    return x0, y0, max(0.0, x1 - x0), max(0.0, y1 - y0)


def _empty_row(source: str, status: str, reason: str) -> dict:
    row = {column: None for column in CROP_MANIFEST_COLUMNS}
    row.update(source=source, status=status, reason=reason, output="", detector="", identity_metric="")
    return row


def _scaled_face(face, sx: float, sy: float):
    from tifactory.faces import Face

    return Face(x=face.x * sx, y=face.y * sy, w=face.w * sx, h=face.h * sy, score=face.score,
                landmarks=tuple((px * sx, py * sy) for px, py in face.landmarks))


@dataclass
class Photo:
    """One kept raw photo on its way through the steps; `row` is its manifest row (filled as it goes)."""

    index: int
    row: dict
    file: str
    expected_sha256: str
    face: object = None  # the subject's Face, full-resolution pixels
    size: tuple[int, int] = (0, 0)
    embedding: object = None
    decoded: object = None  # (image, info) of the detection decode, kept when framing follows at once


def detect_subject(photo: Photo, models: FaceModels, settings: CropSettings, *, keep_decode: bool) -> bool:
    """Step 1: decode small, detect, choose the subject's face, gate it; embed it when identity is checked.
    False (with the row's reason) when the photo is rejected."""
    import numpy as np

    from tifactory.fileio import sha256_file
    from tifactory.photos.imageio import open_upright

    row, detector = photo.row, models.detector()
    row["detector"] = detector.name
    try:
        if photo.expected_sha256 and sha256_file(photo.file) != photo.expected_sha256:
            row["reason"] = "source changed since collect (re-run collect)"
            return False
        image, info = open_upright(photo.file, min_long_side=detector.max_side)
    except Exception as exc:  # noqa: BLE001 - gone or changed since collect: data, not a crash
        row["reason"] = f"unreadable: {short_error(exc)}"
        return False
    pixels = np.asarray(image)
    try:
        faces = [_scaled_face(f, info.scale_x, info.scale_y) for f in detector.detect(pixels)]
    except Exception as exc:  # noqa: BLE001
        row["reason"] = f"detection failed: {short_error(exc)}"
        return False
    row["n_faces"] = len(faces)
    if not faces:
        row["reason"] = "no face"
        return False
    subject = faces[0]
    fx, fy, fw, fh = _clip_box(subject, info.width, info.height)
    side = max(subject.w, subject.h)
    row.update(face_x=int(round(fx)), face_y=int(round(fy)), face_w=int(round(fw)), face_h=int(round(fh)),
               det_score=round(float(subject.score), 4), face_px=int(round(side)))
    angle = eye_angle(subject)
    if angle is not None:
        row["eye_angle"] = round(angle, 2)
    rivals = [f for f in faces if f.area * settings.dominance_ratio > subject.area]
    if len(rivals) > 1:
        row["reason"] = f"ambiguous: {len(rivals)} faces of similar size"
        return False
    if side < settings.min_face_px:
        row["reason"] = f"face too small ({int(round(side))}px < {settings.min_face_px})"
        return False
    outside = 1.0 - (fw * fh) / max(subject.w * subject.h, 1e-9)
    if outside > settings.max_face_outside:
        row["reason"] = f"face cut at border ({outside:.0%} of the face box outside the photo)"
        return False
    recogniser = models.recogniser()
    if recogniser is not None:
        try:
            small = _scaled_face(subject, 1.0 / info.scale_x, 1.0 / info.scale_y)
            photo.embedding = np.asarray(recogniser.embed(pixels, small), dtype=np.float64)
        except Exception as exc:  # noqa: BLE001
            row["reason"] = f"recognition failed: {short_error(exc)}"
            return False
    photo.face, photo.size = subject, (info.width, info.height)
    if keep_decode:
        photo.decoded = (image, info)
    return True


def subject_reference(photos: list[Photo], models: FaceModels, settings: CropSettings, reference_photos,
                      say):
    """Step 2a: the subject's reference identity (the roster's reference photos, else the majority)."""
    from tifactory.faces.identity import majority_reference, photo_reference, reference_photo_embeddings

    metric = models.recogniser().metric
    if reference_photos:
        embeddings, found = reference_photo_embeddings(reference_photos, models.detector(), models.recogniser(),
                                                       say, settings.max_pixels)
        reference = photo_reference(embeddings, metric, found)
        if reference.usable:
            return reference
        say(f"identity: {reference.note}; falling back to the subject's own faces")
    return majority_reference([photo.embedding for photo in photos], metric, min_share=settings.identity_majority)


def check_identity(photos: list[Photo], reference, recogniser) -> list[Photo]:
    """Step 2b: reject every face that is not the reference's person; return the others."""
    from tifactory.faces.identity import check

    metric = recogniser.metric
    passed = []
    for photo in photos:
        photo.row["identity_metric"] = f"{recogniser.name} {metric.kind}"
        if not reference.usable:
            passed.append(photo)
            continue
        value, reason = check(photo.embedding, reference, metric)
        photo.row["identity_score"] = round(value, 4)
        if reason:
            photo.row["reason"] = reason
        else:
            passed.append(photo)
    return passed


def _level_eyes(image, box, pivot, angle: float, detector, settings: CropSettings) -> float:
    """The rotation that levels the eye line: landmark detectors underestimate tilt, so the eye line is
    re-measured on the rotated crop and residual(rotation) = 0 solved by the secant method."""
    import numpy as np

    limit = settings.max_rotation_deg

    def measure(turn: float):
        probe, _ = render_crop(image, box, resolution=320, rotation=turn, pivot=pivot, pad_mode=settings.pad_mode)
        found = detector.detect(np.asarray(probe))
        return eye_angle(found[0]) if found else None

    start = measure(0.0)  # at crop scale the landmarks are better than on the small detection copy
    previous = (0.0, float(start if start is not None else angle))
    rotation = max(-limit, min(limit, previous[1]))
    for _ in range(4):
        residual = measure(rotation)
        if residual is None or abs(residual) < 0.5:
            break
        slope = (residual - previous[1]) / (rotation - previous[0]) if rotation != previous[0] else -1.0
        if slope >= -0.05:  # not moving the right way: stop where we are
            break
        previous, rotation = (rotation, residual), rotation - residual / slope
        rotation = max(-limit, min(limit, rotation))
    return rotation


def frame_and_render(photo: Photo, models: FaceModels, settings: CropSettings, out_dir: Path):
    """Step 3: frame, gate (padding, upscale, blur), decode just large enough, render and save. Returns the
    crop (PIL) when kept, else None with the row's reason."""
    import numpy as np

    from tifactory.photos.imageio import open_upright

    row, face, s = photo.row, photo.face, settings
    width, height = photo.size
    box = (face.x, face.y, face.w, face.h)
    tightest = max(s.max_face_share, s.face_share)
    framed = frame_face(box, (width, height), face_share=s.face_share, face_center_y=s.face_center_y,
                        max_pad_share=s.max_pad_share, max_face_share=tightest, max_shift=s.max_shift)
    if framed is None:
        need = pad_share_of(*frame_face(box, (width, height), face_share=tightest, face_center_y=s.face_center_y,
                                        max_pad_share=1.0, max_face_share=1.0, max_shift=s.max_shift)[:3],
                            width, height)
        row["reason"] = f"too much padding needed ({need:.0%} even at face share {tightest:.2f} ; max {s.max_pad_share:.0%})"
        return None
    left, top, size, _ = framed
    upscale = s.resolution / size
    row.update(crop_x=int(round(left)), crop_y=int(round(top)), crop_size=int(round(size)),
               face_share=round(max(face.w, face.h) / size, 4),
               face_center_y=round((face.y + face.h / 2.0 - top) / size, 4), upscale=round(upscale, 3))
    flag = ""
    if upscale > s.max_upscale:
        if s.upscale_policy == "reject":
            row["reason"] = f"upscale x{upscale:.2f} > {s.max_upscale:g} (crop side {size:.0f}px)"
            return None
        flag = f"flagged: upscaled x{upscale:.2f} > {s.max_upscale:g}"
    angle = row["eye_angle"]
    rotation = float(angle) if s.rotate and angle is not None and 1.0 <= abs(angle) <= s.max_rotation_deg else 0.0
    row["rotation"] = round(rotation, 2)
    need = None if upscale >= 1.0 else int(np.ceil(max(width, height) * upscale))
    try:
        decoded, photo.decoded = photo.decoded, None
        if decoded is not None and (max(decoded[0].size) >= need if need is not None
                                    else decoded[1].scale_x == decoded[1].scale_y == 1.0):
            image, info = decoded  # the detection decode is already large enough
        else:
            image, info = open_upright(photo.file, min_long_side=need)
    except Exception as exc:  # noqa: BLE001
        row["reason"] = f"unreadable: {short_error(exc)}"
        return None
    sx, sy = info.scale_x, info.scale_y
    sharpness = face_sharpness(image, (face.x / sx, face.y / sy, face.w / sx, face.h / sy))
    row["sharpness"] = round(sharpness, 1)
    if sharpness < s.min_sharpness:
        row["reason"] = f"blurry (sharpness {sharpness:.0f} < {s.min_sharpness:g})"
        return None
    pivot = ((face.x + face.w / 2.0) / sx, (face.y + face.h / 2.0) / sy)
    region = (left / sx, top / sy, size / sx)
    if rotation:
        rotation = _level_eyes(image, region, pivot, angle, models.detector(), s)
        row["rotation"] = round(rotation, 2)
    crop, pad = render_crop(image, region, resolution=s.resolution, rotation=rotation, pivot=pivot,
                            pad_mode=s.pad_mode)
    row["pad_share"] = round(pad, 4)
    name = crop_file_name(photo.index, row["source"])
    target = out_dir / name
    assert target.parent == out_dir and _CROP_NAME.match(name), name
    with atomic_path(target) as tmp_path:
        # zlib Huffman-only: for photographic crops as small as level 1 and faster (no match search)
        crop.save(tmp_path, format="PNG", compress_level=1, compress_type=2)
    row.update(status="kept", output=name, reason=flag)
    return crop


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


IDENTITY_FILE = "identity.json"


def _run(function, items, workers: int):
    if workers > 1 and len(items) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(function, items))
    return [function(item) for item in items]


def _photos(raw) -> tuple[list[dict], list[Photo]]:
    """Manifest rows for every raw row (collect's rejects stay rejected) and the photos to work on."""
    rows, photos = [], []
    for index, raw_row in enumerate(raw.to_dict("records")):
        source = str(raw_row["source"])
        if raw_row["status"] != "kept":
            rows.append(_empty_row(source, "rejected", str(raw_row["reason"]) or "rejected by collect"))
            continue
        row = _empty_row(source, "rejected", "")
        rows.append(row)
        photos.append(Photo(index, row, str(raw_row.get("file") or source), str(raw_row.get("file_sha256") or "")))
    return rows, photos


def identity_step(found: list[Photo], models: FaceModels, settings: CropSettings, reference_photos, say):
    """Step 2: the subject's reference, then the same-person check. Returns (photos that passed, the
    identity summary written to identity.json)."""
    recogniser = models.recogniser()
    reference = subject_reference(found, models, settings, reference_photos, say)
    passed = check_identity(found, reference, recogniser)
    identity = {"filter": "on" if reference.usable else "not applied", "model": recogniser.name,
                "metric": recogniser.metric.kind, "threshold": recogniser.metric.threshold,
                "reference": reference.kind, "faces": reference.faces, "group": reference.group,
                "rejected": len(found) - len(passed), "note": reference.note}
    say(f"identity ({recogniser.label}): {reference.note}; {identity['rejected']} face(s) of someone else rejected")
    return passed, identity


def write_manifest(rows: list[dict], manifest_path: str | os.PathLike):
    """The crop manifest as a typed DataFrame, written atomically."""
    import pandas as pd

    table = pd.DataFrame(rows, columns=CROP_MANIFEST_COLUMNS)
    for column in _INT_COLUMNS:
        table[column] = table[column].astype("Int64")
    for column in _FLOAT_COLUMNS:
        table[column] = table[column].astype("Float64")
    for column in _TEXT_COLUMNS:
        table[column] = table[column].astype(object)
    write_tsv_atomic(manifest_path, table)
    return table


def _crop_photos(photos: list[Photo], models: FaceModels, settings: CropSettings, out_dir: Path, workers: int,
                 reference_photos, say, thumbnails: dict) -> dict:
    """Steps 1-3 over every photo (rows and crops as they go; thumbnails for the contact sheet collected into
    `thumbnails`); returns the identity summary."""
    off = "identity filter: off (crop.identity_filter: false)"
    identity = ({"filter": "off", "note": off} if not settings.identity_filter else
                {"filter": "not applied", "model": "", "metric": "", "reference": "no faces", "faces": 0, "group": 0,
                 "rejected": 0, "note": "no photo to check"})
    if photos:
        models.detector()  # fails here, once, when a model cannot load
        if settings.identity_filter:
            models.recogniser()  # loads (and, shared by the threads, forks its processes) before any thread
        say(models.detector_note)
        say(models.recogniser_note if settings.identity_filter
            else off + ("; reference photos not used" if reference_photos else ""))

    def frame(photo: Photo):
        crop = frame_and_render(photo, models, settings, out_dir)
        if crop is not None and settings.contact_sheet:
            from tifactory.photos.contact_sheet import crop_thumbnail

            thumbnails[photo.row["output"]] = crop_thumbnail(crop)

    if not settings.identity_filter or not photos:  # no identity step between detection and framing: one pass
        _run(lambda photo: detect_subject(photo, models, settings, keep_decode=True) and frame(photo), photos,
             workers)
    else:
        detected = _run(lambda photo: detect_subject(photo, models, settings, keep_decode=False), photos, workers)
        found = [photo for ok, photo in zip(detected, photos) if ok]
        passed, identity = identity_step(found, models, settings, [os.fspath(p) for p in reference_photos], say)
        _run(frame, passed, workers)
    return identity


def crop_faces(raw_manifest_path: str | os.PathLike, out_dir: str | os.PathLike, manifest_path: str | os.PathLike,
               settings: CropSettings, *, reference_photos=(), workers: int = 1, detector=None, recogniser=None,
               log=None):
    """Crop the subject's face from every kept raw photo; write PNGs, the crop manifest TSV, `identity.json`
    and the contact sheet (atomically). Returns the manifest as a DataFrame.

    Per photo, the first failing decision is the row's reason: `no face`; `ambiguous: N faces of similar
    size`; `face too small`; `face cut at border`; `different person (distance D > T to the subject's
    reference)` (identity filter: see tifactory.faces.identity); `too much padding needed`; `upscale xN > max`
    (or flagged); `blurry`. Crops are `<row:03d>_<stem>.png` (row = 0-based row of the raw manifest); PNGs in
    out_dir that look like crops but are not in the new manifest are removed.
    `detector` / `recogniser`: ready objects instead of the configured models (tests' stand-ins).
    """
    from tifactory.photos.collect import read_raw_manifest

    say = log or (lambda message: None)
    raw = read_raw_manifest(raw_manifest_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, photos = _photos(raw)
    workers = max(1, int(workers))
    if workers > 1:
        import cv2

        cv2.setNumThreads(1)  # parallelism comes from the photo workers
    models = FaceModels(settings.faces, detector=detector, recogniser=recogniser, recognise=settings.identity_filter,
                        threads=workers)
    thumbnails: dict = {}
    try:
        identity = _crop_photos(photos, models, settings, out_dir, workers, reference_photos, say, thumbnails)
    finally:
        models.close()
    write_text_atomic(out_dir / IDENTITY_FILE, json.dumps(identity, indent=2, sort_keys=True) + "\n")
    table = write_manifest(rows, manifest_path)
    wanted = {name for name in table["output"] if name}
    for stale in sorted(out_dir.iterdir()):
        if stale.is_file() and _CROP_NAME.match(stale.name) and stale.name not in wanted:
            stale.unlink()
    if settings.contact_sheet:
        from tifactory.photos.contact_sheet import make_contact_sheet

        make_contact_sheet(table, out_dir, out_dir / "contact_sheet.png",
                           files={str(r["source"]): str(r.get("file") or r["source"]) for r in raw.to_dict("records")},
                           thumbnails=thumbnails)
    return table


def read_identity(crops_dir: str | os.PathLike) -> dict:
    """The identity summary a crop run wrote ({} for a crop folder from before it existed)."""
    path = Path(crops_dir) / IDENTITY_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
