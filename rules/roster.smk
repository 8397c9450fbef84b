rule roster_check:
    """Fails naming every bad roster row (the good rows' subjects still run)."""
    input:
        config["roster"],
    output:
        "results/summary/roster_check.txt",
    log:
        "logs/roster_check/roster_check.log",
    conda:
        "../envs/tifactory.yaml"
    params:
        problems=ROSTER_PROBLEMS,
        subjects=SUBJECTS,
    script:
        "../workflow/scripts/roster_check.py"
