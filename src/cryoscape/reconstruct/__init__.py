"""reconstruct layer."""
