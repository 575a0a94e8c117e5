"""quota-sidecar: a gRPC quota sidecar for AI generation workers, backed by Redis."""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("quota-sidecar")
except _metadata.PackageNotFoundError:  # pragma: no cover - running from a tree that was never installed
    __version__ = "0+unknown"
