"""Errors a user can fix by changing their input: a config key, a command-line flag, a file.

The `jetmoe` command prints these as one line (`jetmoe: error: ...`) and exits with status 2. Anything else
that escapes a command is a bug and keeps its traceback (exit status 1). Every class here is also a `ValueError`
(or `FileNotFoundError`), so library callers that catch the built-in types keep working.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input. `str(err)` is one line that names the key, flag or file and says what is expected."""


class ConfigError(UserError):
    """An experiment, model or data configuration value that is wrong or inconsistent."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the user named (or a run directory should hold) does not exist."""


class InputFileError(UserError):
    """A file that exists but cannot be used: empty, not UTF-8, truncated, corrupted, of the wrong kind."""


class RunFailure(Exception):
    """A run that stopped through no fault of its input nor of the code (its loss diverged, the disk filled up):
    the `jetmoe` command prints it as one line and exits with status 1; the last good checkpoint is kept."""


def choice_problem(name: str, value: object, choices: tuple) -> str | None:
    """The one-line message when `value` is not one of `choices`, else None."""
    if value in choices:
        return None
    return f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}"


def divisor_problem(name: str, value: int, total_name: str, total: int) -> str | None:
    """The one-line message when `value` does not divide `total`, else None."""
    if total % value == 0:
        return None
    return f"{name} ({value}) must divide {total_name} ({total})"


def check_choice(name: str, value: object, choices: tuple) -> None:
    """ConfigError naming `name` unless `value` is one of `choices`."""
    problem = choice_problem(name, value, choices)
    if problem:
        raise ConfigError(problem)
