"""The demo roster's inputs, built on first use with no download: `photos` (raw photos derived from photos
that ship inside installed packages), `tinymodel` (a tiny SD1.5-shaped model for tests) and `taught` (that tiny
model taught a few drawn concepts: the demo's base model, on which training can be seen to learn).
"""
