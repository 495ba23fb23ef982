"""fourier layer."""
