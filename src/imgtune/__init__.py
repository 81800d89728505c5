"""imgtune: train, tune, debug, profile and serve image classifiers on your own machine."""

__version__ = "0.1.0"
