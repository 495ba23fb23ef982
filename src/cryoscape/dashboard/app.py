"""The dashboard's web application (Flask): one page, a JSON API over a :class:`DashboardSession`, and files.

Security, for a server that may be reached through an SSH tunnel or on a shared machine
---------------------------------------------------------------------------------------------
* With a token (required by :func:`cryoscape.dashboard.server.serve` for any address but the loopback),
  every request must carry it: ``?token=`` once (the page then keeps it in a same-site, HTTP-only
  cookie) or the ``X-Cryoscape-Token`` header; it is compared in constant time.
* Without one (loopback only), the ``Host`` header must name the loopback, so a web page elsewhere
  cannot reach the server through DNS rebinding.
* Requests that change anything are ``POST`` with a JSON body, which a form on another site cannot send.
* ``/files/PATH`` serves only regular files inside the run folder, after resolving ``..`` and links.

Arrays travel as base64 of little-endian float32/int32 (``{"b64": ..., "dtype": ...}``): a
100,000-particle scatter is 1 MB instead of several MB of JSON numbers.
"""

from __future__ import annotations

import base64
import hmac
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np

from cryoscape.dashboard.session import DashboardSession
from cryoscape.errors import InputError

__all__ = ["create_app", "STATIC", "plotly_js_path"]

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
_LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


def _hostname(host: str) -> str:
    """``host[:port]`` or ``[v6]:port`` -> the name alone."""
    if host.startswith("["):
        return host[1 : host.find("]")]
    return host.rsplit(":", 1)[0]


def plotly_js_path() -> Path:
    """plotly.js as shipped inside the ``plotly`` Python package (no internet needed)."""
    import plotly

    path = Path(plotly.__file__).resolve().parent / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise InputError(f"plotly.js was not found at {path}; reinstall the plotly package (pip install plotly).")
    return path


def _packed(array: np.ndarray, dtype: str = "float32") -> dict[str, Any]:
    data = np.ascontiguousarray(np.asarray(array).astype("<f4" if dtype == "float32" else "<i4"))
    return {"b64": base64.b64encode(data.tobytes()).decode("ascii"), "dtype": dtype, "shape": list(data.shape)}


def _png(image: np.ndarray) -> str:
    from matplotlib.image import imsave

    buffer = io.BytesIO()
    imsave(buffer, np.clip(image, 0, 1)[::-1], format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _map_reply(volume: np.ndarray, level: float | None = None, **extra: Any) -> dict[str, Any]:
    """A map for the viewer: its isosurface mesh at ``level`` (default Otsu's) and its three central slices.

    The surface is triangulated here (marching cubes) rather than in the browser: plotly.js's own
    isosurface of a 64^3 grid takes seconds in a software-rendered browser, a mesh a fraction of one.
    """
    from cryoscape.report.mapviews import central_slices, isosurface_level

    level = isosurface_level(volume) if level is None else float(level)
    vertices, faces, step = _budget_mesh(volume, level)
    lo, hi = float(volume.min()), float(volume.max())
    return dict(box=int(volume.shape[0]), level=level, min=lo, max=hi, vertices=_packed(vertices),
                faces=_packed(faces, "int32"), mesh_step=step,
                slices=[_grey_png(s, lo, hi) for s in central_slices(volume)], **extra)


#: most triangles a map's surface is sent with: a software-rendered browser takes seconds to draw more,
#: and a surface that large is mostly noise, a map cut at the level of its noise (README, "Time to the
#: first map", has the figures)
MAX_TRIANGLES = 150_000


def _budget_mesh(volume: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Marching cubes at every voxel (every 2nd above 96^3), then on ever coarser grids (step 2, 4, ...,
    down to 8 samples a side) while the surface has more than :data:`MAX_TRIANGLES` triangles;
    ``(vertices, faces, step)``."""
    from cryoscape.report.mapviews import isosurface_mesh

    step = 1 if volume.shape[0] <= 96 else 2
    vertices, faces = isosurface_mesh(volume, level, step=step)
    while len(faces) > MAX_TRIANGLES and step < volume.shape[0] // 8:
        step *= 2
        vertices, faces = isosurface_mesh(volume, level, step=step)
    return vertices, faces, step


def _grey_png(plane: np.ndarray, lo: float, hi: float) -> str:
    """A slice as a grey PNG (white: dense), scaled to the map's range; an image draws faster than a heatmap."""
    scaled = np.clip((plane - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0)
    return _png(np.repeat(scaled[..., None], 3, axis=-1))


def create_app(session: DashboardSession, *, token: str | None = None):
    """The Flask application serving ``session`` (module docstring); ``token`` None: loopback only."""
    from flask import Flask

    app = Flask("cryoscape.dashboard", static_folder=str(STATIC), static_url_path="/static")
    _add_guards(app, token)
    _add_page_routes(app, session)
    _add_latent_routes(app, session)
    _add_map_routes(app, session)
    _add_path_routes(app, session)
    return app


def _json_body() -> dict[str, Any]:
    """The request's JSON object (415 for anything else: no form can post it from another site)."""
    from flask import abort, request

    if not request.is_json:
        abort(415)
    data = request.get_json(silent=True)
    if not isinstance(data, dict):
        raise InputError("the request body must be a JSON object.")
    return data


def _add_guards(app, token: str | None) -> None:
    """Token or loopback ``Host`` on every request; errors as JSON with one sentence."""
    from flask import abort, jsonify, request

    @app.before_request
    def _guard():
        if token is None:
            if _hostname(request.host or "") not in _LOOPBACK_HOSTS:
                abort(403)
            return None
        given = request.args.get("token") or request.headers.get("X-Cryoscape-Token") or \
            request.cookies.get("cryoscape_token") or ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            abort(403)
        return None

    @app.after_request
    def _remember_token(response):
        if token is not None and request.args.get("token") == token:
            response.set_cookie("cryoscape_token", token, httponly=True, samesite="Strict")
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    @app.errorhandler(InputError)
    def _input_error(err):
        return jsonify(error=str(err)), 400

    @app.errorhandler(PermissionError)
    def _permission_error(err):
        return jsonify(error=f"refused: {err}"), 403


def _add_page_routes(app, session: DashboardSession) -> None:
    """The page, plotly.js, the run's files (confined to its folder) and the training history."""
    from flask import abort, jsonify, send_file

    @app.get("/")
    def index():
        return send_file(STATIC / "index.html", mimetype="text/html", max_age=0)

    @app.get("/vendor/plotly.min.js")
    def plotly_js():
        return send_file(plotly_js_path(), mimetype="text/javascript", max_age=3600)

    @app.get("/api/summary")
    def summary():
        return jsonify(session.summary())

    @app.get("/api/history")
    def history():
        return jsonify(session.history())

    @app.get("/files/<path:relative>")
    def files(relative: str):
        try:
            target = session.confined(relative)
        except PermissionError:
            abort(403)
        except InputError:
            abort(404)
        return send_file(target, max_age=0)


def _add_latent_routes(app, session: DashboardSession) -> None:
    """Embeddings, colourings, selections and exports."""
    from flask import jsonify, request

    @app.get("/api/points")
    def points():
        name = request.args.get("embedding", "pc")
        xy = session.embedding(name)
        return jsonify(embedding=name, x=_packed(xy[:, 0]), y=_packed(xy[:, 1]))

    @app.get("/api/colour")
    def colour():
        c = session.colouring(request.args.get("spec", "none"))
        return jsonify(name=c.name, categorical=c.categorical,
                       values=_packed(c.values, "int32" if c.categorical else "float32"),
                       centres=None if c.centres is None else [int(i) for i in c.centres])

    @app.post("/api/select")
    def select():
        data = _json_body()
        positions = session.select(np.asarray(data.get("polygon"), dtype=np.float64), str(data.get("embedding", "pc")))
        return jsonify(count=int(positions.size), n_particles=len(session.z), positions=_packed(positions, "int32"))

    @app.post("/api/export")
    def export():
        data = _json_body()
        polygon = np.asarray(data.get("polygon"), dtype=np.float64)
        embedding = str(data.get("embedding", "pc"))
        positions = session.select(polygon, embedding)
        paths = session.export(positions, str(data.get("name", "")), str(data.get("format", "star")),
                               polygon=polygon, embedding=embedding)
        return jsonify(count=int(positions.size),
                       files={k: p.relative_to(session.run).as_posix() for k, p in paths.items()})


def _add_map_routes(app, session: DashboardSession) -> None:
    """A map at a particle or latent (at a given level), and the k-means centre maps as pictures."""
    from flask import jsonify, request

    @app.post("/api/map")
    def map_at():
        data = _json_body()
        latent = session.latent_of(data.get("index"), data.get("latent"), data.get("pc"))
        volume, seconds, cached = session.decode(latent)
        try:
            level = None if data.get("level") is None else float(data["level"])
        except (TypeError, ValueError):
            raise InputError("level must be a number.") from None
        return jsonify(_map_reply(volume, level, decode_seconds=seconds, cached=cached, index=data.get("index"),
                                  latent=[float(v) for v in latent]))

    @app.get("/api/centres")
    def centres():
        from cryoscape.report.mapviews import central_slices, isosurface_level, render_isosurface

        k = request.args.get("k", "5")
        k = int(k) if k.isdigit() else 0
        if not 1 <= k <= 50:
            raise InputError("k-means centre maps need k from 1 to 50.")
        indices, volumes = session.centre_maps(k)
        level = isosurface_level(np.stack(volumes))
        pictures = []
        for v in volumes:
            pictures.append(dict(surface=_png(render_isosurface(v, level)),
                                 slice=_grey_png(central_slices(v)[0], float(v.min()), float(v.max()))))
        return jsonify(k=k, indices=[int(i) for i in indices], level=level, pictures=pictures)


def _add_path_routes(app, session: DashboardSession) -> None:
    """traverse's graph path through anchors, and saving it as traverse does."""
    from flask import jsonify

    @app.post("/api/path")
    def path():
        data = _json_body()
        result = session.graph_path(list(data.get("anchors") or []), **_path_options(data))
        return jsonify(indices=result["indices"].tolist(), map_indices=result["map_indices"].tolist(),
                       length=result["length"])

    @app.post("/api/path/save")
    def save_path():
        data = _json_body()
        result = session.save_path(list(data.get("anchors") or []), str(data.get("name", "")), **_path_options(data))
        files = [p.relative_to(session.run).as_posix() for p in (result.maps.paths if result.maps else [])]
        return jsonify(folder=result.outdir.relative_to(session.run).as_posix(), maps=files,
                       report=result.report.relative_to(session.run).as_posix(),
                       map_indices=[int(i) for i in result.map_indices])


def _path_options(data: dict[str, Any]) -> dict[str, Any]:
    try:
        avg = float(data.get("avg_neighbors", 5.0))
        max_maps = data.get("max_maps", 20)
        max_maps = None if max_maps in (None, "", 0) else int(max_maps)
    except (TypeError, ValueError):
        raise InputError("avg_neighbors must be a number and max_maps a whole number.") from None
    return dict(avg_neighbors=avg, max_maps=max_maps)
