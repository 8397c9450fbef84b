#!/usr/bin/env python
"""Regenerate resources/sd15/tokenizer/ (the exact CLIP ViT-L/14 tokenizer SD1.5 uses).

Source: the BPE merges file OpenAI published with CLIP (MIT licence), as open-clip-torch's wheel carries
it (`open_clip/bpe_simple_vocab_16e6.txt.gz`). Only that one file is read out of the wheel; open-clip-torch
is never installed (it would pull torchvision).

    python resources/sd15/make_tokenizer.py                    # pip download --no-deps open-clip-torch==3.3.0
    python resources/sd15/make_tokenizer.py --wheel open_clip_torch-3.3.0-py3-none-any.whl
    python resources/sd15/make_tokenizer.py --check            # regenerate into a temp dir and compare

The encoder is built as CLIP's tokenizer builds it (tifactory.training.sd15.clip_vocab): the 256 byte symbols,
their `</w>` word-final variants, the first 48,894 merges joined, then <|startoftext|> and <|endoftext|>:
49,408 tokens. The source's sha256 and the resulting merges.txt's sha256 are pinned in tifactory/training/sd15.py.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from tifactory.training import sd15  # noqa: E402

WHEEL_REQUIREMENT = "open-clip-torch==3.3.0"


def fetch_wheel(folder: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    WHEEL_REQUIREMENT, "-d", str(folder)], check=True)
    wheels = sorted(folder.glob("open_clip_torch-*.whl"))
    if not wheels:
        raise SystemExit(f"pip download left no open_clip_torch wheel in {folder}")
    return wheels[0]


def read_source(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(sd15.SOURCE_MEMBER)


def write_tokenizer(files: dict[str, str], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (out_dir / name).write_text(text, encoding="utf-8", newline="\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", type=Path, help="an open_clip_torch wheel already downloaded")
    parser.add_argument("--out", type=Path, default=HERE / "tokenizer", help="output folder")
    parser.add_argument("--check", action="store_true", help="compare with --out instead of writing it")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as temp:
        wheel = args.wheel or fetch_wheel(Path(temp))
        files = sd15.tokenizer_files(read_source(wheel))
    merges_sha = hashlib.sha256(files["merges.txt"].encode("utf-8")).hexdigest()
    if merges_sha != sd15.MERGES_SHA256:
        print(f"warning: merges.txt sha256 {merges_sha} differs from the pinned {sd15.MERGES_SHA256}")
    if args.check:
        differing = [name for name, text in files.items()
                     if not (args.out / name).is_file() or (args.out / name).read_text(encoding="utf-8") != text]
        print("tokenizer files differ: " + ", ".join(differing) if differing else f"{args.out} is up to date")
        return 1 if differing else 0
    write_tokenizer(files, args.out)
    print(f"wrote {', '.join(sorted(files))} to {args.out} (merges.txt sha256 {merges_sha})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
