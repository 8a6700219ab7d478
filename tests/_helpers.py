"""Helpers shared by the run-folder and CLI tests."""

import os


class ShellCommand:
    """A pickle that runs a shell command when it is loaded: what a crafted checkpoint would carry."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)
