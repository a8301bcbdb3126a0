"""Every compiled backend against the reference (pysafegeom/ops/reference.py), through the public ops.

Each op is forced onto a backend with ``backend=``; a backend that cannot run here is skipped with its
reason. Tolerance (docs/STYLE): a kernel's error against a float64 evaluation of the same formula must be
at most ``C`` times the error of the plain PyTorch reference run in the same precision, plus a small
floor. Ops with an exact definition (gather, accumulation order, top-k order) must match exactly.
Triton runs under the interpreter on CPU (tests/conftest.py), so its sizes are kept small.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pysafegeom import ops
from pysafegeom.ops import BackendUnavailable, OpInputError, _backends, reference

KERNEL_BACKENDS = ["cpp", "cuda", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
C = 3.0  # allowed multiple of the same-precision reference's error
EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _device(name: str) -> str:
    if name == "cuda" or (name == "triton" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


@pytest.fixture(params=KERNEL_BACKENDS)
def backend(request):
    name = request.param
    mod, why = _backends.load(name)
    if mod is None:
        pytest.skip(f"backend {name} unavailable: {why}")
    if _device(name) not in mod.DEVICES:
        pytest.skip(f"backend {name} runs on {mod.DEVICES}, not {_device(name)}")
    return name


def _small(name: str) -> bool:
    return name == "triton" and not torch.cuda.is_available()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed, dtype=torch.float32, device="cpu", scale=1.0):
    """Fresh normal values (never zeros), made on CPU for reproducibility, then moved."""
    t = torch.randn(*shape, generator=_gen(seed), dtype=torch.float32) * scale
    return t.to(device=device, dtype=dtype)


def _basis(d, k, seed, device="cpu"):
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=_gen(seed), dtype=torch.float64))
    return q.to(device=device, dtype=torch.float32)


def _call(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except BackendUnavailable as exc:  # e.g. a backend that does not implement this op or dtype
        pytest.skip(str(exc))


def assert_within(got, ref64, torch_lowp, dtype, what="", floor_mult=2.0):
    """|got - ref64| <= C * |torch_lowp - ref64| + floor, elementwise maxima, in float64."""
    got, ref64, torch_lowp = (t.detach().to("cpu", torch.float64) for t in (got, ref64, torch_lowp))
    assert got.shape == ref64.shape, (what, got.shape, ref64.shape)
    assert torch.isfinite(got).all(), f"{what}: non-finite output"
    scale = max(1.0, ref64.abs().max().item())
    k_err = (got - ref64).abs().max().item()
    t_err = (torch_lowp - ref64).abs().max().item()
    floor = floor_mult * EPS[dtype] * scale
    assert k_err <= C * t_err + floor, f"{what}: kernel error {k_err:.3g} > {C} x torch error {t_err:.3g} + {floor:.2g}"


# --- 1. gather and accumulate ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,P,d", [(5, 9, 3, 577), (1, 4, 1, 64), (3, 7, 2, 33)])
def test_gather_positions(backend, dtype, B, T, P, d):
    dev = _device(backend)
    hidden = _randn(B, T, d, seed=1, dtype=dtype, device=dev)
    positions = torch.randint(0, T, (B, P), generator=_gen(2)).to(dev)
    got = _call(ops.gather_positions, hidden, positions, backend=backend)
    assert torch.equal(got, reference.gather_positions(hidden, positions))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_positions_noncontiguous(backend, dtype):
    dev = _device(backend)
    B, T, d = 4, 6, 577
    big = _randn(B, T, 2 * d, seed=3, dtype=dtype, device=dev)
    hidden = big[:, :, ::2]  # strided view
    positions = torch.randint(0, T, (3, B), generator=_gen(4)).to(dev, torch.int32).T  # int32, transposed
    got = _call(ops.gather_positions, hidden, positions, backend=backend)
    assert torch.equal(got, reference.gather_positions(hidden.contiguous(), positions.long().contiguous()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("acc", ["float64", "kahan"])
@pytest.mark.parametrize("B,T,P,d,G", [(6, 8, 3, 577, 3), (1, 3, 1, 40, 1)])
def test_gather_accumulate(backend, dtype, acc, B, T, P, d, G):
    dev = _device(backend)
    if _small(backend):
        B, P, d = min(B, 3), min(P, 2), min(d, 129)
    hidden = _randn(B, T, d, seed=5, dtype=dtype, device=dev, scale=100.0)
    positions = torch.randint(0, T, (B, P), generator=_gen(6)).to(dev)
    groups = torch.randint(0, G, (B,), generator=_gen(7)).to(dev)
    sdt = torch.float64 if acc == "float64" else torch.float32

    def state():  # non-zero starting sums, as in a streaming run after some batches
        sums = _randn(G, P, d, seed=8, device=dev, scale=1e4).to(sdt)
        comp = None if acc == "float64" else _randn(G, P, d, seed=9, device=dev, scale=1e-4)
        counts = torch.arange(G, dtype=torch.int64, device=dev)
        return sums, counts, comp

    s_ref, c_ref, k_ref = state()
    ops.gather_accumulate(hidden, positions, groups, s_ref, c_ref, k_ref, backend="torch")
    for rep in range(2):  # twice: the same, deterministic result
        s, c, k = state()
        _call(ops.gather_accumulate, hidden, positions, groups, s, c, k, backend=backend)
        assert torch.equal(c, c_ref)
        if acc == "kahan" or backend == "cpp":  # the reference's order exactly: bitwise equal
            assert torch.equal(s, s_ref)
            if k is not None:
                assert torch.equal(k, k_ref)
        else:
            torch.testing.assert_close(s, s_ref, rtol=1e-12, atol=1e-9)


# --- 2. projection and ablation ---------------------------------------------------------------------

def _project64(x, Q, beta, alpha, v):
    x64, Q64 = x.to(torch.float64), Q.to(torch.float64)
    proj = x64 @ Q64
    out = x64 - beta * (proj @ Q64.T)
    if v is not None and alpha != 0.0:
        out = out + alpha * v.to(torch.float64)
    return out, proj


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,d,k", [(37, 577, 3), (1, 577, 1), (9, 64, 16), (5, 15, 2)])
@pytest.mark.parametrize("beta,alpha,use_v", [(1.0, 0.0, False), (0.6, 2.5, True), (-1.5, 0.0, False)])
def test_project_ablate(backend, dtype, N, d, k, beta, alpha, use_v):
    dev = _device(backend)
    if _small(backend):
        N, d = min(N, 5), min(d, 129)
    x = _randn(N, d, seed=10, dtype=dtype, device=dev, scale=3.0)
    Q = _basis(d, k, seed=11, device=dev)
    v = _randn(d, seed=12, device=dev) if use_v else None
    out, proj = _call(ops.project_ablate, x, Q, beta, alpha, v, return_proj=True, backend=backend)
    t_out, t_proj = ops.project_ablate(x, Q, beta, alpha, v, return_proj=True, backend="torch")
    r_out, r_proj = _project64(x, Q, beta, alpha, v)
    assert out.dtype == dtype and proj.dtype == torch.float32
    assert_within(out, r_out, t_out, dtype, "out")
    assert_within(proj, r_proj, t_proj, torch.float32 if dtype == torch.float32 else dtype, "proj")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced3d"])
def test_project_ablate_noncontiguous_and_inplace(backend, dtype, layout):
    dev = _device(backend)
    N, d, k = (3, 129, 4) if _small(backend) else (33, 577, 4)
    base = _randn(d, N, seed=13, dtype=dtype, device=dev)
    if layout == "contiguous":
        x = base.T.contiguous()
    elif layout == "transposed":
        x = base.T  # [N, d], non-contiguous
    else:
        x = _randn(2, N, 2 * d, seed=14, dtype=dtype, device=dev)[:, :, 1::2]  # [2, N, d] strided
    Q = _basis(d, k, seed=15, device=dev)
    v = _randn(d, seed=16, device=dev)
    r_out, r_proj = _project64(x.reshape(-1, d), Q, 0.8, 1.5, v)
    t_out, _ = ops.project_ablate(x, Q, 0.8, 1.5, v, return_proj=True, backend="torch")
    out = _call(ops.project_ablate, x, Q, 0.8, 1.5, v, backend=backend)
    assert out.shape == x.shape
    assert_within(out.reshape(-1, d), r_out, t_out.reshape(-1, d), dtype, "out")
    xi = x.clone() if layout == "contiguous" else x  # in place on the view itself for the strided cases
    x_before = xi.clone()
    got, proj = _call(ops.project_ablate, xi, Q, 0.8, 1.5, v, inplace=True, return_proj=True, backend=backend)
    assert got is xi
    assert_within(xi.reshape(-1, d), r_out, t_out.reshape(-1, d), dtype, "inplace out")
    # proj is taken from x before it was overwritten
    _, r_proj0 = _project64(x_before.reshape(-1, d), Q, 0.8, 1.5, v)
    torch.testing.assert_close(proj.reshape(-1, k).double().cpu(), r_proj0.cpu(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual_dim", [0, 1])
@pytest.mark.parametrize("inplace", [False, True])
def test_orthogonalize_weight(backend, dtype, residual_dim, inplace):
    dev = _device(backend)
    d, m, k = (129, 7, 3) if _small(backend) else (577, 301, 3)
    shape = (d, m) if residual_dim == 0 else (m, d)
    W = _randn(*shape, seed=17, dtype=dtype, device=dev, scale=0.05)
    Q = _basis(d, k, seed=18, device=dev)
    W64, Q64 = W.to(torch.float64), Q.to(torch.float64)
    r = W64 - Q64 @ (Q64.T @ W64) if residual_dim == 0 else W64 - (W64 @ Q64) @ Q64.T
    t = ops.orthogonalize_weight(W, Q, residual_dim, backend="torch")
    Wk = W.clone()
    with torch.no_grad():
        got = _call(ops.orthogonalize_weight, Wk, Q, residual_dim, inplace=inplace, backend=backend)
    assert (got is Wk) == inplace and got.dtype == dtype
    if not inplace:
        assert torch.equal(Wk, W)
    assert_within(got, r, t, dtype, f"residual_dim={residual_dim}")


def test_orthogonalize_weight_noncontiguous(backend):
    dev = _device(backend)
    d, m = 577, (6 if _small(backend) else 129)
    W = _randn(m, d, seed=19, device=dev).T  # [d, m] view of a transposed tensor
    Q = _basis(d, 2, seed=20, device=dev)
    W64, Q64 = W.to(torch.float64), Q.to(torch.float64)
    r = W64 - Q64 @ (Q64.T @ W64)
    with torch.no_grad():
        got = _call(ops.orthogonalize_weight, W, Q, 0, backend=backend)
        t = ops.orthogonalize_weight(W, Q, 0, backend="torch")
        assert_within(got, r, t, torch.float32)
        _call(ops.orthogonalize_weight, W, Q, 0, inplace=True, backend=backend)
    assert_within(W, r, t, torch.float32, "inplace on a view")


# --- 3. chunked cross-entropy and masked top-k -----------------------------------------------------

def _ce64(h, W, targets, ignore_index):
    h64 = h.detach().to(torch.float64).requires_grad_(True)
    W64 = W.to(torch.float64)
    valid = targets != ignore_index
    logits = h64 @ W64.T
    loss = F.cross_entropy(logits, torch.where(valid, targets, 0), reduction="none") * valid
    (g,) = torch.autograd.grad(loss.sum(), h64)
    return loss.detach(), g


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,d,V,chunk", [(13, 577, 1000, 300), (1, 64, 97, 8192), (7, 33, 250, 1), (9, 128, 513, 64)])
def test_chunked_cross_entropy(backend, dtype, N, d, V, chunk):
    dev = _device(backend)
    if _small(backend):
        N, d, V, chunk = min(N, 3), min(d, 129), min(V, 150), max(chunk, 40)
    h = _randn(N, d, seed=21, dtype=dtype, device=dev)
    W = _randn(V, d, seed=22, dtype=dtype, device=dev, scale=d**-0.5 * 4)
    targets = torch.randint(0, V, (N,), generator=_gen(23)).to(dev)
    if N > 2:
        targets[1] = -100
    loss, grad = _call(ops.chunked_cross_entropy, h, W, targets, chunk_size=chunk, return_grad=True, backend=backend)
    t_loss, t_grad = ops.chunked_cross_entropy(h, W, targets, chunk_size=chunk, return_grad=True, backend="torch")
    r_loss, r_grad = _ce64(h, W, targets, -100)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert_within(loss, r_loss, t_loss, torch.float32 if dtype == torch.float32 else dtype, "loss", floor_mult=8)
    assert_within(grad, r_grad, t_grad, dtype, "grad", floor_mult=8)
    if N > 2:
        assert loss[1].item() == 0.0 and (grad[1] == 0).all()
    only = _call(ops.chunked_cross_entropy, h, W, targets, chunk_size=chunk, backend=backend)
    torch.testing.assert_close(only, loss, rtol=1e-5, atol=1e-5)


def test_chunked_cross_entropy_custom_ignore_and_noncontiguous(backend):
    dev = _device(backend)
    N, d, V = (3, 40, 70) if _small(backend) else (11, 96, 333)
    h = _randn(d, N, seed=24, device=dev).T
    W = _randn(d, V, seed=25, device=dev).T
    targets = torch.randint(0, V, (N,), generator=_gen(26)).to(dev)
    targets[0] = 7 if V > 7 else 0
    targets[-1] = -1
    loss, grad = _call(ops.chunked_cross_entropy, h, W, targets.to(torch.int32), chunk_size=64, return_grad=True,
                       ignore_index=-1, backend=backend)
    t_loss, t_grad = ops.chunked_cross_entropy(h, W, targets, chunk_size=64, return_grad=True, ignore_index=-1,
                                               backend="torch")
    r_loss, r_grad = _ce64(h, W, targets, -1)
    assert_within(loss, r_loss, t_loss, torch.float32, "loss", floor_mult=8)
    assert_within(grad, r_grad, t_grad, torch.float32, "grad", floor_mult=8)
    assert loss[-1].item() == 0.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,V,k", [(4, 1000, 16), (1, 50, 1), (3, 301, 300), (2, 5000, 256)])
@pytest.mark.parametrize("mask", ["none", "ids", "bool", "current", "both"])
def test_masked_topk(backend, dtype, L, V, k, mask):
    dev = _device(backend)
    if _small(backend):
        V, k = min(V, 300), min(k, 20)
    grad = _randn(L, V, seed=27, dtype=dtype, device=dev)
    grad[:, ::7] = grad[:, 3:4]  # ties, broken by the smaller index
    forbidden = current = None
    if mask in ("ids", "both"):
        forbidden = torch.randperm(V, generator=_gen(28))[: V // 10].to(dev)
    if mask == "bool":
        forbidden = (torch.rand(V, generator=_gen(29)) < 0.2).to(dev)
    if mask in ("current", "both"):
        current = torch.randint(0, V, (L,), generator=_gen(30)).to(dev)
    fmask = forbidden
    n_forb = 0 if forbidden is None else (int(forbidden.sum()) if forbidden.dtype == torch.bool else forbidden.numel())
    k = min(k, V - n_forb - (1 if current is not None else 0))
    got = _call(ops.masked_topk, grad, k, fmask, current, backend=backend)
    want = ops.masked_topk(grad, k, fmask, current, backend="torch")
    assert got.dtype == torch.int64 and got.shape == (L, k)
    assert torch.equal(got.cpu(), want.cpu())


def test_sample_candidates_same_on_every_backend(backend):
    dev = _device(backend)
    L, V = 6, 400
    ids = torch.randint(0, V, (L,), generator=_gen(31)).to(dev)
    grad = _randn(L, V, seed=32, device=dev)
    a = _call(ops.sample_candidates, ids, grad, 32, topk=16, n_replace=2, seed=5, backend=backend)
    b = ops.sample_candidates(ids, grad, 32, topk=16, n_replace=2, seed=5, backend="torch")
    assert torch.equal(a.cpu(), b.cpu())


# --- autograd --------------------------------------------------------------------------------------

def test_project_ablate_autograd(backend):
    dev = _device(backend)
    N, d, k = (3 if _small(backend) else 17), 577, 3
    Q = _basis(d, k, seed=33, device=dev)
    v = _randn(d, seed=34, device=dev)
    g = _randn(N, d, seed=35, device=dev)
    grads = {}
    for name in ("torch", backend):
        x = _randn(N, d, seed=36, device=dev).requires_grad_(True)
        out = _call(ops.project_ablate, x, Q, 0.7, 1.3, v, backend=name)
        (out * g).sum().backward()
        grads[name] = x.grad
    x64 = _randn(N, d, seed=36, device=dev).double().requires_grad_(True)
    out64, _ = _project64(x64, Q, 0.7, 1.3, v)
    (out64 * g.double()).sum().backward()
    assert_within(grads[backend], x64.grad, grads["torch"], torch.float32, "d out / d x")


def test_project_ablate_autograd_gradcheck_cpp():
    if _backends.load("cpp")[0] is None:
        pytest.skip(f"backend cpp unavailable: {_backends.load('cpp')[1]}")
    # The Jacobian is I - beta Q Q^T: check J^T u for random u against the explicit matrix.
    d, k = 40, 2
    Q = _basis(d, k, seed=37)
    x = _randn(3, d, seed=38).requires_grad_(True)
    u = _randn(3, d, seed=39)
    out = ops.project_ablate(x, Q, 0.5, backend="cpp")
    (gx,) = torch.autograd.grad(out, x, u)
    J = torch.eye(d, dtype=torch.float64) - 0.5 * Q.double() @ Q.double().T
    torch.testing.assert_close(gx.double(), u.double() @ J, rtol=1e-5, atol=1e-6)


def test_chunked_cross_entropy_backward(backend):
    dev = _device(backend)
    N, d, V = (3, 40, 90) if _small(backend) else (9, 130, 517)
    W = _randn(V, d, seed=40, device=dev, scale=0.2)
    targets = torch.randint(0, V, (N,), generator=_gen(41)).to(dev)
    targets[0] = -100
    wts = _randn(N, seed=42, device=dev)
    grads = {}
    for name in ("torch", backend):
        h = _randn(N, d, seed=43, device=dev).requires_grad_(True)
        loss = _call(ops.chunked_cross_entropy, h, W, targets, chunk_size=100, backend=name)
        (loss * wts).sum().backward()
        grads[name] = h.grad
    h64 = _randn(N, d, seed=43, device=dev).double().requires_grad_(True)
    valid = targets != -100
    l64 = F.cross_entropy(h64 @ W.double().T, torch.where(valid, targets, 0), reduction="none") * valid
    (l64 * wts.double()).sum().backward()
    assert_within(grads[backend], h64.grad, grads["torch"], torch.float32, "d loss / d h", floor_mult=8)


# --- bad input: the same OpInputError from every backend ---------------------------------------------

def _bad_cases(dev):
    h = _randn(2, 5, 16, seed=50, device=dev)
    pos = torch.tensor([[0, 1], [2, 3]], device=dev)
    Q = _basis(16, 2, seed=51, device=dev)
    notorth = Q * 1.5
    x = _randn(4, 16, seed=52, device=dev)
    W = _randn(30, 16, seed=53, device=dev)
    return {
        "wrong dtype": lambda b: ops.gather_positions(h.double(), pos, backend=b),
        "int hidden": lambda b: ops.project_ablate(x.long(), Q, backend=b),
        "positions out of range": lambda b: ops.gather_positions(h, pos + 4, backend=b),
        "negative position": lambda b: ops.gather_positions(h, pos - 1, backend=b),
        "mismatched d": lambda b: ops.project_ablate(x[:, :15], Q, backend=b),
        "non-orthonormal Q": lambda b: ops.project_ablate(x, notorth, backend=b),
        "empty batch": lambda b: ops.project_ablate(x[:0], Q, backend=b),
        "empty gather batch": lambda b: ops.gather_positions(h[:0], pos[:0], backend=b),
        "CE mismatched d": lambda b: ops.chunked_cross_entropy(x, W[:, :15], torch.zeros(4, dtype=torch.long,
                                                                                           device=dev), backend=b),
        "CE target out of range": lambda b: ops.chunked_cross_entropy(x, W, torch.full((4,), 30, device=dev),
                                                                      backend=b),
        "topk too large": lambda b: ops.masked_topk(W, 17, backend=b),
        "orthogonalize bad residual_dim": lambda b: ops.orthogonalize_weight(W, Q, 2, backend=b),
        "accumulate bad sums": lambda b: ops.gather_accumulate(
            h, pos, torch.zeros(2, dtype=torch.long, device=dev), torch.zeros(1, 2, 16, device=dev),
            torch.zeros(1, dtype=torch.long, device=dev), None, backend=b),
    }


@pytest.mark.parametrize("case", sorted(_bad_cases("cpu")))
@pytest.mark.parametrize("name", ["torch"] + KERNEL_BACKENDS)
def test_bad_input_same_error(name, case):
    if name != "torch":
        mod, why = _backends.load(name)
        if mod is None:
            pytest.skip(f"backend {name} unavailable: {why}")
    dev = _device(name)
    with pytest.raises(OpInputError) as want:
        _bad_cases(dev)[case]("torch")
    with pytest.raises(OpInputError) as got:
        _bad_cases(dev)[case](name)
    assert str(got.value) == str(want.value)


# --- dispatch ------------------------------------------------------------------------------------

def test_forced_unavailable_backend_raises_with_reason(monkeypatch):
    monkeypatch.setitem(_backends._cache, "cpp", (None, "extension not built: test reason"))
    x, Q = _randn(2, 8, seed=60), _basis(8, 1, seed=61)
    with pytest.raises(BackendUnavailable, match="test reason"):
        ops.project_ablate(x, Q, backend="cpp")
    monkeypatch.setenv(_backends.ENV_VAR, "cpp")
    with pytest.raises(BackendUnavailable, match="test reason"):
        ops.project_ablate(x, Q)


def test_forced_backend_wrong_device_raises():
    mod, _ = _backends.load("cuda")
    if mod is not None and torch.cuda.is_available():
        x, Q = _randn(2, 8, seed=62), _basis(8, 1, seed=63)  # CPU tensors on the CUDA backend
        with pytest.raises(BackendUnavailable):
            ops.project_ablate(x, Q, backend="cuda")
    else:
        with pytest.raises(BackendUnavailable, match="not available: .+"):
            ops.project_ablate(_randn(2, 8, seed=62), _basis(8, 1, seed=63), backend="cuda")


def test_env_var_selects_backend(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv(_backends.ENV_VAR, "torch")
    assert ops.select_backend("project_ablate", cpu, torch.float32)[0] == "torch"
    monkeypatch.setenv(_backends.ENV_VAR, "auto")
    auto = ops.select_backend("project_ablate", cpu, torch.float32)[0]
    assert auto == ("cpp" if _backends.load("cpp")[0] is not None else "torch")
    if _backends.load("cpp")[0] is not None:
        monkeypatch.setenv(_backends.ENV_VAR, "cpp")
        assert ops.select_backend("project_ablate", cpu, torch.float32)[0] == "cpp"
        x, Q = _randn(3, 8, seed=64), _basis(8, 1, seed=65)
        torch.testing.assert_close(ops.project_ablate(x, Q), reference.project_ablate(x, Q)[0])
    # the keyword wins over the environment
    assert ops.select_backend("project_ablate", cpu, torch.float32, backend="torch")[0] == "torch"
    monkeypatch.setenv(_backends.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match="PYSAFEGEOM_BACKEND"):
        ops.select_backend("project_ablate", cpu, torch.float32)


def test_build_info_reports_extension():
    from pysafegeom.ops import _ext

    ok, why = _ext.load()
    info = _ext.build_info()
    if ok:
        assert info.startswith("cpu")
    else:
        assert info == why and "extension" in why
