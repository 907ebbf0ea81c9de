"""Error types that map onto the CLI's exit codes.

0 ok, 1 a check or verification failed, 2 bad input, 3 missing environment.
Anything raised as an ApplianceError is shown to the user as a message, never a traceback.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    CHECK_FAILED = 1
    BAD_INPUT = 2
    MISSING_ENVIRONMENT = 3


class ApplianceError(Exception):
    """Base class: carries the exit code the CLI should use."""

    exit_code: ExitCode = ExitCode.CHECK_FAILED

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class CheckFailed(ApplianceError):
    exit_code = ExitCode.CHECK_FAILED


class BadInput(ApplianceError):
    exit_code = ExitCode.BAD_INPUT


class MissingEnvironment(ApplianceError):
    exit_code = ExitCode.MISSING_ENVIRONMENT


class ServiceError(ApplianceError):
    """An embedded or external service did not start or did not answer as it should."""

    exit_code = ExitCode.CHECK_FAILED
