"""Errors of the edge image tools, with the CLI's exit codes (1 check failed, 2 bad input, 3 missing tool).

`edge_image` imports `runtime.common` only, so it cannot raise `appliance.errors`; the CLI maps these the same way.
"""

from __future__ import annotations


class ImageError(Exception):
    """Base class: a message for the user, an optional hint, and the exit code the CLI uses."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class ImageCheckFailed(ImageError):
    """A verification found something wrong (a tampered byte, a wrong header, a failed read-back)."""

    exit_code = 1


class ImageBadInput(ImageError):
    """The user's input cannot be used: a missing file, a refused target, a tree that does not fit."""

    exit_code = 2


class ImageMissingTool(ImageError):
    """A program the step needs is not installed."""

    exit_code = 3
