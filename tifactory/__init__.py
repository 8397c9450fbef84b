"""tifactory: roster + raw photos -> Stable Diffusion 1.5 textual-inversion embeddings.

All logic lives in this package, laid out by stage: `photos/` (sources, collect, crop, dataset), `faces/`
(detection, recognition), `training/` (models, the loop, the embedding format), `sampling/` (grids,
likeness, plots) and `demo/`; the workflow plumbing (roster, jobs, provenance, GPU slots, device choice,
file helpers, report, and `errors`: TifactoryError, the base of every error a user can act on) sits at
this level. The Snakemake rules are thin adapters.
Importing the package is cheap (no torch): heavy imports happen inside the stage functions.
"""

__version__ = "0.1.0"

from pathlib import Path

# The checkout this package runs from (requirements.txt installs it editable): shipped resources/ and
# workflow/schemas/ are found from here, whatever stage module asks.
REPO_ROOT = Path(__file__).resolve().parent.parent
