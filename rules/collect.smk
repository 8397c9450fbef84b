rule collect:
    """Every source item of one subject decoded and checked: kept or rejected with the reason."""
    input:
        collect_inputs,
    output:
        "results/{subject}/raw/manifest.tsv",
    log:
        "logs/collect/{subject}.log",
    conda:
        "../envs/tifactory.yaml"
    threads: 2
    params:
        sources=lambda wildcards: split_sources(ROSTER[wildcards.subject]["sources"]),
        collect=collect_params,
        network_keys=COLLECT_NETWORK_KEYS,
    # one short line on the console instead of Snakemake's job info, which lists every photo file (input)
    message:
        "collect {wildcards.subject}: the photos its roster sources name -> {output} (log: {log})"
    script:
        "../workflow/scripts/collect.py"
