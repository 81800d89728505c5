"""imgtune: train, tune, debug, profile and serve image classifiers on your own machine."""

from imgtune.core.version import __version__

__all__ = ["__version__"]
