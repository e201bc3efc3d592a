"""Stage 1 of study-level diagnosis: where each finding is, per series type (targets, the slice cache, the network,
the sites read from its outputs)."""
