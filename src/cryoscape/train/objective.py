"""The loss of one batch (:class:`ImageLoss`) and its tilt-pair wrapper (:class:`TiltPairLoss`).

The objective is documented in :mod:`cryoscape.train.likelihood`: per image the weighted squared
error over the training pixels, plus ``beta / n_circle`` times the KL divergence of the VAE's
posterior (``zdim > 0``).  A loss object knows the training pixels, the domain and the precision;
the poses it is given are those of the :class:`~cryoscape.train.pose_sources.PoseSource`
(corrected, searched or random), so the loss has no pose branches.

Tilt pairs (cryoDRGN's ``--tilt``) are a wrapper: the encoder reads both images of a pair, the
decoder predicts both (the tilted one under ``T @ R``), and a pair's error is the sum of its two
images' errors.

Data-parallel training splits a global batch across processes; each process's loss is then its
part's share of the global mean (``share = local / global`` images), so the gradients summed over
processes are the gradient of the global batch's mean, and the reparameterisation noise of its
rows is drawn for the whole global batch (``noise_rows``), as one process would draw it.
"""

from __future__ import annotations

import math

import torch

from cryoscape.data.training import FourierPixels, TrainingBatch
from cryoscape.geometry.rotations import rotation_about_axis
from cryoscape.models.precision import autocast
from cryoscape.models.vae import kl_divergence, reparameterize
from cryoscape.train.likelihood import centre_values, predict_values, squared_error, to_domain

__all__ = ["ImageLoss", "TiltPairLoss", "batch_loss", "tilt_rotation", "sample_latent"]


def tilt_rotation(tilt_deg: float, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The stage tilt as a ``(3, 3)`` rotation ``T``: right-handed, ``tilt_deg`` about the image x axis.

    A particle with pose ``R`` in the untilted image has pose ``T @ R`` in the tilted image: the
    stage rotates the specimen in the microscope frame (image x = tilt axis, z = beam), after
    the particle's own orientation.  A world point ``X`` appears at ``(T R X)_xy``.  A negative
    ``tilt_deg`` tilts the other way.
    """
    return rotation_about_axis(
        torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), math.radians(float(tilt_deg))
    ).to(dtype)


def sample_latent(mu: torch.Tensor, logvar: torch.Tensor, *, generator: torch.Generator | None,
                  noise_rows: tuple[int, torch.Tensor] | None = None) -> torch.Tensor:
    """``mu + exp(logvar / 2) eps``; ``noise_rows = (global batch, rows)``: ``eps`` are those rows of
    the noise drawn for the whole global batch (data-parallel training)."""
    if noise_rows is None:
        return reparameterize(mu, logvar, generator=generator)
    eps = torch.randn((int(noise_rows[0]), mu.shape[-1]), generator=generator, device=mu.device, dtype=mu.dtype)
    return reparameterize(mu, logvar, eps=eps[noise_rows[1].to(mu.device)])


class ImageLoss:
    """Loss of a batch of single images under the given poses (see the module docstring)."""

    def __init__(self, pixels: FourierPixels, *, domain: str, amp: bool = False):
        self.pixels, self.domain, self.amp = pixels, domain, bool(amp)

    def with_pixels(self, pixels: FourierPixels) -> "ImageLoss":
        """The same loss on other training pixels (a frequency band)."""
        return type(self)(pixels, domain=self.domain, amp=self.amp)

    def target(self, batch: TrainingBatch, shifts: torch.Tensor) -> torch.Tensor:
        """Observed coefficients with the particle shifts undone, in the decoder's domain."""
        return to_domain(centre_values(batch.values, self.pixels.coords_index, shifts, self.pixels.box_size),
                         self.domain)

    def encode(self, encoder, batch: TrainingBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return encoder(batch.images)

    def errors(self, decoder, batch: TrainingBatch, rotations: torch.Tensor, target: torch.Tensor,
               z: torch.Tensor | None) -> torch.Tensor:
        """``(B,)`` squared errors of the images (prediction under ``rotations`` vs ``target``)."""
        with autocast(target.device, self.amp):
            pred = decoder.predict_images(rotations, self.pixels, z, batch.ctf)  # None: the slice path
            if pred is None:
                pred = predict_values(decoder, rotations, self.pixels, z, batch.ctf)
        pred = pred.to(torch.complex64) if pred.is_complex() else pred.float()
        return squared_error(pred, target, self.pixels)

    def __call__(self, batch: TrainingBatch, *, decoder, encoder, rotations: torch.Tensor, shifts: torch.Tensor,
                 beta: float, generator: torch.Generator | None = None, share: float = 1.0,
                 noise_rows: tuple[int, torch.Tensor] | None = None, search=None) -> dict[str, torch.Tensor]:
        """``loss`` (to minimise: ``share`` times ``objective``, the batch mean), ``error`` and ``kl``
        (batch means), ``mu`` and ``logvar`` (``(B, zdim)`` or ``None``).  ``search``: a
        :class:`~cryoscape.train.latent_search.LatentSearch` replaces the encoder's latents by the
        ones searched against the decoder (its loss, that module's docstring)."""
        target = self.target(batch, shifts)
        mu = logvar = z = None
        if encoder is not None:
            with autocast(target.device, self.amp):
                mu, logvar = self.encode(encoder, batch)
                mu, logvar = mu.float(), logvar.float()
                z = sample_latent(mu, logvar, generator=generator, noise_rows=noise_rows)
            if search is not None:
                return search.loss(self, batch, decoder, rotations, target, mu, logvar, share=share)
        error = self.errors(decoder, batch, rotations, target, z).mean()
        if mu is not None:
            kl = kl_divergence(mu, logvar).mean()
            loss = error + (beta / self.pixels.n_circle) * kl
        else:
            kl = torch.zeros((), device=target.device)
            loss = error
        scaled = loss * share if share != 1.0 else loss
        return {"loss": scaled, "objective": loss, "error": error, "kl": kl, "mu": mu, "logvar": logvar}


class TiltPairLoss(ImageLoss):
    """:class:`ImageLoss` of tilt pairs: ``batch.tilted`` holds the partners, tilted by ``tilt_matrix``."""

    def __init__(self, pixels: FourierPixels, *, domain: str, amp: bool = False,
                 tilt_matrix: torch.Tensor | None = None):
        super().__init__(pixels, domain=domain, amp=amp)
        if tilt_matrix is None:
            raise ValueError("a tilt-pair loss needs the tilt matrix")
        self.tilt_matrix = tilt_matrix

    def with_pixels(self, pixels: FourierPixels) -> "TiltPairLoss":
        return TiltPairLoss(pixels, domain=self.domain, amp=self.amp, tilt_matrix=self.tilt_matrix)

    def encode(self, encoder, batch: TrainingBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return encoder(batch.images, batch.tilted.images)

    def errors(self, decoder, batch: TrainingBatch, rotations: torch.Tensor, target: torch.Tensor,
               z: torch.Tensor | None) -> torch.Tensor:
        tilted = batch.tilted
        rot_t = self.tilt_matrix.to(rotations.device, rotations.dtype) @ rotations
        t_target = super().target(tilted, tilted.shifts_pixel)
        ctf = None if batch.ctf is None else torch.cat([batch.ctf, tilted.ctf])
        both = TrainingBatch(indices=batch.indices, images=batch.images, values=batch.values,
                             rotations=rotations, shifts_pixel=batch.shifts_pixel, ctf=ctf)
        errors = super().errors(decoder, both, torch.cat([rotations, rot_t]), torch.cat([target, t_target]),
                                None if z is None else torch.cat([z, z]))
        B = batch.values.shape[0]
        return errors[:B] + errors[B:]


def batch_loss(batch: TrainingBatch, *, decoder, encoder, pixels: FourierPixels, domain: str, beta: float,
               poses=None, generator: torch.Generator | None = None, tilt_matrix: torch.Tensor | None = None,
               amp: bool = False) -> dict[str, torch.Tensor]:
    """The loss of one batch as a function (notebooks, tests): ``poses`` optional
    :class:`~cryoscape.train.poses.PoseCorrections`, ``tilt_matrix`` for tilt pairs."""
    loss = (ImageLoss(pixels, domain=domain, amp=amp) if tilt_matrix is None else
            TiltPairLoss(pixels, domain=domain, amp=amp, tilt_matrix=tilt_matrix))
    rot, shifts = batch.rotations, batch.shifts_pixel
    if poses is not None:
        rot, shifts = poses(batch.indices, rot, shifts)
    return loss(batch, decoder=decoder, encoder=encoder, rotations=rot, shifts=shifts, beta=beta,
                generator=generator)
