"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input from the user: a one-line message saying what, where and how to fix."""

    exit_code = 2


class TrainingDiverged(UserError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


class DataMissing(UserError):
    """A dataset's files are absent (see ``data.dataset.missing_data``): a problem of the machine, not the recipe."""
