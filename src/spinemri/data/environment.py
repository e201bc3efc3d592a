"""The environment variables spinemri reads, checked all at once: a command refuses a bad one at its start.

Input limits (``SPINEMRI_MAX_*``, :mod:`spinemri.data.limits`), the DICOM reader
(``SPINEMRI_DICOM_READER``, :func:`spinemri.data.dicom.dicom_reader`) and a site's series rules
(``SPINEMRI_SERIES_RULES``, :func:`spinemri.data.series_types.site_rules`) are read where they are
used, which may be deep inside a long run or only when one study needs them. :func:`check_environment`
reads each of them once, so that a value that does not parse stops the command before it does anything,
with the variable named and the fix.
"""

from __future__ import annotations

from spinemri.data import limits
from spinemri.data.dicom import dicom_reader
from spinemri.data.series_types import site_rules


def check_environment() -> None:
    """Read every setting spinemri takes from the environment; a LimitError or ConfigError names the first bad one."""
    for limit in limits.ALL:
        limit.value  # noqa: B018 - reading it checks it
    dicom_reader()
    site_rules()
