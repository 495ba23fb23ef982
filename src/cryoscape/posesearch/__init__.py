"""posesearch layer."""
