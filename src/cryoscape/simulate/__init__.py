"""simulate layer: ground-truth volumes, heterogeneous ensembles, particle images, datasets.

* :mod:`~cryoscape.simulate.volumes`: Gaussian atoms on a grid, atomic models (gemmi), MRC maps.
* :mod:`~cryoscape.simulate.molecule`: the built-in two-domain molecule with a hinge.
* :mod:`~cryoscape.simulate.ensembles`: homogeneous / discrete / trajectory / hinge ensembles.
* :mod:`~cryoscape.simulate.images`: projection, CTF, shifts and noise at a given SNR.
* :mod:`~cryoscape.simulate.dataset`: writes .mrcs, .star, poses.pkl, ctf.pkl and the ground truth.
"""

from cryoscape.simulate.dataset import simulate_dataset
from cryoscape.simulate.ensembles import (
    Ensemble,
    build_ensemble,
    discrete_ensemble,
    hinge_discrete_ensemble,
    hinge_ensemble,
    homogeneous_ensemble,
    load_volumes,
    trajectory_ensemble,
)
from cryoscape.simulate.images import (
    ImageParameters,
    SimulationResult,
    render_clean_images,
    sample_image_parameters,
    simulate_images,
)
from cryoscape.simulate.molecule import default_pixel_size_angstrom, hinge_molecule
from cryoscape.simulate.volumes import (
    read_atomic_model,
    render_gaussian_atoms,
    volume_from_atomic_model,
    volume_from_map,
)

__all__ = [
    "Ensemble",
    "ImageParameters",
    "SimulationResult",
    "build_ensemble",
    "default_pixel_size_angstrom",
    "discrete_ensemble",
    "hinge_discrete_ensemble",
    "hinge_ensemble",
    "hinge_molecule",
    "homogeneous_ensemble",
    "load_volumes",
    "read_atomic_model",
    "render_clean_images",
    "render_gaussian_atoms",
    "sample_image_parameters",
    "simulate_dataset",
    "simulate_images",
    "trajectory_ensemble",
    "volume_from_atomic_model",
    "volume_from_map",
]
