"""User-facing error types. The CLI turns each into one line and exit code 2; internal bugs stay tracebacks."""

from __future__ import annotations


class UserError(Exception):
    """An error caused by the user's input, carrying where it happened (file, line or key)."""

    def __init__(self, message: str, *, where: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.where = where

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


class ConfigError(UserError):
    """A config file or override is invalid: unknown key, bad value, impossible combination."""


class DataError(UserError):
    """A data file is unreadable or holds invalid rows."""


class UnknownFormat(DataError):
    """No format fits a file's columns (`where` is the file); `data inspect` profiles it instead of failing."""


class ModelError(UserError):
    """A model cannot be found or loaded."""


class CheckpointError(UserError):
    """A checkpoint that must not be loaded: its write never finished, its files changed since, or its format
    could run code."""


class TrainingFault(RuntimeError):
    """Training cannot go on (the loss is no longer finite, a reward function failed); finished work is already
    saved. Not a UserError: the CLI reports it with exit code 1."""


class SaveFailed(TrainingFault):
    """A checkpoint could not be written (a full disk, a lost mount); the newest complete one is untouched."""
