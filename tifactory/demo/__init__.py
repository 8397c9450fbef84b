"""The demo roster's inputs, built on first use with no download: `photos` (raw photos derived from photos
that ship inside installed packages) and `tinymodel` (a tiny SD1.5-shaped model for demos and tests).
"""
