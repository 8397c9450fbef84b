rule roster_check:
    input:
        config["roster"],
    output:
        "results/summary/roster_check.txt",
    params:
        problems=ROSTER_PROBLEMS,
        subjects=SUBJECTS,
    conda:
        "../envs/tifactory.yaml"
    log:
        "logs/roster_check/roster_check.log",
    script:
        "../workflow/scripts/roster_check.py"
