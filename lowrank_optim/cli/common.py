"""What every sub-command shares: the usage error, one-line warnings, silencing import noise."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

__all__ = ["UsageError", "one_line_warnings", "silence_import_noise"]


class UsageError(Exception):
    """A bad option value or input file: :func:`main` prints it as one line and exits with 2.

    Sub-commands raise it only for what they check before the real work starts; any other
    exception keeps its traceback, so a genuine bug is never reduced to one line.
    """


@contextmanager
def one_line_warnings(command: str, category: type[Warning]) -> Iterator[None]:
    """Print warnings of ``category`` as ``lowrank-optim COMMAND: warning: ...`` on stderr.

    They are about the user's settings, so the file and line that raised them would only
    distract; every other warning is shown as Python shows it.
    """
    shown = warnings.showwarning

    def show(
        message: Warning | str,
        kind: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        if issubclass(kind, category):
            print(f"lowrank-optim {command}: warning: {message}", file=sys.stderr)
        else:
            shown(message, kind, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


class _DropMessages(logging.Filter):
    """Drops the records of one logger whose message contains any of ``fragments``."""

    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def silence_import_noise() -> None:
    """Silence the exact start-up warnings that torchao's import prints, nothing else.

    transformers imports torchao (its quantizer registry) whenever a model is built. torchao
    then logs ``Failed to load .../torchao/_C_*.so`` for the CUDA-only kernels it cannot load on
    this machine (its pure-PyTorch optimizers, used here, do not need them), and calls torch's
    deprecated ``register_constant`` on two Enum classes, which torch logs as a warning. Both
    are harmless; every other message of these loggers still gets through.
    """
    loaders = logging.getLogger("torchao")
    if not any(isinstance(f, _DropMessages) for f in loaders.filters):
        loaders.addFilter(_DropMessages("torchao/_C"))
    pytree = logging.getLogger("torch.utils._pytree")
    if not any(isinstance(f, _DropMessages) for f in pytree.filters):
        pytree.addFilter(_DropMessages("Calling register_constant() on Enum subclasses"))
