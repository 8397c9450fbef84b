"""Stage 5, judging the checkpoints: `samples` renders the grid (prompts parsed by `prompts`), `likeness` scores
each step's samples against the training faces (through `tifactory.faces`), `plots` draws the loss and likeness.
"""
