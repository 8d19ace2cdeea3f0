"""Service mode: a federation that trains continuously and serves unlearning requests
as they arrive (:class:`UnlearningService`; see :mod:`.loop`)."""

from .config import ServiceConfig, ServiceError
from .loop import UnlearningService
from .state import (
                    CHECKPOINT_FILE,
                    VERSIONS_DIR,
                    VERSIONS_FILE,
                    ServiceOutcome,
                    honoured_by,
                    read_versions,
)

__all__ = ["CHECKPOINT_FILE", "VERSIONS_DIR", "VERSIONS_FILE", "ServiceConfig", "ServiceError",
           "ServiceOutcome", "UnlearningService", "honoured_by", "read_versions"]
