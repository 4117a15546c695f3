"""The package version: one source for pyproject (dynamic), the report and `hf_repair.__version__`."""

__version__ = "0.1.0"
