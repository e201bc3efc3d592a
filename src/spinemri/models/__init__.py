"""Models: the backbone registry and the three-head classifier built on it."""
