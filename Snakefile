# tifactory: roster + raw photos -> SD1.5 textual-inversion embeddings.
# Run the demo roster:   snakemake --cores 1 --resources gpu=1
# One subject:           snakemake --cores 1 --resources gpu=1 results/astronaut/astronaut-ti.safetensors
import sys

from snakemake.utils import min_version, validate

min_version("9.0")

# The tifactory package beside this Snakefile wins at parse time; jobs import the installed one
# (requirements.txt installs this checkout in editable mode).
sys.path.insert(0, workflow.basedir)


configfile: "config.yaml"


validate(config, schema="workflow/schemas/config.schema.yaml")


report: "workflow/report/workflow.rst"


include: "rules/common.smk"
include: "rules/roster.smk"
include: "rules/demo.smk"
include: "rules/collect.smk"
include: "rules/crop.smk"
include: "rules/prepared.smk"
include: "rules/dataset.smk"
include: "rules/train.smk"
include: "rules/samples_functions.smk"
include: "rules/samples.smk"
include: "rules/report.smk"
include: "rules/publish.smk"


# small roster-wide and per-subject bookkeeping jobs run on the submitting host under a cluster executor
# (each would otherwise be a queued job that re-parses the Snakefile)
localrules:
    all,
    roster_check,
    crop_summary,
    roster_overview,
    best_embedding,
    loss_plot,


rule all:
    input:
        all_targets(),
    default_target: True
