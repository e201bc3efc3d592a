"""How large an input may be: every decoder checks the declared size here *before* it decodes.

A DICOM header, a PNG header or a zip directory states how much memory (or disk) its content will
take once decoded; a small file can declare gigabytes (a decompression bomb). Each reader compares
that declaration with a budget below and refuses, naming the limit and the environment variable
that raises it, before a single pixel is decoded:

=============================  =====================================================  =========
environment variable           what it bounds                                         default
=============================  =====================================================  =========
SPINEMRI_MAX_IMAGE_PIXELS      rows x columns of one image or frame                   4096 x 4096
SPINEMRI_MAX_IMAGE_MB          decoded pixels of one file (all frames and samples)    128 MB
SPINEMRI_MAX_STUDY_MB          an uploaded study archive, unpacked                    512 MB
SPINEMRI_MAX_STUDY_FILE_MB     one file inside that archive                           128 MB
SPINEMRI_MAX_STUDY_FILES       files in that archive                                  5000
SPINEMRI_MAX_REQUEST_MB        one request body to a served spinemri model            768 MB
SPINEMRI_MAX_ANSWER_MB         one DICOMweb JSON answer to `spinemri pacs`             16 MB
=============================  =====================================================  =========

An MR slice is at most 1024 x 1024 16-bit pixels (2 MB); a large RSNA study is a few hundred MB
of DICOM. The values are read at each check, so a running process (a model server) follows the
environment it was started with.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from spinemri.errors import LimitError

MB = 1 << 20


@dataclass(frozen=True)
class Limit:
    variable: str
    default: int
    unit: int = 1  # bytes per unit of the variable's value (MB for the *_MB ones)
    what: str = ""

    @property
    def value(self) -> int:
        """The limit in its base unit (pixels, bytes or files)."""
        raw = os.environ.get(self.variable, "").strip()
        if not raw:
            return self.default * self.unit
        try:
            number = float(raw)
        except ValueError:
            raise LimitError(f"{self.variable}={raw!r} is not a number; set it to a positive number "
                             f"({self.what}, default {self.default})") from None
        if not (number > 0 and math.isfinite(number)):
            raise LimitError(f"{self.variable}={raw!r} must be > 0 and finite ({self.what}, default "
                             f"{self.default})")
        value = int(number * self.unit)
        if value < 1 or (self.unit == 1 and number != int(number)):
            raise LimitError(f"{self.variable}={raw!r} must be a whole number >= 1 ({self.what}, default "
                             f"{self.default})" if self.unit == 1 else
                             f"{self.variable}={raw!r} is below one byte ({self.what}, default {self.default})")
        return value

    def describe(self) -> str:
        """'the limit of 128 MB per file (SPINEMRI_MAX_IMAGE_MB; raise it to accept more)'."""
        amount = human_size(self.value) if self.unit == MB else f"{self.value:,}"
        return f"the limit of {amount} {self.what} ({self.variable}: raise it to accept larger inputs)"


IMAGE_PIXELS = Limit("SPINEMRI_MAX_IMAGE_PIXELS", 4096 * 4096, what="pixels per image")
IMAGE_BYTES = Limit("SPINEMRI_MAX_IMAGE_MB", 128, MB, what="of decoded pixels per file")
STUDY_BYTES = Limit("SPINEMRI_MAX_STUDY_MB", 512, MB, what="per unpacked study archive")
STUDY_FILE_BYTES = Limit("SPINEMRI_MAX_STUDY_FILE_MB", 128, MB, what="per file in a study archive")
STUDY_FILES = Limit("SPINEMRI_MAX_STUDY_FILES", 5000, what="files per study archive")
REQUEST_BYTES = Limit("SPINEMRI_MAX_REQUEST_MB", 768, MB, what="per request body")
ANSWER_BYTES = Limit("SPINEMRI_MAX_ANSWER_MB", 16, MB, what="per DICOMweb JSON answer")
ALL = (IMAGE_PIXELS, IMAGE_BYTES, STUDY_BYTES, STUDY_FILE_BYTES, STUDY_FILES, REQUEST_BYTES, ANSWER_BYTES)


def image_problem(rows: int, columns: int, frames: int = 1, samples: int = 1, bits: int = 16) -> str | None:
    """Why an image of this declared geometry may not be decoded, or None if it may.

    ``bits`` is BitsAllocated (8, 16, 32, ...); the budget counts what the decoder allocates.
    """
    pixels = int(rows) * int(columns)
    if pixels > IMAGE_PIXELS.value:
        return f"declares a {columns} x {rows} image ({pixels:,} pixels), over {IMAGE_PIXELS.describe()}"
    decoded = pixels * max(int(frames), 1) * max(int(samples), 1) * max((int(bits) + 7) // 8, 1)
    if decoded > IMAGE_BYTES.value:
        shape = f"{frames} frame(s) of {columns} x {rows}" + (f" x {samples} samples" if samples > 1 else "")
        return f"declares {shape} at {bits} bits ({human_size(decoded)} decoded), over {IMAGE_BYTES.describe()}"
    return None


def human_size(size: int) -> str:
    if size >= 1 << 30:
        return f"{size / (1 << 30):.1f} GB"
    return f"{size / MB:.0f} MB" if size >= MB else f"{size / 1024:.0f} KB"
