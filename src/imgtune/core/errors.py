"""Errors a user can cause. The CLI prints each as one line (what, where, how to fix) and exits 2."""


class ImgtuneError(Exception):
    """Base of every error imgtune raises on purpose.

    Args:
        message: what went wrong and where.
        hint: what the user can do about it, if anything.
    """

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ConfigError(ImgtuneError):
    """A bad config value, config file or `--set` override."""


class DataError(ImgtuneError):
    """A dataset that cannot be used: missing path, no classes, no training images."""


class WeightsError(ImgtuneError):
    """Pretrained weights that cannot be found, downloaded or loaded."""


class JobError(ImgtuneError):
    """A job that does not exist, cannot be resumed or is in the wrong state."""


class DownloadError(ImgtuneError):
    """A download that failed or whose size or checksum does not match."""
