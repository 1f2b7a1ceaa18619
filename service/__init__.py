"""device-rebind: refreshes device keys on the IoT platform when a device is swapped."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("device-rebind")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
