"""Contact sheet: every kept crop, then every rejected photo as a thumbnail labelled with its reason."""

from __future__ import annotations

import os
import textwrap
import re
from pathlib import Path

from tifactory.fileio import atomic_path

_TILE = 160
_LABEL_LINES = 4
_LINE_PX = 12
_COLUMNS = 8
_MAX_TILES = 600
_GAP = 6



# a path without spaces inside a reason, of a file the manifest does not list: cut to its file name
_PATH_IN_TEXT = re.compile(r"(?:[A-Za-z]:)?(?:[^\s\\/]*[\\/])+([^\s\\/]+)")


def short_reason(reason: str, sources=()) -> str:
    """A reason with each file path cut to its file name ("duplicate of /home/me/Eva Green/IMG_42.jpg" ->
    "duplicate of IMG_42.jpg"): a tile's label has room for a few words. `sources`: the manifest's source paths
    (they may hold spaces), replaced first."""
    for source in sorted((s for s in sources if s and s in reason), key=len, reverse=True):
        reason = reason.replace(source, re.split(r"[\\/]", source.rstrip("\\/"))[-1])
    return _PATH_IN_TEXT.sub(lambda match: match.group(1), reason)


def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def _thumbnail(path: str, tile: int):
    """An upright thumbnail of a photo, or None when it cannot be decoded."""
    from tifactory.photos.imageio import open_upright

    if not os.path.isfile(path):  # a folder, a broken link, a FIFO (opening one would block forever)
        return None
    try:
        image, _ = open_upright(path, min_long_side=tile * 2, max_pixels=200_000_000)
    except Exception:  # noqa: BLE001 - the reason is already in the manifest
        return None
    image.thumbnail((tile, tile))
    return image


def _label(text: str, width_chars: int) -> list[str]:
    lines = textwrap.wrap(text, width=width_chars, break_long_words=True) or [""]
    if len(lines) > _LABEL_LINES:
        lines = lines[: _LABEL_LINES - 1] + [lines[_LABEL_LINES - 1][: width_chars - 3] + "..."]
    return lines


def crop_thumbnail(crop, tile: int = _TILE):
    """The contact sheet's tile of a crop (a PIL image), so the crop stage can hand it over in memory."""
    thumb = crop.convert("RGB") if crop.mode != "RGB" else crop.copy()
    thumb.thumbnail((tile, tile))
    return thumb


def make_contact_sheet(manifest, crops_dir: str | os.PathLike, out_path: str | os.PathLike, *,
                       files: dict[str, str] | None = None, tile: int = _TILE,
                       thumbnails: dict[str, object] | None = None) -> Path:
    """Draw the crop manifest (a DataFrame) as one PNG: a "kept" grid of crops, then a "rejected" grid of
    source thumbnails with the reason under each (at most 600 tiles; the rest are counted).

    `thumbnails`: output name -> tile image of kept crops already in memory (others are read from
    crops_dir)."""
    from PIL import Image, ImageDraw

    files = files or {}
    thumbnails = thumbnails or {}
    records = manifest.to_dict("records")
    kept = [r for r in records if r["status"] == "kept"]
    rejected = [r for r in records if r["status"] != "kept"]
    sources = {str(r["source"]) for r in records}  # reasons name other photos by these paths
    shown_kept, shown_rejected = kept[:_MAX_TILES], rejected[: max(0, _MAX_TILES - len(kept))]
    label_h = _LABEL_LINES * _LINE_PX + 4
    cell_w, cell_h = tile + _GAP, tile + label_h + _GAP
    header_h = 22
    columns = _COLUMNS
    rows_kept = -(-len(shown_kept) // columns)
    rows_rej = -(-len(shown_rejected) // columns)
    width = columns * cell_w + _GAP
    height = 2 * header_h + (rows_kept + rows_rej) * cell_h + 3 * _GAP + header_h
    sheet = Image.new("RGB", (width, height), (32, 32, 32))
    draw = ImageDraw.Draw(sheet)
    font = _font()
    chars = max(8, tile // 6)
    y = _GAP
    sections = [(f"kept: {len(kept)}", shown_kept, True), (f"rejected: {len(rejected)}", shown_rejected, False)]
    for title, items, is_kept in sections:
        draw.text((_GAP, y + 4), title, fill=(255, 255, 255), font=font)
        y += header_h
        for i, record in enumerate(items):
            cx = _GAP + (i % columns) * cell_w
            cy = y + (i // columns) * cell_h
            if is_kept:
                thumb = thumbnails.get(str(record["output"]))
                if thumb is None or max(thumb.size) != tile:
                    try:
                        with Image.open(Path(crops_dir) / str(record["output"])) as crop:
                            thumb = crop_thumbnail(crop, tile)
                    except Exception:  # noqa: BLE001
                        thumb = None
                text = str(record["output"])
                if record.get("reason"):
                    text += " " + short_reason(str(record["reason"]), sources)
                colour = (150, 230, 150)
            else:
                source = str(record["source"])
                thumb = _thumbnail(files.get(source, source), tile)
                text = short_reason(str(record["reason"]), sources)
                colour = (255, 140, 120)
            if thumb is None:
                draw.rectangle((cx, cy, cx + tile - 1, cy + tile - 1), fill=(70, 70, 70))
                draw.text((cx + 4, cy + tile // 2 - 6), "(no image)", fill=(200, 200, 200), font=font)
            else:
                sheet.paste(thumb, (cx + (tile - thumb.width) // 2, cy + (tile - thumb.height) // 2))
            for n, line in enumerate(_label(f"{Path(str(record['source'])).name}: {text}" if not is_kept else text,
                                            chars)):
                draw.text((cx, cy + tile + 2 + n * _LINE_PX), line, fill=colour, font=font)
        y += -(-len(items) // columns) * cell_h + _GAP
    hidden = len(kept) + len(rejected) - len(shown_kept) - len(shown_rejected)
    if hidden:
        draw.text((_GAP, y + 4), f"... and {hidden} more (see manifest.tsv)", fill=(255, 255, 255), font=font)
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp_path:
        sheet.save(tmp_path, format="PNG", compress_level=1)
    return out_path
