"""Neural field decoder: a coordinate MLP over positionally encoded frequencies (thesis 3.1).

``value(k, z) = MLP([pe(k), z])`` models a map's transform at frequency ``k`` (cycles per
training pixel) for latent ``z`` (thesis Fig. 3-1, 3-3).  Two domains (thesis 3.1.1):

``fourier``
    The MLP has two outputs, the real and imaginary parts.  The represented map is real, so
    its transform is Hermitian, ``F(-k) = conj F(k)``; this is built in exactly.  Each point is
    mapped to a canonical half-space before it reaches the MLP:

        k is *negative* if  kz < 0,  or  kz == 0 and ky < 0,  or  kz == ky == 0 and kx < 0.

    A negative point is evaluated at ``-k`` and its imaginary part negated; the origin gets
    imaginary part 0.  Since ``k`` and ``-k`` then feed the MLP the same input, ``F(-k)`` equals
    ``conj F(k)`` to the last bit (up to batched-GEMM rounding).  The training loop may
    therefore evaluate only half of each central slice.
``hartley``
    One real output, ``H = Re F - Im F``; no symmetry is imposed (``H(-k)`` carries ``Re F + Im
    F``, independent information), so whole slices are evaluated.

Network size follows the "width x layers" convention of :mod:`cryoscape.models.layers`
(input layer, ``layers`` residual hidden layers, output layer; cryoDRGN's 256x3 is
``layers=3, width=256``).

Scale of :meth:`NeuralField.eval_volume`
----------------------------------------
A decoder whose values at the grid frequencies ``(i - D//2) / D`` equal the centred,
unnormalised FFT ``fft3_center(v)`` of a map ``v`` (fourier/fft.py) returns ``v``:
``eval_volume = Re(ifft3_center(F_grid))`` (``iht3_center(H_grid)`` for hartley).  The training
loop divides image transforms by one global data scale, so volumes come out in those units.  A
smaller box ``n < D`` evaluates the ``n`` central frequencies ``(i - n//2) / D`` (cropping, the
pixel becomes ``D / n`` times larger) and multiplies by ``(n / D)^3``, which is exactly
``fourier.resample.downsample_volume(eval_volume(z), n)``: voxel values are kept, not sums.
On even boxes the -Nyquist planes are handled as ``Re(ifft)`` does, which for a Fourier decoder
means averaging the +-Nyquist coefficients (their real parts agree by Hermitian symmetry); for a
Hartley decoder the grid's -Nyquist value is used as it is.

Band limit (``band_fraction``, float32 speed)
--------------------------------------------
With ``band_fraction = f < 1`` the decoder represents only frequencies ``|k| <= f / 2`` (cycles
per training pixel) and is zero beyond: :meth:`NeuralField.forward` sends only the in-band points
to the MLP (the training pixels of a batch share their radii, so the band selects the same
columns for every image) and :meth:`NeuralField.eval_volume` zeroes the rest.  The cost of a
training step is the MLP's, proportional to the points evaluated, so ``f = 0.7`` halves it.  At
SNR 0.1 the outer shells of a per-image map carry little signal; what the band costs in accuracy
is measured in bench/results (README, "Choosing a decoder").

Fourier-domain volumes evaluate only the half grid ``kz >= 0`` (plus, for even boxes, the
-Nyquist lines that have no partner on the grid) and fill the rest by ``F(-k) = conj F(k)``.
By default only the trained sphere ``|k| <= 1/2`` (cycles per training pixel) is evaluated and
the cube's corners are zero (see ``sphere`` in :meth:`NeuralField.eval_volume`).
"""

from __future__ import annotations

from typing import Any

import torch

from cryoscape.fourier.fft import ifft3_center, iht3_center
from cryoscape.models.base import VolumeDecoder, register_decoder
from cryoscape.models.encodings import DEFAULT_ENCODING, make_encoding
from cryoscape.models.layers import ResidualMLP

__all__ = ["NeuralField", "hermitian_negative_mask"]

DOMAINS = ("fourier", "hartley")


def hermitian_negative_mask(coords: torch.Tensor) -> torch.Tensor:
    """``(...,)`` boolean: points of the half-space evaluated through their mirror ``-k``.

    ``kz < 0``, or ``kz == 0 and ky < 0``, or ``kz == ky == 0 and kx < 0``.  For every ``k != 0``
    exactly one of ``k`` and ``-k`` is negative; the origin is not.
    """
    kx, ky, kz = coords.unbind(-1)
    return (kz < 0) | ((kz == 0) & ((ky < 0) | ((ky == 0) & (kx < 0))))


@register_decoder("neural_field")
class NeuralField(VolumeDecoder):
    """Coordinate MLP decoder ``(k, z) -> F(k; z)`` (thesis 3.1.1-3.1.2).

    Parameters
    ----------
    box_size
        Training box ``D`` in pixels (sets the encoding's frequency range and the default
        output box).
    zdim
        Latent dimension; 0 for a homogeneous map.
    layers, width
        Hidden residual layers and their width (``256 x 3`` by default).
    domain
        ``"fourier"`` (complex output, exact Hermitian symmetry) or ``"hartley"`` (real).
    encoding, n_freqs, gaussian_scale
        Positional encoding (:func:`cryoscape.models.encodings.make_encoding`).
    activation
        Activation name (:data:`cryoscape.models.layers.ACTIVATIONS`).
    seed
        Seed of the ``gaussian`` encoding matrix (network weights are initialised from torch's
        global generator, as with any ``nn.Module``).
    band_fraction
        Represent only ``|k| <= band_fraction / 2`` cycles per pixel, zero beyond (module
        docstring); 1 (default) is the whole sphere up to Nyquist.
    """

    def __init__(
        self,
        *,
        box_size: int,
        zdim: int = 0,
        layers: int = 3,
        width: int = 256,
        domain: str = "fourier",
        encoding: str = DEFAULT_ENCODING,
        n_freqs: int | None = None,
        gaussian_scale: float | None = None,
        activation: str = "relu",
        seed: int = 0,
        band_fraction: float = 1.0,
    ):
        super().__init__(box_size=box_size, zdim=zdim)
        if domain not in DOMAINS:
            raise ValueError(f"unknown domain {domain!r}; choose one of {list(DOMAINS)}")
        if self.zdim < 0:
            raise ValueError(f"zdim must be >= 0, got {zdim}")
        self.domain = domain
        band_fraction = float(band_fraction)
        if not 0.0 < band_fraction <= 1.0:
            raise ValueError(f"band_fraction must be in (0, 1], got {band_fraction}")
        self.band_radius = 0.5 * band_fraction  # cycles per training pixel
        self.config.update(
            layers=int(layers),
            width=int(width),
            domain=domain,
            encoding=encoding,
            n_freqs=None if n_freqs is None else int(n_freqs),
            gaussian_scale=None if gaussian_scale is None else float(gaussian_scale),
            activation=activation,
            seed=int(seed),
            band_fraction=band_fraction,
        )
        self.encoding = make_encoding(
            encoding, box_size=self.box_size, n_freqs=n_freqs, gaussian_scale=gaussian_scale, seed=seed
        )
        n_out = 2 if domain == "fourier" else 1
        self.mlp = ResidualMLP(
            self.encoding.out_dim + self.zdim, n_out, layers=int(layers), width=int(width), activation=activation
        )

    # ------------------------------------------------------------------------------------------
    def _mlp(self, coords: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        features = self.encoding(coords).to(self.mlp.input.weight.dtype)
        return self.mlp(features, z)

    def forward(self, coords: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """Transform values at frequencies ``coords (B, P, 3)`` (cycles per training pixel).

        ``z`` is ``(B, zdim)`` (or ``(1, zdim)``, broadcast), ``None`` when ``zdim == 0``.
        Returns ``(B, P)`` complex64 (fourier) or float32 (hartley) values; extra point axes
        ``(B, ..., 3)`` are allowed.
        """
        if coords.shape[-1] != 3 or coords.dim() < 2:
            raise ValueError(f"coords must have shape (B, P, 3), got {tuple(coords.shape)}")
        z = self.check_latent(z, coords.shape[0])
        z = None if z is None else z.to(self.mlp.input.weight.dtype)
        if self.band_radius < 0.5:
            return self._forward_band(coords, z)
        return self._forward_all(coords, z)

    def _forward_band(self, coords: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """:meth:`_forward_all` on the points with ``|k| <= band_radius`` only, zero elsewhere.

        The band is chosen from the first image's radii: a batch's images are rotations of the same
        pixels, so their radii agree (to rounding) column by column.
        """
        flat = coords.reshape(coords.shape[0], -1, 3)
        inside = flat[0].square().sum(-1) <= self.band_radius ** 2
        values = self._forward_all(flat[:, inside], z)
        out = values.new_zeros(flat.shape[:2])
        out[:, inside] = values
        return out.reshape(coords.shape[:-1])

    def _forward_all(self, coords: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """The decoder's values at every point of ``coords (B, ..., 3)`` (``z`` already checked)."""
        if self.domain == "hartley":
            out = self._mlp(coords, z)[..., 0]
            return out.to(torch.promote_types(out.dtype, torch.float32))
        negative = hermitian_negative_mask(coords)
        canonical = torch.where(negative[..., None], -coords, coords)
        out = self._mlp(canonical, z)
        out = out.to(torch.promote_types(out.dtype, torch.float32))
        real, imag = out[..., 0], out[..., 1]
        origin = (canonical == 0).all(dim=-1)
        imag = torch.where(negative, -imag, imag).masked_fill(origin, 0.0)
        return torch.complex(real, imag)

    # ------------------------------------------------------------------------------------------
    def _default_chunk_points(self) -> int:
        """Points per decoder call in :meth:`eval_volume`: few enough that a layer's activations
        (``points x width`` floats, 2 MB at width 256) stay in the CPU's caches.

        Measured on a 256 x 3 decoder at D = 64 (2 cores): 2048 points per call evaluate a map
        4-8x faster than 131072 (whose 134 MB activations go through main memory), in float32
        and bfloat16.
        """
        return int(min(16384, max(512, 2**19 // max(self.config["width"], 1))))

    def _eval_planes(
        self, kz: torch.Tensor, ky: torch.Tensor, kx: torch.Tensor, z: torch.Tensor | None, chunk_points: int,
        sphere: bool = True,
    ) -> torch.Tensor:
        """Values on the grid ``kz x ky x kx`` (1-D frequency vectors), ``(len kz, len ky, len kx)``.

        ``sphere``: evaluate only points with ``|k| <= 1/2`` (the trained sphere; with a band limit
        ``|k| <= band_radius``), zero elsewhere.
        The points are gathered a few planes at a time and sent to the network ``chunk_points``
        at a time.
        """
        ny, nx = ky.numel(), kx.numel()
        per_plane = ny * nx
        step = max(1, (8 * chunk_points) // max(per_plane, 1))
        yy, xx = torch.meshgrid(ky, kx, indexing="ij")
        out = []
        for start in range(0, kz.numel(), step):
            zs = kz[start : start + step]
            pts = torch.stack(
                [xx.expand(zs.numel(), ny, nx), yy.expand(zs.numel(), ny, nx), zs[:, None, None].expand(-1, ny, nx)],
                dim=-1,
            ).reshape(-1, 3)
            inside = pts.square().sum(-1) <= self.band_radius ** 2 if sphere else None
            todo = pts[inside] if sphere else pts
            values = [self(todo[None, i : i + chunk_points], z)[0] for i in range(0, todo.shape[0], chunk_points)]
            values = torch.cat(values) if values else self(todo[None], z)[0]
            if sphere:
                block = values.new_zeros(pts.shape[0])
                block[inside] = values
            else:
                block = values
            out.append(block.reshape(zs.numel(), ny, nx))
        return torch.cat(out, dim=0)

    @torch.no_grad()
    def eval_volume(
        self, z: torch.Tensor | None = None, *, box_size: int | None = None, chunk_points: int | None = None,
        sphere: bool = True,
    ) -> torch.Tensor:
        """Real-space map ``(n, n, n)`` float32 ``[z, y, x]`` for one latent (scale: module docstring).

        Parameters
        ----------
        z
            ``(zdim,)`` or ``(1, zdim)`` latent; ``None`` for a homogeneous decoder.
        box_size
            Output box ``n`` (default the training box ``D``); ``n < D`` crops frequencies like
            Fourier downsampling, ``n > D`` extrapolates beyond the training Nyquist.
        chunk_points
            Points per decoder call (bounds memory); default :meth:`_default_chunk_points`.
        sphere
            Evaluate only frequencies inside the sphere ``|k| <= 1/2`` cycles per training pixel
            and set the rest to zero (default).  Training covers the circle ``|k| < D/2`` of
            every image, so the cube's corners hold untrained extrapolation, which adds
            high-frequency noise to the map (it lowered the real-space correlation with the
            truth in bench/train.py) and costs half the evaluation time.  ``False`` evaluates
            the whole cube.
        """
        n = int(box_size) if box_size is not None else self.box_size
        if n < 1:
            raise ValueError(f"box_size must be positive, got {box_size}")
        param = self.mlp.input.weight
        device = param.device
        if z is not None:
            z = torch.as_tensor(z, device=device, dtype=param.dtype).reshape(1, -1)
        if self.zdim > 0 and z is None:
            raise ValueError(f"this decoder needs a latent z of dimension {self.zdim}")
        chunk = int(chunk_points) if chunk_points else self._default_chunk_points()
        freq = (torch.arange(n, device=device, dtype=torch.float32) - (n // 2)) / self.box_size
        h = n // 2
        if self.domain == "hartley":
            values = self._eval_planes(freq, freq, freq, z, chunk, sphere)
            volume = iht3_center(values)
        else:
            values = torch.empty((n, n, n), dtype=torch.complex64, device=device)
            values[h:] = self._eval_planes(freq[h:], freq, freq, z, chunk, sphere)  # kz >= 0
            o = 1 - n % 2  # even boxes: index 0 (-Nyquist) has no partner on the grid
            if o:
                values[0] = self._eval_planes(freq[:1], freq, freq, z, chunk, sphere)[0]
                if h > 1:
                    values[1:h, 0, :] = self._eval_planes(freq[1:h], freq[:1], freq, z, chunk, sphere)[:, 0, :]
                    values[1:h, 1:, 0] = self._eval_planes(freq[1:h], freq[1:], freq[:1], z, chunk, sphere)[:, :, 0]
            # Index i mirrors to 2*(n//2) - i: F(-k) = conj F(k) fills the kz < 0 half.
            values[o:h, o:, o:] = values[h + 1 :, o:, o:].flip((0, 1, 2)).conj()
            volume = ifft3_center(values).real
        if n != self.box_size:
            volume = volume * (n / self.box_size) ** 3
        return volume.to(torch.float32).contiguous()

    def extra_repr(self) -> str:
        c: dict[str, Any] = self.config
        return f"domain={self.domain!r}, zdim={self.zdim}, {c['width']}x{c['layers']}, encoding={c['encoding']!r}"
