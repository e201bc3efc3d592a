"""Evaluation runs above training: a logged model evaluated again on its split, and `compare` of trained backbones."""
