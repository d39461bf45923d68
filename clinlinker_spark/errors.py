"""Exceptions with messages a data engineer can act on. Never include mention text in them."""

from __future__ import annotations

import re


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


# "Caused by: java.lang.RuntimeException: message" in a Java trace carried by a Spark error
_JAVA_CAUSE = re.compile(r"^Caused by: [\w$.]+: (.+)$", re.MULTILINE)
# "RuntimeError: message" ending a Python traceback (a Python worker's, inside a Spark error)
_PYTHON_LAST = re.compile(r"^([A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt)): (.+)$",
                          re.MULTILINE)


def root_cause(exc: BaseException) -> str:
    """One line saying what went wrong at the bottom of ``exc``: the last exception of a
    Python worker's traceback, else the innermost cause of a Java trace (Spark and Py4J errors
    carry both in their text), else the first line of the message; Spark's SQLSTATE suffix
    dropped. The line may name files and columns; the caller decides where it is logged."""
    text = str(exc).split("Driver stacktrace:", 1)[0]
    python = _PYTHON_LAST.findall(text)
    java = [c.strip() for c in _JAVA_CAUSE.findall(text) if c.strip()]
    if python:
        line = "{}: {}".format(*python[-1])
    elif java:
        line = java[-1]
    else:
        line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
        line = re.sub(r"^An error occurred while calling [\w.]+\.\s*", "", line)
    line = re.sub(r"\s*SQLSTATE: \w+\.?$", "", line)
    return line or type(exc).__name__


_JAVA_CAUSE_CLASS = re.compile(r"^Caused by: ([\w$.]+):", re.MULTILINE)


def root_cause_class(exc: BaseException) -> str:
    """The class name at the bottom of ``exc`` (no message: safe to record anywhere): the
    last exception of a Python worker's traceback, else the innermost Java cause's class,
    else the innermost chained Python exception's."""
    text = str(exc).split("Driver stacktrace:", 1)[0]
    python = _PYTHON_LAST.findall(text)
    if python:
        return python[-1][0]
    java = _JAVA_CAUSE_CLASS.findall(text)
    if java:
        return java[-1].rsplit(".", 1)[-1]
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return type(exc).__name__
