"""Errors that the CLI turns into one line and exit code 2.

Every error raised for bad user input derives from :class:`MtrecError`, so callers
can catch one type; the message already names the file, column or key and what was
expected.
"""

from __future__ import annotations

__all__ = ["ConfigError", "DataError", "ModelError", "MtrecError", "SchemaError"]


class MtrecError(Exception):
    """Base class of every user-facing mtrec error."""


class ConfigError(MtrecError):
    """A config file, key, value or ``--set`` override is invalid."""


class SchemaError(MtrecError):
    """The feature/task schema does not fit the data or itself."""


class DataError(MtrecError):
    """A data file is unreadable or its content breaks the schema."""


class ModelError(MtrecError):
    """A model directory is missing, incomplete or corrupt."""
