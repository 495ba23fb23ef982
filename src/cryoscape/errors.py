"""The one exception type for bad user input.

Every reader and command raises :class:`InputError` with a single sentence that names the
offending file and says what to do; the command-line entry point prints that sentence (no
traceback) and exits with status 2.
"""

from __future__ import annotations

import os


class InputError(ValueError):
    """Bad input from the user: a missing file, a wrong box size, mismatched counts, NaNs...

    Parameters
    ----------
    message
        One sentence saying what is wrong and how to fix it.
    path
        The file the problem is in, if any; it is named at the start of the message.
    """

    def __init__(self, message: str, *, path: str | os.PathLike | None = None):
        self.path = None if path is None else os.fspath(path)
        text = message if self.path is None or self.path in message else f"{self.path}: {message}"
        super().__init__(text)
