"""models layer: encoders and volume decoders behind one interface (see base.py).

Importing registers the built-in decoders (``build_decoder("neural_field", ...)``).
"""

from cryoscape.models.base import VolumeDecoder, build_decoder, decoder_names, register_decoder
from cryoscape.models.encoders import ENCODER_KINDS, ImageEncoder, TiltPairEncoder, build_encoder
from cryoscape.models.encodings import ENCODING_KINDS, PositionalEncoding, make_encoding
from cryoscape.models.layers import ResidualMLP
from cryoscape.models.neural_field import NeuralField
from cryoscape.models.vae import HeterogeneousVAE, VAEOutput, build_vae, kl_divergence, reparameterize

__all__ = [
    "VolumeDecoder",
    "build_decoder",
    "decoder_names",
    "register_decoder",
    "ENCODER_KINDS",
    "ImageEncoder",
    "TiltPairEncoder",
    "build_encoder",
    "ENCODING_KINDS",
    "PositionalEncoding",
    "make_encoding",
    "ResidualMLP",
    "NeuralField",
    "HeterogeneousVAE",
    "VAEOutput",
    "build_vae",
    "kl_divergence",
    "reparameterize",
]
