"""Run folders' logging: one console handler per process, following sys.stderr as it changes."""

import io
import logging
import sys

from cryoscape.io.run_folder import attach_log_file, detach_log_file


def test_console_follows_the_current_stderr_after_the_first_is_closed(tmp_path, monkeypatch):
    log = logging.getLogger("cryoscape.test_run_folder")
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    handler = attach_log_file(tmp_path / "a.log")
    log.info("to the first")
    detach_log_file(handler)
    first.close()  # what a test runner does to a finished test's captured stream
    monkeypatch.setattr(sys, "stderr", second)
    errors = []
    monkeypatch.setattr(logging, "raiseExceptions", True)
    monkeypatch.setattr(logging.Handler, "handleError", lambda self, record: errors.append(record))
    handler = attach_log_file(tmp_path / "b.log")
    try:
        log.info("to the second")
    finally:
        detach_log_file(handler)
    assert errors == []  # a handler bound to the closed stream fails here
    assert "to the second" in second.getvalue()
    assert "to the second" in (tmp_path / "b.log").read_text()
    assert "to the second" not in (tmp_path / "a.log").read_text()
    consoles = [h for h in logging.getLogger("cryoscape").handlers if isinstance(h, logging.StreamHandler)
                and not isinstance(h, logging.FileHandler)]
    assert len(consoles) == 1  # attached once per process, however many commands ran
