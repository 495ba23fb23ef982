"""What every command writes into its output folder: ``config.yaml`` and a log file.

``config.yaml`` holds the cryoscape version, the command, and every argument, so a run can be
understood (and its model rebuilt) from its folder alone.  The log mirrors what the command
printed, with timestamps.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from cryoscape.io.writers import atomic_write

__all__ = ["prepare_run_folder", "write_config", "attach_log_file", "detach_log_file"]


def _plain(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def write_config(out_dir: str | os.PathLike, command: str, arguments: dict[str, Any], **extra: Any) -> Path:
    """Write ``out_dir/config.yaml`` (atomically) and return its path."""
    from cryoscape import __version__

    path = Path(out_dir) / "config.yaml"
    content = {
        "cryoscape_version": __version__,
        "command": command,
        "argv": sys.argv,
        "arguments": _plain({k: v for k, v in arguments.items() if not k.startswith("_")}),
        **_plain(extra),
    }
    with atomic_write(path, "w") as f:
        yaml.safe_dump(content, f, sort_keys=False)
    return path


def attach_log_file(path: str | os.PathLike, *, logger_name: str = "cryoscape") -> logging.Handler:
    """Send the package's log records (INFO and up) to ``path`` and to stderr; returns the handler."""
    logger = logging.getLogger(logger_name)
    logger.setLevel(logging.INFO)
    handler = logging.FileHandler(path, mode="a")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    if not any(isinstance(h, _Console) for h in logger.handlers):
        console = _Console()
        console.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(console)
    return handler


class _Console(logging.StreamHandler):
    """A handler writing to ``sys.stderr`` as it is when a record arrives: test runners and
    notebooks swap (and close) the stream between commands run in one process, and a handler
    bound to the first stream would then fail with "I/O operation on closed file"."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ and setStream assign it; the property wins
        pass


def detach_log_file(handler: logging.Handler, *, logger_name: str = "cryoscape") -> None:
    """Undo :func:`attach_log_file` (tests and notebooks run several commands in one process)."""
    logger = logging.getLogger(logger_name)
    logger.removeHandler(handler)
    handler.close()


def prepare_run_folder(out_dir: str | os.PathLike, command: str, arguments: dict[str, Any]) -> tuple[Path, logging.Handler]:
    """Create ``out_dir``, write its config.yaml, and attach ``out_dir/run.log``.

    An existing *file* named as the output folder is refused with one sentence (not a traceback).
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        from cryoscape.errors import InputError

        raise InputError(f"-o {out} is an existing file, not a folder; pass a new folder name for the outputs.")
    out.mkdir(parents=True, exist_ok=True)
    write_config(out, command, arguments)
    return out, attach_log_file(out / "run.log")
