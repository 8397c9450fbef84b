"""The `tifactory` console command (installed by `pip install -r requirements.txt`, which installs this
checkout): helpers around the Snakemake workflow. `tifactory --help` lists them."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


SHOWN_RENAMES = 5  # renamed folders listed on stderr; the rest are counted (their names are in the roster)


def _print_folder_report(result) -> None:
    """Clashes and skipped folders each on a line (they need a look); renamed folders summarised."""
    lines = result.report_lines()
    renamed = [line for line in lines if line.startswith("renamed:")]
    for line in renamed[:SHOWN_RENAMES]:
        print(line, file=sys.stderr)
    if len(renamed) > SHOWN_RENAMES:
        print(f"renamed: ... and {len(renamed) - SHOWN_RENAMES} more folder(s) (the roster's sources column names "
              "each folder)", file=sys.stderr)
    for line in lines:
        if not line.startswith("renamed:"):
            print(line, file=sys.stderr)


def _folder_roster(args, command: str, empty: str):
    """The roster of DATA_DIR's subfolders (tifactory.roster_folders), its report on stderr; or the exit code
    when there is none: 2 for an unreadable folder, 1 for no usable subfolder."""
    from tifactory.roster_folders import roster_from_folders

    try:
        result = roster_from_folders(args.data_dir, args.class_word)
    except (ValueError, OSError) as error:
        print(f"tifactory {command}: {error}", file=sys.stderr)
        return 2
    _print_folder_report(result)
    if not result.rows:
        print(f"tifactory {command}: no usable subfolder in {args.data_dir}; {empty}", file=sys.stderr)
        return 1
    return result


def _roster(args) -> int:
    from tifactory.fileio import write_text_atomic

    started = time.perf_counter()
    if args.output != "-" and os.path.isdir(args.output):
        print(f"tifactory roster: -o {args.output} is a folder; name the roster file to write", file=sys.stderr)
        return 2
    result = _folder_roster(args, "roster", "nothing written")
    if isinstance(result, int):
        return result
    if args.output == "-":
        sys.stdout.write(result.tsv())
    else:
        try:
            write_text_atomic(args.output, result.tsv())
        except OSError as error:
            print(f"tifactory roster: cannot write {args.output}: {error.strerror or error}", file=sys.stderr)
            return 2
    prepared = sum(row["prepared"] == "yes" for row in result.rows)
    print(f"{'stdout' if args.output == '-' else args.output}: {len(result.rows)} subject(s) ({prepared} prepared "
          f"dataset(s), {len(result.rows) - prepared} photo folder(s)); {len(result.renamed)} renamed, "
          f"{len(result.clashes)} clashes, {len(result.skipped)} skipped; {time.perf_counter() - started:.2f} s",
          file=sys.stderr)
    return 0


# --- `tifactory run`: a folder of people -> embeddings in the UI's folder, in one command ----------------------

CHECKOUT = Path(__file__).resolve().parent.parent  # the Snakefile beside the tifactory package


def run_snakemake_command(args, roster: Path, out: Path) -> list[str]:
    """The plain Snakemake command `tifactory run` runs (printed first, so Snakemake users can take it over)."""
    config = [f"roster={roster}", f"base_model={Path(args.model).expanduser().resolve()}"]
    if args.publish:
        config.append(f"publish_dir={Path(args.publish).expanduser().resolve()}")
    # cores and GPUs: the workflow's profile (profiles/default) unless given
    limits = ([f"--cores={args.cores}"] if args.cores else []) + ([f"--resources=gpu={args.gpus}"] if args.gpus else [])
    return [sys.executable, "-m", "snakemake", "-s", str(CHECKOUT / "Snakefile"), "--directory", str(out), *limits,
            "--config", *config, *args.snakemake_args]


def ui_lines(out: Path, subjects: list[str], publish: str | None) -> list[str]:
    """Where each subject's embeddings are, and what to type in each UI (the file name is the trigger)."""
    lines = []
    for subject in subjects:
        files = [out / "results" / subject / f"{subject}-ti{suffix}.safetensors" for suffix in ("", "-best")]
        files = [path for path in files if path.is_file()]
        if not files:
            lines.append(f"  {subject}: no embedding (see the summary above)")
            continue
        shown = [Path(publish) / path.name if publish else path for path in files]
        lines.append(f"  {subject}: {', '.join(map(str, shown))}")
        for path in files:
            lines.append(f"      A1111/Forge: photo of {path.stem}    ComfyUI: photo of embedding:{path.stem}")
    return lines


def _run(args) -> int:
    import subprocess

    from tifactory.fileio import write_text_atomic

    model = Path(args.model).expanduser()
    if not model.exists():
        print(f"tifactory run: --model {args.model}: not found (an SD1.5 or SDXL checkpoint, e.g. "
              "v1-5-pruned-emaonly.safetensors)", file=sys.stderr)
        return 2
    out = Path(args.out).expanduser().resolve()
    result = _folder_roster(args, "run", "nothing to train")
    if isinstance(result, int):
        return result
    out.mkdir(parents=True, exist_ok=True)
    roster = out / "roster.tsv"
    write_text_atomic(roster, result.tsv())
    subjects = [row["subject"] for row in result.rows]
    print(f"tifactory run: {len(subjects)} subject(s) -> {roster}; results in {out / 'results'}", file=sys.stderr)
    command = run_snakemake_command(args, roster, out)
    import shlex

    print("tifactory run: snakemake " + shlex.join(command[3:]), file=sys.stderr)  # the plain command, for later runs
    code = subprocess.call(command)
    print("\nEmbeddings, and the prompt to type (the file name is the trigger):", file=sys.stderr)
    for line in ui_lines(out, subjects, args.publish):
        print(line, file=sys.stderr)
    return code


def build_parser() -> argparse.ArgumentParser:
    from tifactory.roster import roster_schema

    class_words = roster_schema()["properties"]["class_word"]["enum"]
    parser = argparse.ArgumentParser(
        prog="tifactory",
        description="tifactory: roster + photos -> SD1.5 textual-inversion embeddings. The pipeline itself runs "
                    "with `snakemake --cores N --resources gpu=G` in the checkout (see README.md).")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    roster = commands.add_parser(
        "roster", help="write a roster with one row per subfolder of DATA_DIR",
        description="One roster row per subfolder of DATA_DIR: subject = the folder name made to fit "
                    "[a-z0-9][a-z0-9_-]* (renamed, clashing and skipped folders are reported on stderr); "
                    "class word from a kohya folder name (`100_name woman`) when there is one, else --class; "
                    "prepared kohya datasets become `prepared: yes` rows (used without re-cropping).")
    roster.add_argument("data_dir", metavar="DATA_DIR", help="folder holding one folder per subject")
    roster.add_argument("--class", dest="class_word", choices=class_words,
                        help="class word of folders whose name does not give one (without it they are skipped)")
    roster.add_argument("-o", "--output", default="-", help="roster TSV to write (default: stdout)")
    roster.set_defaults(handler=_roster)

    run = commands.add_parser(
        "run", help="DATA_DIR (one folder per person) + an SD1.5 checkpoint -> embeddings, in one command",
        description="Writes OUT/roster.tsv from DATA_DIR's subfolders (as `tifactory roster`), runs the Snakemake "
                    "workflow of this checkout in OUT (its results/ and logs/ go there; the command is printed, "
                    "so later runs can use it directly), copies the embeddings to --publish, and ends with each "
                    "subject's files and the prompt to type in A1111/Forge and ComfyUI. Arguments after `--` go to "
                    "Snakemake (e.g. `-- -n` for a dry run).")
    run.add_argument("data_dir", metavar="DATA_DIR", help="folder holding one folder per person")
    run.add_argument("--model", required=True, metavar="FILE",
                     help="the SD1.5 checkpoint to train on, e.g. v1-5-pruned-emaonly.safetensors")
    run.add_argument("--publish", metavar="DIR", help="your UI's embeddings folder (A1111: "
                     "stable-diffusion-webui/embeddings, ComfyUI: ComfyUI/models/embeddings)")
    run.add_argument("--out", default=".", metavar="DIR", help="project folder for roster.tsv, results/ and logs/ "
                     "(default: the current folder)")
    run.add_argument("--class", dest="class_word", choices=class_words,
                     help="class word of folders whose name does not give one (without it they are skipped)")
    run.add_argument("--cores", type=int, help="CPU cores Snakemake may use (default: profiles/default)")
    run.add_argument("--gpus", type=int, help="GPU jobs that may run at once, one per GPU (default: profiles/default)")
    run.set_defaults(handler=_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []  # `tifactory run ... -- <Snakemake arguments>`
    args = build_parser().parse_args(argv[:len(argv) - len(extra) - (1 if "--" in argv else 0)])
    args.snakemake_args = extra
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
