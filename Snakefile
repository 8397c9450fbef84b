# tifactory: roster + raw photos -> SD1.5 textual-inversion embeddings.
# Run the demo roster:   snakemake --cores 1 --resources gpu=1
# One subject:           snakemake --cores 1 --resources gpu=1 results/astronaut/astronaut-ti.safetensors
import os
import sys
import time

from snakemake.logging import logger
from snakemake.utils import min_version, validate

min_version("9.0")

# The tifactory package beside this Snakefile wins at parse time, and in the jobs: their scripts run in a new
# Python (in a conda env of envs/ too, which does not install tifactory) that inherits this PYTHONPATH.
sys.path.insert(0, workflow.basedir)
os.environ.update(
    PYTHONPATH=os.pathsep.join(
        [workflow.basedir] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
)


# Every default is in the config.yaml beside this Snakefile, so a project folder elsewhere
# (`snakemake -s <checkout>/Snakefile --directory <project>`) needs no copy of it. A config.yaml in the
# working directory, when there is one, overrides it key by key (it may hold only what it changes).
configfile: os.path.join(workflow.basedir, "config.yaml")


if os.path.isfile("config.yaml") and not os.path.samefile("config.yaml", os.path.join(workflow.basedir, "config.yaml")):

    configfile: "config.yaml"


# `--config 'train={max_train_steps: 5}'` hands nested values over as strings: read them as the schema's types
from tifactory.configuration import coerce_to_schema

coerce_to_schema(config)
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


# The end of a run in a few lines (tifactory.run_summary): subjects done, failed with their reasons, where
# the outputs are. Failures count from the job logs this run wrote, hence the start time.
RUN_STARTED = time.time()


onsuccess:
    logger.info(roster_run_summary(since=RUN_STARTED))


onerror:
    logger.error(roster_run_summary(since=RUN_STARTED))


rule all:
    """Every subject's embedding, grids, likeness, best step and report, plus the roster summaries."""
    default_target: True
    input:
        all_targets(),
    # Rules whose job info would list every photo or every subject's files print one line instead (`message:`),
    # always "<rule> <subject>|(roster): ... -> <outputs> (log: <log>)" (tests/workflow read dry runs so).
    message:
        f"all (roster): every target of {len(SUBJECTS)} subject(s)"
