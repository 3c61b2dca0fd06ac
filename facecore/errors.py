"""The project's own exceptions; the CLI turns each into a one-paragraph message."""

from __future__ import annotations


class FacecoreError(Exception):
    """Base of every error that is the user's to fix (bad input, config, files)."""

    exit_code = 1
    label = "Error"  # the CLI prints "<label>: <message>"


class ConfigError(FacecoreError):
    """A config file or override is invalid; carries every problem found, not just the first."""

    exit_code = 2

    def __init__(self, errors: list[str], source: str | None = None):
        self.errors = list(errors)
        self.source = source
        where = f" in {source}" if source else ""
        lines = [f"{len(self.errors)} problem(s){where}:"] + [f"  - {e}" for e in self.errors]
        super().__init__("\n".join(lines))


class PluginError(FacecoreError):
    """A plugin is unknown, duplicated, broken or misuses the hook contract."""


class DataError(FacecoreError):
    """A data file is missing, corrupt or does not match the config."""


class CheckpointError(FacecoreError):
    """A checkpoint cannot be read or belongs to another model."""


class TrainingError(FacecoreError):
    """Training cannot go on (non-finite loss, no device, ...)."""


class TrainingStopped(FacecoreError):
    """Training stopped on a signal (preemption) after writing last.pth; ``--resume`` continues it exactly."""

    exit_code = 75  # EX_TEMPFAIL: try again later
    label = "Stopped"
