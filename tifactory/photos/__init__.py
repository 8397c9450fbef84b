"""Stages 1-3, photos to a kohya dataset: `sources` (what a roster source holds: photo folders, globs, URL
lists, prepared kohya datasets; one listing for the DAG and the jobs), `collect` (decode, normalise, dedupe;
`imageio` decodes every photo, `fetch` downloads URL lists), `crop` (face-centred squares, over `tifactory.faces`)
with its `contact_sheet`, `prepared` (prepared datasets used as they are) and `dataset` (the kohya layout).
"""
