"""The library's logger, ``logging.getLogger("fedunlearn")``, configured as any other.

Every module of fedunlearn logs through :data:`LOGGER` (``from .logs import log``, the
same call as Flower's ``flwr.common.logger.log``). By default its records go on to
Flower's logger (``flwr``): its console handler, the log files and the ``flwr run
--stream`` log of a ServerApp, its filters (service mode's quiet round lines) and its
propagation to the root logger. So the library's lines appear where Flower's appear, and
the launchers' console filter (:mod:`fedunlearn.console`) keeps reading them unchanged.

A user configures it as with any Python library::

    logging.getLogger("fedunlearn").setLevel(logging.WARNING)   # only warnings and errors
    logging.getLogger("fedunlearn").addHandler(handler)          # the lines also go there

The logger's level (``DEBUG``, as Flower's: the handlers choose what they show) decides
which records are made at all; Flower's console handler still shows ``INFO`` and up.
:data:`TO_FLOWER` is the handler that hands the records on; removing it
(``LOGGER.removeHandler(TO_FLOWER)``) detaches the library from Flower's handlers.

The harness's progress events (:func:`fedunlearn.console.emit`) are not library
messages but a channel between a ServerApp and its launcher: they go to Flower's logger
directly, so that silencing ``fedunlearn`` leaves the progress bar working.
"""

from __future__ import annotations

import logging

from flwr.common.logger import FLOWER_LOGGER

NAME = "fedunlearn"
"""The library's logger name (``logging.getLogger(NAME)``)."""


class _ToFlower(logging.Handler):
    """Hands a record to Flower's logger: its filters, its handlers, its propagation."""

    def emit(self, record: logging.LogRecord) -> None:
        FLOWER_LOGGER.handle(record)


LOGGER = logging.getLogger(NAME)
_HANDLER_NAME = "fedunlearn-to-flower"
# A reloaded module finds its handler on the logger (the logger outlives the module).
TO_FLOWER: logging.Handler = next(
    (h for h in LOGGER.handlers if h.get_name() == _HANDLER_NAME), None) or _ToFlower()
"""The handler of :data:`LOGGER` that passes its records on to Flower's logger."""
if TO_FLOWER not in LOGGER.handlers:
    TO_FLOWER.set_name(_HANDLER_NAME)
    LOGGER.addHandler(TO_FLOWER)
if LOGGER.level == logging.NOTSET:  # a level the user set before the import stays
    LOGGER.setLevel(logging.DEBUG)
# Flower's logger propagates to the root logger already: once is enough.
LOGGER.propagate = False

log = LOGGER.log  # the call sites' ``log(level, msg, *args)``, as Flower's ``log``

__all__ = ["LOGGER", "NAME", "TO_FLOWER", "log"]
