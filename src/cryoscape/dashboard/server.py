"""Starting the dashboard's web server: address, port, token (like Jupyter's), in the foreground or a thread."""

from __future__ import annotations

import ipaddress
import logging
import re
import secrets
import threading
from dataclasses import dataclass
from typing import Any

from cryoscape.dashboard.app import create_app
from cryoscape.dashboard.session import DashboardSession
from cryoscape.errors import InputError

__all__ = ["DashboardServer", "start_server", "serve", "is_loopback"]

log = logging.getLogger(__name__)
_TOKEN_IN_QUERY = re.compile(r"(token=)[^&\s]+")


def redact_token(text: str) -> str:
    """``text`` with the value of every ``token=`` query parameter replaced by ``***`` (request logs)."""
    return _TOKEN_IN_QUERY.sub(r"\1***", text)


def _request_handler():
    """werkzeug's request handler with the token redacted from the logged request line (the first
    request of a browser carries it in the address)."""
    from werkzeug.serving import WSGIRequestHandler

    class RedactingRequestHandler(WSGIRequestHandler):
        def log(self, type: str, message: str, *args: Any) -> None:
            super().log(type, message, *(redact_token(a) if isinstance(a, str) else a for a in args))

    return RedactingRequestHandler


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is this machine's loopback interface only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class DashboardServer:
    """A running dashboard: its address, token and the werkzeug server (``shutdown()`` stops it)."""

    url: str
    token: str | None
    server: Any
    thread: threading.Thread | None = None

    def shutdown(self) -> None:
        """Stop serving and wait for the thread."""
        self.server.shutdown()
        if self.thread is not None:
            self.thread.join(timeout=10)

    @property
    def url_with_token(self) -> str:
        """The address to open (with ``?token=`` when one is needed)."""
        return f"{self.url}/?token={self.token}" if self.token else f"{self.url}/"


def start_server(session: DashboardSession, *, host: str = "127.0.0.1", port: int = 8050, token: str | None = None,
                 background: bool = False) -> DashboardServer:
    """Serve ``session`` at ``host:port`` (port 0: any free one).

    Any address but the loopback requires a token: ``token`` or a fresh random one (printed with the
    address).  ``background``: serve from a daemon thread and return at once (tests, notebooks);
    otherwise the caller runs ``server.serve_forever()``.
    """
    from werkzeug.serving import make_server

    if not is_loopback(host) and not token:
        token = secrets.token_urlsafe(24)
    if token is not None and len(token) < 8:
        raise InputError("--token must be at least 8 characters long; leave it out to get a random one.")
    app = create_app(session, token=token)
    try:
        server = make_server(host, port, app, threaded=True, request_handler=_request_handler())
    except OSError as err:
        raise InputError(f"cannot listen on {host}:{port} ({err.strerror}); pass another --port (0: any free one).") \
            from None
    shown = f"[{host}]" if ":" in host else host
    result = DashboardServer(url=f"http://{shown}:{server.server_port}", token=token, server=server)
    if background:
        result.thread = threading.Thread(target=server.serve_forever, name="cryoscape-dashboard", daemon=True)
        result.thread.start()
    return result


def serve(run_dir, *, host: str = "127.0.0.1", port: int = 8050, token: str | None = None, **options: Any) -> None:
    """``cryoscape dashboard``: open the run (``options``: :class:`DashboardOptions` fields), print the address, serve
    until Ctrl-C."""
    from cryoscape.dashboard.session import DashboardOptions

    session = DashboardSession(run_dir, DashboardOptions(**options))
    summary = session.summary()
    running = start_server(session, host=host, port=port, token=token)
    print(f"cryoscape dashboard: {summary['n_particles']} particles of {session.run} (zdim {summary['zdim']}"
          f"{', maps by ' + summary['decoder'] if summary['maps'] else ', no maps: ' + str(summary['maps_unavailable'])})")
    shown = running.url_with_token
    if host in ("0.0.0.0", "::"):  # every interface: name the machine
        import socket

        shown = shown.replace(host if host == "0.0.0.0" else "[::]", socket.gethostname(), 1)
    print(f"open {shown}")
    if is_loopback(host):
        print(f"from another machine: ssh -N -L {running.server.server_port}:127.0.0.1:{running.server.server_port} "
              f"THIS_HOST, then open http://127.0.0.1:{running.server.server_port}/")
    else:
        print("anyone who can reach this address needs the token; prefer an SSH tunnel to 127.0.0.1")
    print("Ctrl-C stops the server", flush=True)
    try:
        running.server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        running.server.server_close()
