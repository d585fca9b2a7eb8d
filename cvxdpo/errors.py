"""Errors a user can cause and fix: bad config values, bad files, bad data.

Launchers print these as one line and exit; anything else is a bug and keeps
its traceback.
"""


class CvxdpoError(Exception):
    """Base of the errors that name a problem in the user's input."""


class ConfigError(CvxdpoError, ValueError):
    """A config value, model shape or mesh that cannot work."""


class DataError(CvxdpoError, ValueError):
    """A data file or row that cannot be read."""


class MissingFileError(CvxdpoError, FileNotFoundError):
    """A file or directory that the user named does not exist."""


class CheckpointError(CvxdpoError):
    """A checkpoint that is missing, damaged, or does not fit the run."""


class OutputError(CvxdpoError, OSError):
    """A run's output (checkpoint, metrics) cannot be written: a full disk, a lost mount, no permission."""


class TrainingDiverged(CvxdpoError):
    """The loss or log-probs became NaN, infinite or implausibly large; the last good checkpoint is kept."""


class TrainingStopped(CvxdpoError):
    """A stop was asked for (SIGTERM): the run wrote a checkpoint of its last step and rerunning resumes it."""
