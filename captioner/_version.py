"""The package version, alone in its file: the build reads it from here (pyproject.toml) without importing
the package, and the Dockerfile's dependency layer copies only this file, so code changes keep that layer cached."""

__version__ = "0.1.0"
