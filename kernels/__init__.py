"""Triton kernels for the pysafegeom ops (installed as ``pysafegeom.kernels``).

Each wrapper below has the *backend contract* of its op (see ``pysafegeom/ops/__init__.py``): inputs
validated and contiguous, Q and v float32, outputs allocated by the caller. The definitions are the
pure-PyTorch reference in ``pysafegeom/ops/reference.py``. Import this package only after deciding
whether Triton runs in its interpreter: ``TRITON_INTERPRET=1`` must be set before the kernels are
decorated (``pysafegeom.ops._triton`` and ``tests/conftest.py`` take care of that).
"""

from .cross_entropy import chunked_cross_entropy
from .gather import gather_accumulate, gather_positions
from .project import orthogonalize_weight, project_ablate
from .topk import masked_topk

__all__ = [
    "gather_positions",
    "gather_accumulate",
    "project_ablate",
    "orthogonalize_weight",
    "chunked_cross_entropy",
    "masked_topk",
]
