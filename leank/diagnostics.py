"""Messages the library gives once per process: INFO for choices, WARNING + ``warnings.warn``
for surprises a user must see even with no logging configured (the package logger has only a
``NullHandler``)."""

from __future__ import annotations

import functools
import logging
import warnings


@functools.lru_cache(maxsize=None)
def log_once(logger_name: str, msg: str) -> None:
    """``logging.getLogger(logger_name).info(msg)``, the first time only."""
    logging.getLogger(logger_name).info(msg)


@functools.lru_cache(maxsize=None)
def warn_once(logger_name: str, msg: str, category: type = UserWarning) -> None:
    """Log ``msg`` as a WARNING and raise it as a ``category`` warning, the first time only."""
    logging.getLogger(logger_name).warning(msg)
    warnings.warn(msg, category, stacklevel=3)
