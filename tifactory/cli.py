"""The `tifactory` console command (installed by `pip install -r requirements.txt`, which installs this
checkout): helpers around the Snakemake workflow. `tifactory --help` lists them."""

from __future__ import annotations

import argparse
import sys
import time


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


def _roster(args) -> int:
    from tifactory.fileio import write_text_atomic
    from tifactory.roster_folders import roster_from_folders

    started = time.perf_counter()
    try:
        result = roster_from_folders(args.data_dir, args.class_word)
    except (ValueError, OSError) as error:
        print(f"tifactory roster: {error}", file=sys.stderr)
        return 2
    _print_folder_report(result)
    if not result.rows:
        print(f"tifactory roster: no usable subfolder in {args.data_dir}; nothing written", file=sys.stderr)
        return 1
    if args.output == "-":
        sys.stdout.write(result.tsv())
    else:
        write_text_atomic(args.output, result.tsv())
    prepared = sum(row["prepared"] == "yes" for row in result.rows)
    print(f"{'stdout' if args.output == '-' else args.output}: {len(result.rows)} subject(s) ({prepared} prepared "
          f"dataset(s), {len(result.rows) - prepared} photo folder(s)); {len(result.renamed)} renamed, "
          f"{len(result.clashes)} clashes, {len(result.skipped)} skipped; {time.perf_counter() - started:.2f} s",
          file=sys.stderr)
    return 0


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
