"""Exceptions with messages a data engineer can act on. Never include mention text in them."""

from __future__ import annotations


class ClinLinkerError(Exception):
    """Base class of every error the project raises on purpose."""


class ConfigError(ClinLinkerError):
    """A configuration file or override is invalid."""


class InputDataError(ClinLinkerError):
    """Input data (mentions, terminology, gold corpus) is malformed: missing column, bad row."""


class ModelLoadError(ClinLinkerError):
    """A model directory is missing, incomplete, or not a Hugging Face model."""


class ArtifactError(ClinLinkerError):
    """An artifact directory (index, model) is missing, corrupt, or does not match."""


class EncoderMismatchError(ArtifactError):
    """An index was built with another encoder than the one given to load or use it."""
