"""Reading a model's severity output for the rows it was asked about (NumPy only, no Keras).

A per-site model (``model.severity_head: per_site``, :mod:`spinemri.models.network`) outputs one
distribution per site, (n, 25, 3) in :data:`~spinemri.data.schema.SITES` order; every consumer — the
evaluation, the served model, study-level prediction — reads a row's severity at the site the row names.
"""

from __future__ import annotations

import numpy as np


def severity_at(severity: np.ndarray, sites: np.ndarray) -> np.ndarray:
    """A row's severity distribution at its site: (n, 25, 3) per-site output -> (n, 3), read at ``sites``
    (int (n,), indices into SITES). A row without a site (-1) gets the mean over the 25 sites. An (n, 3)
    output (a single-head model) is returned as it is."""
    severity = np.asarray(severity)
    if severity.ndim == 2:
        return severity
    sites = np.asarray(sites, dtype=np.int64)
    if len(sites) != len(severity):
        raise ValueError(f"{len(sites)} sites for {len(severity)} rows")
    picked = severity[np.arange(len(severity)), np.clip(sites, 0, None)]
    return np.where((sites >= 0)[:, None], picked, severity.mean(axis=1)).astype(severity.dtype)
