"""What every sub-command shares: the usage error and the silencing of import-time noise."""

from __future__ import annotations

import logging

__all__ = ["UsageError", "silence_import_noise"]


class UsageError(Exception):
    """A bad option value or input file: :func:`main` prints it as one line and exits with 2.

    Sub-commands raise it only for what they check before the real work starts; any other
    exception keeps its traceback, so a genuine bug is never reduced to one line.
    """


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
