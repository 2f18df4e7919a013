"""The two errors of the erasure trainers: a bad setting (before any work) and training that cannot go on."""

from __future__ import annotations

__all__ = ["ConfigError", "TrainingError"]


class ConfigError(ValueError):
    """An invalid trainer configuration; raised before any work, the message names the field and the fix."""


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, unusable pipeline or checkpoint); the message says why."""
