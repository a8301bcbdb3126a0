"""pysafegeom's exception types. Each subclasses the built-in one a caller would expect, so code that catches
``ValueError``, ``TypeError``, ``FileNotFoundError`` or ``FileExistsError`` keeps working."""

from __future__ import annotations


class PysafegeomError(Exception):
    """Base of every error pysafegeom raises on purpose (the CLI prints these as one line, no traceback)."""


class InvalidArgument(PysafegeomError, ValueError):
    """An argument has the right type but a value that is not accepted (out of range, NaN, empty...)."""


class InvalidType(PysafegeomError, TypeError):
    """An argument has the wrong type (a string where a list belongs, a float where an int does...)."""


class InputFileError(PysafegeomError, ValueError):
    """A file the user gave is corrupt, truncated, of the wrong format or encoding."""


class MissingFile(PysafegeomError, FileNotFoundError):
    """A file or folder the user named does not exist, or lacks a file it needs."""


class OutputExists(PysafegeomError, FileExistsError):
    """An output path exists and was not written by pysafegeom (pass overwrite=True / --overwrite to replace it)."""


class OutputNotWritable(PysafegeomError, PermissionError):
    """An output path lies in a folder that cannot be written (read-only, no permission, a pseudo-filesystem)."""


class DataOverlap(PysafegeomError, ValueError):
    """Prompt sets overlap where they must be disjoint (fit vs evaluation, or a model's own training prompts)."""


class AttackError(InvalidArgument):
    """Bad input to an attack, or an attack that cannot go on (every candidate filtered out); a ``ValueError``."""


__all__ = ["AttackError", "DataOverlap", "InputFileError", "InvalidArgument", "InvalidType", "MissingFile", "OutputExists",
           "OutputNotWritable", "PysafegeomError"]
