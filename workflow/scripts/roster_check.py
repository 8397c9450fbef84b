from tifactory.fileio import write_text_atomic
from tifactory.jobs import run_job
from tifactory.roster import RosterError


def main(smk, log):
    problems = list(smk.params.problems)
    if problems:
        raise RosterError(f"roster {smk.input[0]}: {len(problems)} bad row(s) left out of the run:\n  "
                          + "\n  ".join(problems))
    log(f"roster {smk.input[0]}: {len(smk.params.subjects)} subject(s), every row valid")
    write_text_atomic(smk.output[0], "".join(f"{subject}\n" for subject in smk.params.subjects))


run_job(snakemake, main)
