"""cryoscape: reconstruct distributions of 3-D structures from cryo-EM particle images.

Layers (imports only point down): io, fourier, geometry -> simulate, data -> models,
reconstruct, posesearch -> train -> analysis -> report -> cli.  See the README for the
conventions every layer shares.
"""

__version__ = "0.1.0"

from cryoscape.errors import InputError

__all__ = ["InputError", "__version__"]
