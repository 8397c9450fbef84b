"""tifactory: roster + raw photos -> Stable Diffusion 1.5 textual-inversion embeddings.

All logic lives in this package, one module per stage; the Snakemake rules are thin adapters.
Importing the package is cheap (no torch): heavy imports happen inside the stage functions.
"""

__version__ = "0.1.0"
