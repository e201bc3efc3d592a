"""The two-stage pipeline's products: predict-study, its evaluation, the packaged study model."""
