"""``cryoscape dashboard``: a local web app over a run folder (latent space, selections, maps, paths, losses)."""
