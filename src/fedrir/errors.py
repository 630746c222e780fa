"""The one exception type a user sees: a clear, one-line message naming the problem and the fix."""


class FedrirError(Exception):
    """Bad input or an unmet precondition, reported to the user without a traceback."""


class ConfigError(FedrirError, ValueError):
    """An invalid or unknown configuration key or value."""


class DataError(FedrirError):
    """A dataset that is missing, corrupt, or cannot be partitioned as asked."""


class Diverged(FedrirError):
    """A run stopped at a non-finite number in round ``round`` (its last checkpoint is kept)."""

    def __init__(self, round_: int, message: str) -> None:
        super().__init__(message)
        self.round = round_
