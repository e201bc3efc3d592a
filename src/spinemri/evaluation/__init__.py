"""Comparisons of trained runs: the thesis's Table 3.1 rebuilt from MLflow runs, floors and paired differences beside."""
