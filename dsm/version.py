"""The version of dsm, one place for the package, its metrics and its OpenAPI document."""

__version__ = "0.3.0"
