"""ClinLinker-style clinical entity linking as a Spark batch job."""

__version__ = "0.1.0"
