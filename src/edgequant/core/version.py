"""The installed edgequant version, read once from the package metadata (pyproject.toml)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edgequant")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "unknown"
