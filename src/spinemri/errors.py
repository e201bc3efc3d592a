"""Errors a user can cause and fix: each message names the file, row, option or setting and the fix.

The CLI prints any :class:`UserError` as one ``Error:`` line and exits with status 1, without a
traceback; anything else is a bug. The classes also derive from the built-in error a caller would
expect (``ValueError`` for bad values, ``FileExistsError`` for an existing output, ...).
"""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """Base for errors whose message names the problem and the fix."""


class ConfigError(UserError, ValueError):
    """A bad setting; the message names the key, the valid range and the value given."""


class LimitError(ConfigError):
    """A size-limit variable (SPINEMRI_MAX_*) that is not a positive number."""


class UnknownArchitecture(ConfigError):
    """A backbone name that is not in the catalog; the message lists the valid ones."""


class WeightsUnavailable(UserError, RuntimeError):
    """ImageNet weights that are neither cached nor downloadable; the message says how to provide them."""


class OutputExists(UserError, FileExistsError):
    """An output that would replace an existing file or folder without being asked to."""


class WorkerDied(UserError, RuntimeError):
    """A worker process that ended abruptly; the message names the usual causes and their fixes."""


class DatasetError(UserError, ValueError):
    """A dataset that cannot be used as it is; the message lists every problem found, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class ImageReadError(UserError, ValueError):
    """A file that cannot be turned into an image. ``str()`` names the file, the reason and the fix."""

    def __init__(self, path: str | Path, reason: str, hint: str | None = "skip it with --on-bad-file=skip"):
        self.path = str(path)
        self.reason = reason
        self.hint = hint
        super().__init__(f"{self.path} {reason}" + (f"; {hint}" if hint else ""))


class DicomReadError(ImageReadError):
    """A DICOM file that cannot be decoded (not DICOM, truncated, no pixels, no decoder, ...)."""


class ImageTooLarge(ImageReadError):
    """A file whose header declares more than a size limit allows (spinemri.data.limits); nothing was decoded."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(path, reason, None)


class SiteOutsideImage(UserError, ValueError):
    """An ROI centre that is not on its image: a label (or a request) to fix, not a file to skip."""


class PrepareError(UserError, RuntimeError):
    """A sample that could not be preprocessed (with --on-bad-file=stop)."""


class TrainingError(UserError, RuntimeError):
    """Training could not produce a model (the loss became NaN, a worker died, ...)."""


class TuningError(UserError, RuntimeError):
    """A study that cannot go on (its trials keep failing, a worker process failed, ...)."""


class RegistryError(UserError):
    """A registry request that cannot be met (unknown model or version, ...)."""


class MetricError(UserError, ValueError):
    """Labels or a submission that cannot be scored; the message names the rows and the fix."""


class EvaluationError(UserError):
    """A run or split that cannot be evaluated; the message names what is missing and what to do."""


class CompareError(UserError):
    """A comparison without the runs it needs."""


class EnsembleError(UserError):
    """An ensemble of models that cannot be built (not cross-validation runs, members that differ)."""


class StudyError(UserError):
    """A study request that cannot be met (no such study, no images, bad archive, ...)."""


class PredictError(UserError):
    """A predict job that cannot run (no input files, output folder missing, a bad file with --on-bad-file=stop)."""


class CardError(UserError):
    """A model card that cannot be written from a version's record; the message names what is missing."""


class ExportError(UserError, ValueError):
    """An export that cannot be made or does not match the Keras model."""
