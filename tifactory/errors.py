"""The one base class of the errors a user can act on.

Each stage owns its own subclass (RosterError in roster, TrainingError in training.train, ...); the job
wrapper (tifactory.jobs) reports any TifactoryError as one line naming the problem, without a traceback,
and keeps the traceback of everything else (a bug). Subclasses also keep the builtin base they always had
(ValueError, RuntimeError) so existing `except ValueError` handlers still see them.

Parse-time cheap: no imports.
"""


class TifactoryError(Exception):
    """Bad input, a wrong setting or model, an unusable environment: the message tells the user what to fix."""
