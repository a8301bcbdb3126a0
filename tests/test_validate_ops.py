"""Bad inputs to the ops end in OpInputError (a pysafegeom InvalidArgument, a ValueError) naming the argument:
``v`` without ``alpha`` is an error, a NaN gradient cannot rank GCG candidates."""

from __future__ import annotations

import pytest
import torch

from pysafegeom import ops
from pysafegeom.ops import OpInputError
from validate_helpers import assert_clear

g = torch.Generator().manual_seed(0)
X = torch.randn(3, 8, generator=g)
Q = torch.linalg.qr(torch.randn(8, 2, generator=g))[0]
V8 = torch.randn(8, generator=g)
IDS = torch.tensor([1, 2, 3, 4])
GRAD = torch.randn(4, 50, generator=g)


def _with(t, idx, value):
    t = t.clone()
    t[idx] = value
    return t


CASES = [
    ("v given, alpha left at 0", lambda: ops.project_ablate(X, Q, v=V8), "v", "alpha"),
    ("v with NaN", lambda: ops.project_ablate(X, Q, alpha=1.0, v=_with(V8, 2, float("nan"))), "v"),
    ("v of another width", lambda: ops.project_ablate(X, Q, alpha=1.0, v=torch.randn(9)), "v"),
    ("beta NaN", lambda: ops.project_ablate(X, Q, beta=float("nan")), "beta"),
    ("alpha a string", lambda: ops.project_ablate(X, Q, alpha="1"), "alpha"),
    ("x of ints", lambda: ops.project_ablate(X.long(), Q), "x"),
    ("Q not orthonormal", lambda: ops.project_ablate(X, 2 * Q), "Q"),
    ("residual_dim 2", lambda: ops.orthogonalize_weight(torch.randn(8, 8), Q, residual_dim=2), "residual_dim"),
    ("grad with NaN", lambda: ops.sample_candidates(IDS, _with(GRAD, (1, 3), float("nan")), 4, topk=5, seed=0),
     "grad", "NaN"),
    ("grad with inf", lambda: ops.sample_candidates(IDS, _with(GRAD, (0, 0), float("inf")), 4, topk=5, seed=0),
     "grad"),
    ("grad of ints", lambda: ops.sample_candidates(IDS, GRAD.long(), 4, topk=5, seed=0), "grad"),
    ("grad of another length", lambda: ops.sample_candidates(IDS, GRAD[:-1], 4, topk=5, seed=0), "grad"),
    ("width 0", lambda: ops.sample_candidates(IDS, GRAD, 0, topk=5, seed=0), "width"),
    ("n_replace 0", lambda: ops.sample_candidates(IDS, GRAD, 4, topk=5, n_replace=0, seed=0), "n_replace"),
    ("topk 0", lambda: ops.sample_candidates(IDS, GRAD, 4, topk=0, seed=0), "topk"),
    ("ids of floats", lambda: ops.sample_candidates(IDS.float(), GRAD, 4, topk=5, seed=0), "ids"),
    ("seed a string", lambda: ops.sample_candidates(IDS, GRAD, 4, topk=5, seed="1"), "seed"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_op_input_is_a_clear_error(case):
    _, make, *names = case
    assert_clear(make, OpInputError, *names)


def test_v_with_alpha_still_adds():
    out = ops.project_ablate(X, Q, beta=0.0, alpha=1.0, v=V8, backend="torch")
    torch.testing.assert_close(out, X + V8)
