"""The one base class of errors that are the user's to fix (a config key, a data row, a model path, a
reward function, a judge endpoint). The CLI prints these as one line and exits 2; any other exception
is a bug in alignkit and shows its traceback."""


class UserError(Exception):
    """An error whose message tells the user what to change; printed without a traceback."""


class UsageError(UserError, ValueError):
    """A command-line option, job setting or input that cannot be used as given (also a ValueError,
    so pydantic validators report it as a validation error)."""
