"""Time what the samples stage writes after its last batch: the grid PNG (composed by the real
`compose_grid`), its JPEG preview and the cell PNGs, with the stage's `save_png` (zlib level 1, default
strategy) against zlib level 1 with the run-length strategy (Z_RLE, Pillow's `compress_type=3`), which was
faster on smooth synthetic images. Cells are real photos shipped in packages (scikit-image's astronaut,
insightface's t1), so the compression sees photo content.

    python bench/bench_grid_write.py --cell 512 --repeats 3     # SD1.5's grid: 6 rows x 4 columns of 512 px
    python bench/bench_grid_write.py --cell 1024 --repeats 3    # SDXL's

Prints JSON: seconds per file kind and strategy (the median of the repeats), sizes, and that every PNG decodes
to the pixels it was given.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def photo_cells(size: int, count: int) -> list:
    """`count` size x size crops of the packaged photos, shifted so that no two are alike."""
    import numpy as np
    from PIL import Image

    from tifactory.demo.photos import package_file

    sources = [Image.open(package_file(package, relative)).convert("RGB") for package, relative in
               (("skimage", "data/astronaut.png"), ("insightface", "data/images/t1.jpg"))]
    cells = []
    for index in range(count):
        source = sources[index % len(sources)]
        side = min(source.size)
        shift = (index * 7) % max(1, max(source.size) - side)
        box = (shift, 0, shift + side, side) if source.width > source.height else (0, shift, side, shift + side)
        cells.append(source.crop(box).resize((size, size), Image.Resampling.BICUBIC))
        assert np.asarray(cells[-1]).shape == (size, size, 3)
    return cells


def timed(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    import numpy as np
    from PIL import Image

    from tifactory.sampling.samples import compose_grid, save_png, write_preview

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cell", type=int, default=512)
    parser.add_argument("--rows", type=int, default=6)
    parser.add_argument("--columns", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    cells = photo_cells(args.cell, args.rows * args.columns)
    rows = [(f"step {row * 200}", cells[row * args.columns:(row + 1) * args.columns]) for row in range(args.rows)]
    grid = compose_grid(rows, [f"seed {column} · a photo of evagreen-ti" for column in range(args.columns)],
                        title="evagreen on a model · ddim")
    folder = Path(tempfile.mkdtemp(prefix="gridwrite"))

    def level1_rle(image, path):
        image.save(path, format="PNG", compress_level=1, compress_type=3)

    report = {"cell": args.cell, "grid_px": list(grid.size), "cells": len(cells), "repeats": args.repeats}
    for name, writer in (("save_png", save_png), ("level1_rle", level1_rle)):
        grid_path = folder / f"grid-{name}.png"
        report[f"grid_s_{name}"] = round(timed(lambda: writer(grid, grid_path), args.repeats), 3)
        report[f"grid_mb_{name}"] = round(grid_path.stat().st_size / 1e6, 2)
        report[f"cells_s_{name}"] = round(timed(lambda: [writer(cell, folder / f"c{i}-{name}.png")
                                                         for i, cell in enumerate(cells)], args.repeats), 3)
        report[f"lossless_{name}"] = bool(np.array_equal(np.asarray(Image.open(grid_path)), np.asarray(grid)))
    report["preview_s"] = round(timed(lambda: write_preview(grid, folder / "preview.jpg"), args.repeats), 3)
    report["grid_time_ratio_rle_to_save_png"] = round(report["grid_s_level1_rle"] / report["grid_s_save_png"], 2)
    report["grid_size_ratio_rle_to_save_png"] = round(report["grid_mb_level1_rle"] / report["grid_mb_save_png"], 2)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
