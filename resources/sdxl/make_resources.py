#!/usr/bin/env python
"""Regenerate resources/sdxl/ (SDXL base's diffusers configs and its two CLIP tokenizers).

The configs are the dicts in tifactory/families/sdxl_resources.py. The tokenizers are built from the BPE
merges OpenAI published with CLIP (MIT licence), as open-clip-torch's wheel carries them
(`open_clip/bpe_simple_vocab_16e6.txt.gz`); only that file is read out of the wheel, and open-clip-torch
is never installed. tokenizer/ is CLIP-L's (as resources/sd15/tokenizer/); tokenizer_2/ has the same
vocabulary and merges and pads with "!".

    python resources/sdxl/make_resources.py                  # pip download --no-deps open-clip-torch==3.3.0
    python resources/sdxl/make_resources.py --wheel open_clip_torch-3.3.0-py3-none-any.whl
    python resources/sdxl/make_resources.py --check          # regenerate in memory and compare
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from tifactory.families import sdxl_resources  # noqa: E402
from tifactory.training import sd15  # noqa: E402

WHEEL_REQUIREMENT = "open-clip-torch==3.3.0"


def fetch_wheel(folder: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    WHEEL_REQUIREMENT, "-d", str(folder)], check=True)
    wheels = sorted(folder.glob("open_clip_torch-*.whl"))
    if not wheels:
        raise SystemExit(f"pip download left no open_clip_torch wheel in {folder}")
    return wheels[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", type=Path, help="an open_clip_torch wheel already downloaded")
    parser.add_argument("--out", type=Path, default=HERE, help="output folder")
    parser.add_argument("--check", action="store_true", help="compare with --out instead of writing it")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as temp:
        wheel = args.wheel or fetch_wheel(Path(temp))
        with zipfile.ZipFile(wheel) as archive:
            source = archive.read(sd15.SOURCE_MEMBER)
    files = sdxl_resources.resource_files(source)
    if args.check:
        differing = [name for name, text in files.items() if not (args.out / name).is_file()
                     or (args.out / name).read_text(encoding="utf-8") != text]
        print("files differ: " + ", ".join(differing) if differing else f"{args.out} is up to date")
        return 1 if differing else 0
    for name, text in files.items():
        path = args.out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8", newline="\n")
    print(f"wrote {len(files)} files to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
