"""worldgen: offline batch rendering with a chunked, causal LingBot-World-Fast video world model."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("worldgen")
except PackageNotFoundError:  # a source checkout without installed metadata
    __version__ = "0.0.0+unknown"
