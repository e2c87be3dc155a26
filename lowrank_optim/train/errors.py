"""What a pretraining run raises or warns about once its settings have validated.

:class:`~lowrank_optim.train.config.PretrainConfig` refuses bad values as they are made; these
are the problems found later, when the run meets its checkpoint or its data. The command line
prints each error as one line with exit code 2 and each :class:`RunWarning` as one line.
"""

from __future__ import annotations

__all__ = ["NotEnoughDataError", "ResumeError", "RunSetupError", "RunWarning"]


class RunSetupError(ValueError):
    """The run cannot start as asked; the message names the file or value and what to do."""


class ResumeError(RunSetupError):
    """``resume`` cannot continue: a changed setting, or an unreadable or unfitting checkpoint."""


class NotEnoughDataError(RunSetupError):
    """The corpus is too small for the batches (training or validation) the settings ask for."""


class RunWarning(UserWarning):
    """A setting that makes part of the run do nothing, e.g. no hand-off can ever happen."""
