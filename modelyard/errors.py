"""Errors a user can cause. The command line prints them as one message and exits 2."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's config, input, parameters or endpoints.

    ``problems`` holds every problem found (``validate`` lists them all); ``str()`` joins them.
    """

    def __init__(self, message: str, problems: list[str] | None = None):
        self.problems = problems or [message]
        super().__init__(message)

    def __str__(self) -> str:
        if len(self.problems) == 1:
            return self.problems[0]
        head = self.args[0]
        return head + "\n" + "\n".join(f"  - {p}" for p in self.problems)


class ConfigError(UserError):
    """The pipeline YAML is invalid."""


class InputError(UserError):
    """The input data cannot be read as configured."""


class EngineError(UserError):
    """A model server could not be started or reached."""
