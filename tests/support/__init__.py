"""Helpers shared by the tests of every stage (not test modules): photos, the bad-input corpus, SD1.5-shaped
checkpoints and the one Snakemake harness. tests/conftest.py puts tests/ on sys.path, so `support` imports from
any stage folder."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
