"""The protocol's measurements (PROTOCOL.md sections 2 and 3): carriers, coupling, geometry, drift."""

from pysafegeom.protocol.metrics import *  # noqa: F401,F403
from pysafegeom.protocol.metrics import __all__ as _metrics_all

__all__ = list(_metrics_all)
