"""A pickle payload that runs a shell command when unpickled freely: the loaders and the DAG-time checks must
name it and never run it."""

from __future__ import annotations

import os


class Exploit:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))
