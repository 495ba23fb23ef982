"""Training batches: preprocessed images, their transforms at the training pixels, poses and CTF.

What one batch holds (:class:`TrainingBatch`)
---------------------------------------------
* ``images``: ``(B, D, D)`` float32 real-space images after the preprocessing of
  :mod:`cryoscape.data.preprocess` (optional contrast inversion, ``(x - mean) / std`` with one
  global mean and standard deviation estimated on a random subset, soft circular window); the
  encoder reads these.
* ``values``: ``(B, P)`` complex Fourier coefficients of those images at the training pixels
  (:class:`FourierPixels`), divided by one global ``fourier_scale`` (the root mean square of
  the transform values over the circle ``|k| < D/2``, estimated on the same subset).  The shift
  is **not** undone here: the training step applies it (it may be refined by gradient descent).
* ``rotations`` ``(B, 3, 3)``, ``shifts_pixel`` ``(B, 2)`` (RELION sign, pixels) and ``ctf``
  ``(B, P)`` evaluated only at the training pixels (``None`` without CTF).

Training pixels
---------------
``domain="fourier"``: the half-plane ``kx > 0`` (plus ``kx = 0, ky >= 0``) inside the circle
``|k| < D/2``, the same set as Fourier backprojection.  A real map has a Hermitian transform, so
the other half of the circle carries no extra information; each pixel other than the origin
stands for itself and its Friedel mate (``weights`` 2, the origin 1).
``domain="hartley"``: the whole circle (Hartley values are real and not redundant in pairs), all
weights 1.  In both cases ``sum(weights * |X|^2)`` over the training pixels equals the sum of
``|X|^2`` over the whole circle, so the two domains optimise the same objective.

Coefficients come from one ``rfft2`` per batch of the images with their origin (index ``D//2``)
rolled to 0, gathered at the training pixels (pixels with ``kx < 0`` are the conjugates of
their mirror images in the ``rfft2`` half).

Loading
-------
:class:`ParticleDataset` reads images through :class:`cryoscape.data.images.ParticleImages`
(positional reads sorted by file offset, so any dataset size streams with bounded resident
memory; small sets are loaded once).  :func:`iterate_batches` walks an epoch's particle order in
batches, preparing the next batches in a background thread while the current one trains;
:func:`epoch_order` derives that order from ``(seed, epoch)`` only, so an interrupted and resumed
run sees the same batches.  For datasets read from disk two options make reading cheaper:
``shuffle_chunk`` (a chunked shuffle whose batches are read as a few sequential blocks, see
:func:`epoch_order`) and ``cache_dir`` (a float16 copy of the preprocessed images, written once,
see :func:`cryoscape.data.cache.open_training_cache`).  Neither changes which batches a run
without them sees.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

from cryoscape.data.images import ParticleImages
from cryoscape.data.preprocess import Preprocessor, soft_circular_window
from cryoscape.errors import InputError
from cryoscape.fourier.ctf import CTF_PARAMETER_NAMES, ctf_images_from_table
from cryoscape.fourier.grids import grid_2d_index

__all__ = [
    "FourierPixels",
    "fourier_pixels",
    "transform_at_pixels",
    "DataNormalization",
    "TrainingBatch",
    "ParticleDataset",
    "epoch_order",
    "iterate_batches",
    "CHUNK_WINDOW_BLOCKS",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# training pixels
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class FourierPixels:
    """The Fourier pixels of every image that enter training (see the module docstring).

    Attributes
    ----------
    box_size
        ``D``.
    domain
        ``"fourier"`` (half-plane) or ``"hartley"`` (whole circle).
    coords_index
        ``(P, 2)`` float32 ``(kx, ky)`` in index units (``k * D``).
    rfft_index
        ``(P,)`` int64 position of ``+k`` (or ``-k`` where ``conjugate``) in the flattened
        ``(D, D//2 + 1)`` ``rfft2`` output of an origin-first image.
    conjugate
        ``(P,)`` bool: the coefficient is the conjugate of the gathered one (``kx < 0``).
    weights
        ``(P,)`` float32: how many pixels of the full circle each training pixel stands for.
    n_circle
        Number of pixels in the circle ``|k| < D/2`` (``weights.sum()``).
    """

    box_size: int
    domain: str
    coords_index: torch.Tensor
    rfft_index: torch.Tensor
    conjugate: torch.Tensor
    weights: torch.Tensor
    n_circle: int

    def __len__(self) -> int:
        return int(self.coords_index.shape[0])

    @property
    def freqs_cycles_per_pixel(self) -> torch.Tensor:
        """``(P, 2)`` frequencies ``(kx, ky)`` in cycles per pixel (for the CTF and the decoder)."""
        return self.coords_index / self.box_size

    @property
    def any_conjugate(self) -> bool:
        """True when some pixels are read from their Friedel mates."""
        return bool(self.conjugate.any())

    def to(self, device: torch.device | str) -> "FourierPixels":
        """The same pixels with their tensors on ``device``."""
        return FourierPixels(
            box_size=self.box_size,
            domain=self.domain,
            coords_index=self.coords_index.to(device),
            rfft_index=self.rfft_index.to(device),
            conjugate=self.conjugate.to(device),
            weights=self.weights.to(device),
            n_circle=self.n_circle,
        )


def fourier_pixels(box_size: int, *, domain: str = "fourier", device: torch.device | str | None = None) -> FourierPixels:
    """The training pixels of a ``D x D`` image for ``domain`` "fourier" or "hartley"."""
    if domain not in ("fourier", "hartley"):
        raise ValueError(f"domain must be 'fourier' or 'hartley', got {domain!r}")
    D = int(box_size)
    grid = grid_2d_index(D, device=device).reshape(-1, 2)
    x, y = grid[:, 0], grid[:, 1]
    inside = grid.norm(dim=-1) < D / 2
    n_circle = int(inside.sum())
    half = (x > 0) | ((x == 0) & (y >= 0))
    keep = inside & half if domain == "fourier" else inside
    coords = grid[keep]
    kx, ky = coords[:, 0].long(), coords[:, 1].long()
    conjugate = kx < 0
    # pixels with kx < 0 are read at -k (inside the rfft half) and conjugated
    gx = torch.where(conjugate, -kx, kx)
    gy = torch.where(conjugate, -ky, ky)
    rfft_index = (gy % D) * (D // 2 + 1) + gx
    if domain == "fourier":
        weights = torch.where((kx == 0) & (ky == 0), 1.0, 2.0).to(torch.float32)
    else:
        weights = torch.ones(len(coords), dtype=torch.float32, device=device)
    return FourierPixels(
        box_size=D,
        domain=domain,
        coords_index=coords.to(torch.float32),
        rfft_index=rfft_index,
        conjugate=conjugate,
        weights=weights,
        n_circle=n_circle,
    )


def transform_at_pixels(images: torch.Tensor, pixels: FourierPixels) -> torch.Tensor:
    """Centred Fourier coefficients ``(B, P)`` (complex) of real ``(B, D, D)`` images at ``pixels``.

    Equal to ``fft2_center(images)`` read at the pixels (fourier/fft.py conventions), computed
    with one ``rfft2`` of the images with their origin rolled to index 0.
    """
    B = images.shape[0]
    spectrum = torch.fft.rfft2(torch.fft.ifftshift(images, dim=(-2, -1)))
    values = spectrum.reshape(B, -1)[:, pixels.rfft_index]
    if pixels.any_conjugate:
        values = torch.where(pixels.conjugate, values.conj(), values)
    return values


# --------------------------------------------------------------------------------------------
# normalisation
# --------------------------------------------------------------------------------------------
@dataclass
class DataNormalization:
    """How raw images become training data (stored in the run's config and checkpoints).

    ``images = window * ((invert ? -x : x) - mean) / std`` in real space; the Fourier
    coefficients are then divided by ``fourier_scale``.
    """

    mean: float
    std: float
    fourier_scale: float
    invert: bool = False
    window: bool = True
    window_inner_radius_fraction: float = 0.85
    window_outer_radius_fraction: float = 0.99

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": float(self.mean),
            "std": float(self.std),
            "fourier_scale": float(self.fourier_scale),
            "invert": bool(self.invert),
            "window": bool(self.window),
            "window_inner_radius_fraction": float(self.window_inner_radius_fraction),
            "window_outer_radius_fraction": float(self.window_outer_radius_fraction),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataNormalization":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


# --------------------------------------------------------------------------------------------
# batches
# --------------------------------------------------------------------------------------------
@dataclass
class TrainingBatch:
    """One batch of training data (see the module docstring); ``tilted`` holds the paired images."""

    indices: torch.Tensor
    images: torch.Tensor
    values: torch.Tensor
    rotations: torch.Tensor
    shifts_pixel: torch.Tensor
    ctf: torch.Tensor | None
    tilted: "TrainingBatch | None" = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "TrainingBatch":
        """The batch with its tensors on ``device``."""

        def mv(t):
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return TrainingBatch(
            indices=self.indices,
            images=mv(self.images),
            values=mv(self.values),
            rotations=mv(self.rotations),
            shifts_pixel=mv(self.shifts_pixel),
            ctf=mv(self.ctf),
            tilted=None if self.tilted is None else self.tilted.to(device, non_blocking),
        )


@dataclass(eq=False)
class ParticleDataset:
    """Particles of a table as training batches (images, transforms, poses, CTF).

    Parameters
    ----------
    table
        A :class:`cryoscape.io.particles.ParticleTable` with poses (and CTF unless ``use_ctf``
        is False).
    domain
        ``"fourier"`` or ``"hartley"`` (which training pixels, see :func:`fourier_pixels`).
    normalization
        A fitted :class:`DataNormalization`, or ``None`` to estimate one with
        :meth:`fit_normalization` (call it before reading batches).
    use_ctf
        Multiply predictions by the CTF (False for CTF-free data such as phase-flipped sets
        or noiseless simulations).
    in_memory
        Passed to :class:`ParticleImages`: ``None`` loads small sets, ``False`` reads lazily.
    rotation_override
        ``(N, 3, 3)`` rotations to use instead of the table's (tilt pairs).
    shuffle_chunk
        ``0`` (default): :meth:`epoch_order` is the uniform shuffle.  ``K > 0``: the chunked
        shuffle of blocks of ``K`` particles, and lazy reads fetch whole blocks (memory: about
        ``2 * CHUNK_WINDOW_BLOCKS * K`` images).
    cache_dir
        A folder for the float16 cache of the preprocessed images, used when the images are
        read lazily; written by :meth:`prepare_cache` (or at the first batch) and reused by
        later runs with the same data and normalisation.  ``None`` (default): no cache.
    progress
        Show a progress bar while the cache is written.
    """

    table: Any
    domain: str = "fourier"
    normalization: DataNormalization | None = None
    use_ctf: bool = True
    in_memory: bool | None = None
    rotation_override: np.ndarray | None = None
    shuffle_chunk: int = 0
    cache_dir: str | None = None
    progress: bool = True
    images: ParticleImages = field(init=False)
    pixels: FourierPixels = field(init=False)

    def __post_init__(self) -> None:
        table = self.table
        table.require_poses()
        if self.use_ctf:
            table.require_ctf()
            table.require_pixel_size()
        self.shuffle_chunk = max(0, int(self.shuffle_chunk or 0))
        self.images = ParticleImages(
            table.image_paths,
            table.image_indices,
            box_size=table.box_size,
            in_memory=self.in_memory,
            table_path=table.source_path,
            block_size=self.shuffle_chunk,
            cached_blocks=2 * CHUNK_WINDOW_BLOCKS,
        )
        self._cache: tuple[dict, ParticleImages] | None = None
        self._cache_lock = threading.Lock()
        if self.cache_dir is not None and self.images.in_memory:
            log.info("the images are in memory, so the cache in %s is not used", self.cache_dir)
        D = self.images.box_size
        self.pixels = fourier_pixels(D, domain=self.domain)
        rotations = table.rotations if self.rotation_override is None else self.rotation_override
        self._rotations = torch.as_tensor(np.asarray(rotations), dtype=torch.float32)
        shifts = table.shifts_pixel if table.shifts_pixel is not None else np.zeros((len(table), 2))
        self._shifts = torch.as_tensor(np.asarray(shifts), dtype=torch.float32)
        if not (torch.isfinite(self._rotations).all() and torch.isfinite(self._shifts).all()):
            raise InputError(
                f"{table.source_path} holds NaN or infinite poses; remove those particles (--ind) "
                "or redo the refinement."
            )
        self._window: torch.Tensor | None = None
        self._ctf_columns = None
        if self.use_ctf:
            self._ctf_columns = _CtfColumns(table.ctf, table.pixel_size_angstrom)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def box_size(self) -> int:
        return self.images.box_size

    @property
    def rotations(self) -> torch.Tensor:
        """``(N, 3, 3)`` float32 rotations of all particles."""
        return self._rotations

    @property
    def shifts_pixel(self) -> torch.Tensor:
        """``(N, 2)`` float32 shifts of all particles (pixels, RELION sign; zeros when unknown)."""
        return self._shifts

    @property
    def pixel_size_angstrom(self) -> float:
        """Median pixel size of the particles (NaN when unknown)."""
        p = np.asarray(self.table.pixel_size_angstrom, dtype=np.float64)
        p = p[np.isfinite(p) & (p > 0)]
        return float(np.median(p)) if p.size else float("nan")

    # ------------------------------------------------------------------ normalisation
    def fit_normalization(
        self,
        *,
        invert: bool = False,
        window: bool = True,
        window_inner_radius_fraction: float = 0.85,
        window_outer_radius_fraction: float = 0.99,
        n_sample: int = 1000,
        seed: int = 0,
    ) -> DataNormalization:
        """Estimate mean, std and Fourier scale on ``n_sample`` random images; store and return them."""
        pre = Preprocessor(invert=invert).fit_normalization(self.images, n_sample=n_sample, seed=seed)
        self.normalization = DataNormalization(
            mean=pre.mean,
            std=pre.std,
            fourier_scale=1.0,
            invert=invert,
            window=window,
            window_inner_radius_fraction=window_inner_radius_fraction,
            window_outer_radius_fraction=window_outer_radius_fraction,
        )
        self._window = None
        circle = fourier_pixels(self.box_size, domain="hartley")
        rng = np.random.default_rng(seed)
        n = len(self)
        chosen = np.sort(rng.choice(n, size=min(int(n_sample), n), replace=False))
        total, count = 0.0, 0
        for start in range(0, chosen.size, 256):
            x = self.preprocess(self.images.read(chosen[start : start + 256]))
            v = transform_at_pixels(x, circle)
            total += float((v.real.double() ** 2 + v.imag.double() ** 2).sum())
            count += v.numel()
        scale = math.sqrt(total / max(count, 1))
        if not (math.isfinite(scale) and scale > 0):
            raise InputError(
                f"the images of {self.table.source_path} have no signal after normalisation "
                "(all constant); check the particle stacks."
            )
        self.normalization.fourier_scale = scale
        log.info(
            "data normalisation from %d images: mean %.4g, std %.4g, Fourier scale %.4g",
            chosen.size, pre.mean, pre.std, scale,
        )
        return self.normalization

    def _window_scaled(self) -> torch.Tensor:
        """``window / std`` as one ``(D, D)`` factor (applied in one multiply)."""
        if self._window is None:
            norm = self.normalization
            D = self.box_size
            if norm.window:
                w = soft_circular_window(
                    D,
                    inner_radius_fraction=norm.window_inner_radius_fraction,
                    outer_radius_fraction=norm.window_outer_radius_fraction,
                )
            else:
                w = torch.ones(D, D)
            sign = -1.0 if norm.invert else 1.0
            self._window = (w * (sign / norm.std)).to(torch.float32)
        return self._window

    def preprocess(self, raw: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Raw images ``(B, D, D)`` -> ``window * (±x - mean) / std`` (float32)."""
        if self.normalization is None:
            raise RuntimeError("call fit_normalization() (or pass a normalization) before reading batches")
        x = torch.as_tensor(raw, dtype=torch.float32)
        norm = self.normalization
        offset = -norm.mean if norm.invert else norm.mean  # (-x - m) = -(x + m)
        return (x - offset) * self._window_scaled()

    # ------------------------------------------------------------------ cache
    @property
    def uses_cache(self) -> bool:
        """True when batches are read from the float16 cache (``cache_dir`` set, images lazy)."""
        return self.cache_dir is not None and not self.images.in_memory

    def prepare_cache(self) -> ParticleImages | None:
        """The cache for the current normalisation, written now if missing (``None`` without one).

        Called by the first batch anyway; call it explicitly to write the cache at a chosen time
        (e.g. on one process of a distributed run before the others start reading it).
        """
        if not self.uses_cache:
            return None
        if self.normalization is None:
            raise RuntimeError("call fit_normalization() (or pass a normalization) before the cache")
        key = self.normalization.to_dict()
        with self._cache_lock:
            if self._cache is None or self._cache[0] != key:
                from cryoscape.data.cache import open_training_cache

                reader = open_training_cache(
                    self.images, self._preprocessor(), self.cache_dir, block_size=self.shuffle_chunk,
                    cached_blocks=2 * CHUNK_WINDOW_BLOCKS, progress=self.progress,
                )
                self._cache = (key, reader)
            return self._cache[1]

    def _preprocessor(self) -> Preprocessor:
        """The :class:`Preprocessor` equal to :meth:`preprocess` (what the cache holds)."""
        norm = self.normalization
        return Preprocessor(
            invert=norm.invert, mean=norm.mean, std=norm.std, window=norm.window,
            window_inner_radius_fraction=norm.window_inner_radius_fraction,
            window_outer_radius_fraction=norm.window_outer_radius_fraction,
        )

    def read_preprocessed(self, indices: np.ndarray) -> torch.Tensor:
        """``(B, D, D)`` preprocessed images of particles ``indices`` (from the cache when used)."""
        cache = self.prepare_cache()
        if cache is not None:
            return torch.from_numpy(cache.read(indices))
        return self.preprocess(self.images.read(indices))

    def __getstate__(self) -> dict:
        # the lock and the open cache do not travel to other processes; they reopen it
        state = self.__dict__.copy()
        state["_cache"] = None
        del state["_cache_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._cache_lock = threading.Lock()

    def epoch_order(self, *, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
        """:func:`epoch_order` of this dataset with its ``shuffle_chunk``."""
        return epoch_order(len(self), seed=seed, epoch=epoch, shuffle=shuffle, shuffle_chunk=self.shuffle_chunk)

    # ------------------------------------------------------------------ batches
    def ctf_at_pixels(self, indices: np.ndarray) -> torch.Tensor | None:
        """``(B, P)`` CTF of particles ``indices`` at the training pixels (``None`` without CTF)."""
        if self._ctf_columns is None:
            return None
        return self._ctf_columns.evaluate(indices, self.pixels.freqs_cycles_per_pixel)

    def get_batch(self, indices: np.ndarray) -> TrainingBatch:
        """Read, preprocess and transform the particles ``indices`` (an int array)."""
        indices = np.asarray(indices, dtype=np.int64)
        images = self.read_preprocessed(indices)
        values = transform_at_pixels(images, self.pixels)
        values = values / self.normalization.fourier_scale
        idx_t = torch.from_numpy(indices)
        return TrainingBatch(
            indices=idx_t,
            images=images,
            values=values,
            rotations=self._rotations[idx_t],
            shifts_pixel=self._shifts[idx_t],
            ctf=self.ctf_at_pixels(indices),
        )


class _CtfColumns:
    """The CTF table as float32 columns, so a batch is one gather per column."""

    _names = (*CTF_PARAMETER_NAMES, "b_factor_angstrom2")

    def __init__(self, ctf: Any, pixel_size_angstrom: np.ndarray):
        self.ctf = ctf
        self.pixel = np.asarray(pixel_size_angstrom, dtype=np.float64)
        for name in self._names:
            values = getattr(ctf, name, None)
            if values is not None and not np.isfinite(np.asarray(values, dtype=np.float64)).all():
                raise InputError(f"the CTF parameter {name} has NaN or infinite values; "
                                 "remove those particles (--ind) or redo the CTF estimation.")

    def evaluate(self, indices: np.ndarray, freqs: torch.Tensor) -> torch.Tensor:
        return ctf_images_from_table(
            self.ctf, self.pixel, 0, indices, dtype=torch.float32, freqs_cycles_per_pixel=freqs
        )


# --------------------------------------------------------------------------------------------
# epochs
# --------------------------------------------------------------------------------------------
#: Blocks per shuffle window of the chunked order (:func:`epoch_order` with ``shuffle_chunk``).
CHUNK_WINDOW_BLOCKS = 4


def epoch_order(n: int, *, seed: int, epoch: int, shuffle: bool = True, shuffle_chunk: int = 0) -> np.ndarray:
    """The particle order of ``epoch``: a permutation of ``range(n)`` that depends only on ``(seed, epoch)``.

    ``shuffle_chunk=0`` (default): a uniform permutation (the order of every run so far, kept
    bit for bit so that old checkpoints resume identically).  ``shuffle_chunk=K``: the chunked
    order for datasets read from disk: the particles are cut into aligned blocks
    ``[b K, (b + 1) K)``, the blocks are permuted, and the particles of each window of
    :data:`CHUNK_WINDOW_BLOCKS` consecutive blocks (of the permuted list) are shuffled among
    themselves.  A batch then holds particles of at most a few blocks (for ``K`` at least the
    batch size), so :class:`cryoscape.data.images.ParticleImages` with ``block_size=K`` reads each
    block once, sequentially.  Neighbouring particles (often one micrograph) meet in the same
    window more often than under a uniform shuffle; larger ``K`` means longer sequential reads
    and less mixing.
    """
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    if shuffle_chunk <= 0:
        return np.random.default_rng([int(seed), int(epoch), 0x7261]).permutation(n).astype(np.int64)
    K = int(shuffle_chunk)
    rng = np.random.default_rng([int(seed), int(epoch), 0x7261, K])
    n_blocks = -(-n // K)
    blocks = rng.permutation(n_blocks)
    members = (blocks[:, None] * K + np.arange(K)[None, :]).reshape(-1)
    window = np.repeat(np.arange(n_blocks) // CHUNK_WINDOW_BLOCKS, K)
    keep = members < n  # the last block may be short
    members, window = members[keep], window[keep]
    # within each window, a random order: sort by (window, random key)
    return members[np.lexsort((rng.random(members.size), window))].astype(np.int64)


def iterate_batches(
    get_batch,
    order: np.ndarray,
    batch_size: int,
    *,
    prefetch: int = 2,
) -> Iterator[TrainingBatch]:
    """Yield ``get_batch(order[i : i + batch_size])`` for consecutive slices of ``order``.

    With ``prefetch > 0`` a background thread prepares up to ``prefetch`` batches ahead
    (reading and FFTs release the GIL), so memory stays bounded by a few batches; the batches
    and their order are the same as without it.  An exception in the thread is re-raised here.
    """
    slices = [order[i : i + batch_size] for i in range(0, len(order), max(1, int(batch_size)))]
    if prefetch <= 0:
        for s in slices:
            yield get_batch(s)
        return

    q: queue.Queue = queue.Queue(maxsize=int(prefetch))
    stop = threading.Event()
    done = object()

    def worker() -> None:
        try:
            for s in slices:
                if stop.is_set():
                    return
                item = get_batch(s)
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
            q.put(done)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            q.put(err)

    thread = threading.Thread(target=worker, name="cryoscape-batches", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        # drain so a blocked put() returns, then wait for the thread
        while thread.is_alive():
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()
