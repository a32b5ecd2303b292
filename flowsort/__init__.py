"""flowsort: real-time DeepFlow classification for imaging flow cytometers."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("flowsort")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
