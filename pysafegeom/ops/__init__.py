"""The op layer: validated public ops that dispatch to the fastest available backend.

Public ops (shapes in the docstrings of :mod:`pysafegeom.ops.reference`, which is also the fallback):

* :func:`gather_positions`, :func:`gather_accumulate`: activation capture at chosen positions.
* :func:`project_ablate`, :func:`orthogonalize_weight`: directional ablation / addition, weight edits.
* :func:`chunked_cross_entropy`, :func:`sample_candidates`: GCG candidate scoring and sampling.

Dispatch: ``PYSAFEGEOM_BACKEND=torch|cpp|cuda|triton`` (or ``backend=`` on a call) forces a backend,
and a forced backend that cannot run raises :class:`BackendUnavailable` saying why. Otherwise the first
backend in ``_backends.PREFERENCE[device]`` that is available and supports the dtype runs, and the
reference runs when none does.

Backend contract (what ``pysafegeom/ops/_{cpp,cuda,triton}.py`` implement): inputs validated and
contiguous, Q and v float32 contiguous, outputs pre-allocated by this module and passed in:

* ``gather_positions(hidden, positions, out)``
* ``gather_accumulate(hidden, positions, groups, sums, counts, comp_or_None)``
* ``project_ablate(x, Q, beta, alpha, v_or_None, out, proj_or_None)``; ``out`` may be ``x`` itself
* ``orthogonalize_weight(W, Q, residual_dim, out)``; ``out`` may be ``W`` itself
* ``chunked_cross_entropy(h, W, targets, chunk_size, ignore_index, loss, grad_or_None)``; grad float32
* ``masked_topk(grad, k, forbidden_or_None, current_or_None) -> [L, k] int64``

Autograd: :func:`project_ablate` is differentiable in ``x`` (its backward is the same projection, run
by the same backend); :func:`chunked_cross_entropy` is differentiable in ``h`` but not in ``W`` (pass
``W.detach()``). Gradients with respect to ``Q`` or ``v`` run the reference path.
"""

from __future__ import annotations

import torch

from ..errors import InvalidArgument
from . import _backends, reference

__all__ = [
    "BackendUnavailable",
    "OpInputError",
    "gather_positions",
    "gather_accumulate",
    "project_ablate",
    "orthogonalize_weight",
    "chunked_cross_entropy",
    "masked_topk",
    "sample_candidates",
    "select_backend",
    "backend_report",
]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class BackendUnavailable(RuntimeError):
    """A backend was forced that cannot run these inputs here."""


class OpInputError(InvalidArgument):
    """Bad input to an op: the same error whichever backend would have run (a ``ValueError``)."""


def backend_report() -> dict[str, str]:
    return _backends.report()


def select_backend(op: str, device: torch.device, dtype: torch.dtype, backend: str | None = None):
    """Return (name, module or None for the reference) for one call."""
    name = backend or _backends.forced()
    if name is not None:
        if name == "torch":
            return "torch", None
        mod, why = _backends.load(name)
        if mod is None:
            raise BackendUnavailable(f"backend {name!r} was forced but is not available: {why}")
        if device.type not in mod.DEVICES:
            raise BackendUnavailable(
                f"backend {name!r} was forced but runs on {'/'.join(mod.DEVICES)}, and the inputs are on {device.type}"
            )
        if dtype not in mod.DTYPES:
            raise BackendUnavailable(f"backend {name!r} was forced but does not support {dtype}")
        if not hasattr(mod, op):
            raise BackendUnavailable(f"backend {name!r} was forced but does not implement {op}")
        return name, mod
    for name in _backends.PREFERENCE.get(device.type, ("torch",)):
        if name == "torch":
            break
        mod, _ = _backends.load(name)
        if mod is not None and device.type in mod.DEVICES and dtype in mod.DTYPES and hasattr(mod, op):
            return name, mod
    return "torch", None


# --- validation helpers ---------------------------------------------------------------------------

class _Memo:
    """Results of checks that need a device sync, remembered per (live tensor, version, key).

    Hooks call an op many times with the same basis or positions tensor; the orthonormality and range
    checks (which read values back from the device) then run once, not on every call. An entry only
    matches the very same tensor object, unmodified since (``_version``).
    """

    def __init__(self, size: int = 64):
        self.size = size
        self.entries: dict[tuple, tuple] = {}

    def get(self, t: torch.Tensor, key: tuple):
        e = self.entries.get((id(t),) + key)
        if e is not None and e[0]() is t and e[1] == t._version:
            return e[2]
        return None

    def put(self, t: torch.Tensor, key: tuple, value) -> None:
        import weakref

        if len(self.entries) >= self.size:
            self.entries.pop(next(iter(self.entries)))
        try:
            self.entries[(id(t),) + key] = (weakref.ref(t), t._version, value)
        except TypeError:  # not weak-referenceable: do not remember
            pass


_memo = _Memo()

def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise OpInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise OpInputError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def _check_index(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int64, torch.int32):
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise OpInputError(f"{name} must be an integer tensor (int64 or int32), got {got}")


def _check_rank(name: str, t: torch.Tensor, rank: int, shape: str) -> None:
    if t.dim() != rank:
        raise OpInputError(f"{name} must have shape {shape} ({rank} dims), got {tuple(t.shape)}")


def _check_nonempty(name: str, n: int) -> None:
    if n == 0:
        raise OpInputError(f"{name} is empty: the batch has no rows")


def _same_device(**tensors: torch.Tensor | None) -> None:
    devs = {k: v.device for k, v in tensors.items() if v is not None}
    if len(set(devs.values())) > 1:
        raise OpInputError("inputs are on different devices: " + ", ".join(f"{k}={v}" for k, v in devs.items()))


def _prepare_basis(Q: torch.Tensor, d: int, orthonormal: bool, device: torch.device) -> torch.Tensor:
    """Q as float32 contiguous [d, k]; checked orthonormal, or orthonormalised when the caller says it is not."""
    key = ("basis", d, orthonormal, str(device))
    hit = _memo.get(Q, key) if isinstance(Q, torch.Tensor) else None
    if hit is not None:
        return hit
    Qf = _prepare_basis_uncached(Q, d, orthonormal, device)
    _memo.put(Q, key, Qf)
    return Qf


def _prepare_basis_uncached(Q: torch.Tensor, d: int, orthonormal: bool, device: torch.device) -> torch.Tensor:
    _check_float("Q", Q) if Q.dtype != torch.float64 else None
    if Q.dim() == 1:
        Q = Q[:, None]
    _check_rank("Q", Q, 2, "[d, k]")
    if Q.shape[0] != d:
        raise OpInputError(f"Q has {Q.shape[0]} rows but the inputs have width d={d}")
    k = Q.shape[1]
    if not 1 <= k <= 16:
        raise OpInputError(f"Q must have between 1 and 16 columns (k), got {k}")
    Qf = Q.detach().to(device=device, dtype=torch.float32)
    if not torch.isfinite(Qf).all():
        raise OpInputError("Q contains NaN or infinite values")
    if orthonormal:
        gram = Qf.T @ Qf
        err = (gram - torch.eye(k, device=device)).abs().max().item()
        if err > 1e-3:
            raise OpInputError(
                f"Q is not orthonormal (max |Q^T Q - I| = {err:.3g}); pass orthonormal=False to orthonormalise it"
            )
    else:
        Qf, r = torch.linalg.qr(Qf.to(torch.float64))
        if (r.diagonal().abs() < 1e-10).any():
            raise OpInputError("Q's columns are linearly dependent; cannot orthonormalise")
        Qf = Qf.to(torch.float32)
    return Qf.contiguous()


# --- 1. gather and streaming statistics -----------------------------------------------------------

def _check_positions(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    _check_float("hidden", hidden)
    _check_rank("hidden", hidden, 3, "[B, T, d]")
    _check_index("positions", positions)
    _check_rank("positions", positions, 2, "[B, P]")
    _same_device(hidden=hidden, positions=positions)
    B, T, _ = hidden.shape
    _check_nonempty("hidden", B)
    if positions.shape[0] != B:
        raise OpInputError(f"positions has {positions.shape[0]} rows but hidden has batch size {B}")
    if positions.shape[1] == 0:
        raise OpInputError("positions has no columns (P = 0)")
    hit = _memo.get(positions, ("positions", T))
    if hit is not None:
        return hit
    lo, hi = int(positions.min()), int(positions.max())
    if lo < 0 or hi >= T:
        raise OpInputError(f"positions must lie in [0, T) = [0, {T}); got values from {lo} to {hi}")
    out = positions.to(torch.int64).contiguous()
    _memo.put(positions, ("positions", T), out)
    return out


def gather_positions(hidden: torch.Tensor, positions: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """``hidden [B, T, d]`` at ``positions [B, P]`` -> ``[B, P, d]`` (see :func:`reference.gather_positions`)."""
    positions = _check_positions(hidden, positions)
    name, mod = select_backend("gather_positions", hidden.device, hidden.dtype, backend)
    if mod is None:
        return reference.gather_positions(hidden, positions)
    B, P = positions.shape
    out = torch.empty(B, P, hidden.shape[2], dtype=hidden.dtype, device=hidden.device)
    mod.gather_positions(hidden.contiguous(), positions, out)
    return out


def gather_accumulate(
    hidden: torch.Tensor,
    positions: torch.Tensor,
    groups: torch.Tensor,
    sums: torch.Tensor,
    counts: torch.Tensor,
    comp: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> None:
    """Add ``hidden`` at ``positions`` into ``sums[groups]`` (float64, or float32 Kahan with ``comp``), in place."""
    positions = _check_positions(hidden, positions)
    B, P = positions.shape
    d = hidden.shape[2]
    _check_index("groups", groups)
    if groups.dim() != 1 or groups.shape[0] != B:
        raise OpInputError(f"groups must have shape [B] = [{B}], got {tuple(groups.shape)}")
    if not isinstance(sums, torch.Tensor) or sums.dim() != 3 or tuple(sums.shape[1:]) != (P, d):
        got = tuple(sums.shape) if isinstance(sums, torch.Tensor) else type(sums).__name__
        raise OpInputError(f"sums must have shape [G, P, d] = [G, {P}, {d}], got {got}")
    G = sums.shape[0]
    if sums.dtype == torch.float64:
        if comp is not None:
            raise OpInputError("comp (Kahan compensation) is only used with float32 sums; float64 sums need none")
    elif sums.dtype == torch.float32:
        if comp is None or comp.shape != sums.shape or comp.dtype != torch.float32:
            raise OpInputError("float32 sums need comp, a float32 tensor of the same shape (Kahan compensation)")
    else:
        raise OpInputError(f"sums must be float64, or float32 with Kahan compensation; got {sums.dtype}")
    if counts.dtype != torch.int64 or counts.shape != (G,):
        raise OpInputError(f"counts must be int64 of shape [G] = [{G}], got {counts.dtype} {tuple(counts.shape)}")
    for nm, t in (("sums", sums), ("counts", counts), ("comp", comp)):
        if t is not None and not t.is_contiguous():
            raise OpInputError(f"{nm} is updated in place and must be contiguous")
    _same_device(hidden=hidden, groups=groups, sums=sums, counts=counts, comp=comp)
    groups = groups.to(torch.int64).contiguous()
    glo, ghi = int(groups.min()), int(groups.max())
    if glo < 0 or ghi >= G:
        raise OpInputError(f"groups must lie in [0, G) = [0, {G}); got values from {glo} to {ghi}")
    name, mod = select_backend("gather_accumulate", hidden.device, hidden.dtype, backend)
    if mod is None:
        reference.gather_accumulate(hidden, positions, groups, sums, counts, comp)
    else:
        mod.gather_accumulate(hidden.contiguous(), positions, groups, sums, counts, comp)


# --- 2. projection, ablation, addition ------------------------------------------------------------

class _ProjectAblate(torch.autograd.Function):
    """Autograd in x: d out / d x = I - beta Q Q^T (symmetric), so backward is the same op."""

    @staticmethod
    def forward(ctx, x2, Qf, beta, alpha, vf, return_proj, mod):
        out = torch.empty_like(x2)
        proj = torch.empty(x2.shape[0], Qf.shape[1], dtype=torch.float32, device=x2.device) if return_proj else None
        mod.project_ablate(x2, Qf, beta, alpha, vf, out, proj)
        ctx.save_for_backward(Qf)
        ctx.beta, ctx.mod = beta, mod
        if proj is None:
            proj = torch.empty(0, device=x2.device)
        ctx.mark_non_differentiable(proj)
        return out, proj

    @staticmethod
    def backward(ctx, g_out, g_proj):
        (Qf,) = ctx.saved_tensors
        g = g_out.contiguous()
        gx = torch.empty_like(g)
        ctx.mod.project_ablate(g, Qf, ctx.beta, 0.0, None, gx, None)
        return gx, None, None, None, None, None, None


def project_ablate(
    x: torch.Tensor,
    Q: torch.Tensor,
    beta: float = 1.0,
    alpha: float = 0.0,
    v: torch.Tensor | None = None,
    *,
    inplace: bool = False,
    return_proj: bool = False,
    orthonormal: bool = True,
    backend: str | None = None,
):
    """``x - beta * Q (Q^T x) + alpha * v`` over the last dim of ``x [..., d]``.

    ``Q [d, k]`` (or ``[d]``) must be orthonormal when ``orthonormal=True`` (checked), else it is
    orthonormalised here. Returns ``out`` (same shape and dtype as x; x itself when ``inplace``) or
    ``(out, proj [..., k] float32)`` when ``return_proj``.
    """
    _check_float("x", x)
    if x.dim() < 1:
        raise OpInputError("x must have at least one dimension [..., d]")
    d = x.shape[-1]
    lead = x.shape[:-1]
    n = x.numel() // d if d else 0
    _check_nonempty("x", n)
    for nm, val in (("beta", beta), ("alpha", alpha)):
        if not isinstance(val, (int, float)) or val != val or val in (float("inf"), float("-inf")):
            raise OpInputError(f"{nm} must be a finite number, got {val!r}")
    Qf = _prepare_basis(Q, d, orthonormal, x.device)
    vf = None
    if v is not None:
        if not isinstance(v, torch.Tensor) or v.shape != (d,):
            raise OpInputError(f"v must have shape [d] = [{d}], got {tuple(v.shape) if isinstance(v, torch.Tensor) else v}")
        if alpha == 0:
            raise OpInputError("v is given but alpha=0, so v would be ignored: the op adds alpha * v; pass alpha= "
                               "(1.0 adds v once), or v=None for ablation only")
        if not v.is_floating_point() or not bool(torch.isfinite(v).all()):
            raise OpInputError("v must be a floating-point tensor of finite values (it holds NaN, infinities or integers)")
        vf = v.detach().to(device=x.device, dtype=torch.float32).contiguous()
    if inplace and x.requires_grad and torch.is_grad_enabled():
        raise OpInputError("inplace=True on a tensor that requires grad; use inplace=False under autograd")

    needs_ref_grad = torch.is_grad_enabled() and (Q.requires_grad or (v is not None and v.requires_grad))
    name, mod = select_backend("project_ablate", x.device, x.dtype, backend)
    if mod is None or needs_ref_grad:
        if needs_ref_grad:  # differentiate through the reference with the caller's Q and v
            Qg = Q if Q.dim() == 2 else Q[:, None]
            out, proj = reference.project_ablate(x.reshape(n, d), Qg, beta, alpha, v, False, return_proj)
            if inplace:
                x.copy_(out.reshape(x.shape))
                out = x
        else:
            out, proj = reference.project_ablate(x.reshape(n, d), Qf, beta, alpha, vf, False, return_proj)
            if inplace:
                x.copy_(out.reshape(x.shape))
                out = x
    else:
        x2 = x.reshape(n, d)
        if inplace:
            xc = x2 if x2.is_contiguous() and x2.data_ptr() == x.data_ptr() and x.is_contiguous() else x2.contiguous()
            proj = torch.empty(n, Qf.shape[1], dtype=torch.float32, device=x.device) if return_proj else None
            mod.project_ablate(xc, Qf, float(beta), float(alpha), vf, xc, proj)
            if xc.data_ptr() != x.data_ptr() or not x.is_contiguous():
                x.copy_(xc.reshape(x.shape))
            out = x
        elif x.requires_grad and torch.is_grad_enabled():
            out, proj = _ProjectAblate.apply(x2.contiguous(), Qf, float(beta), float(alpha), vf, return_proj, mod)
            proj = proj if return_proj else None
        else:
            xc = x2.contiguous()
            out = torch.empty_like(xc)
            proj = torch.empty(n, Qf.shape[1], dtype=torch.float32, device=x.device) if return_proj else None
            mod.project_ablate(xc, Qf, float(beta), float(alpha), vf, out, proj)
    if out is not x:
        out = out.reshape(x.shape)
    if return_proj:
        return out, proj.reshape(*lead, Qf.shape[1])
    return out


def orthogonalize_weight(
    W: torch.Tensor,
    Q: torch.Tensor,
    residual_dim: int = 0,
    *,
    inplace: bool = False,
    orthonormal: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    """Remove span(Q) from the residual side of ``W`` (see :func:`reference.orthogonalize_weight`)."""
    _check_float("W", W)
    _check_rank("W", W, 2, "[d, m] or [m, d]")
    if residual_dim not in (0, 1):
        raise OpInputError(f"residual_dim must be 0 (W [d, m]) or 1 (W [m, d]), got {residual_dim!r}")
    d = W.shape[residual_dim]
    _check_nonempty("W", W.numel())
    Qf = _prepare_basis(Q, d, orthonormal, W.device)
    if W.requires_grad and torch.is_grad_enabled():
        raise OpInputError("orthogonalize_weight edits weights; call it under torch.no_grad()")
    name, mod = select_backend("orthogonalize_weight", W.device, W.dtype, backend)
    if mod is None:
        return reference.orthogonalize_weight(W, Qf, residual_dim, inplace)
    Wc = W.contiguous()
    out = Wc if inplace else torch.empty_like(Wc)
    mod.orthogonalize_weight(Wc, Qf, residual_dim, out)
    if inplace and Wc.data_ptr() != W.data_ptr():
        W.copy_(Wc)
        return W
    return W if inplace else out


# --- 3. GCG: chunked cross-entropy and candidate sampling -----------------------------------------

class _ChunkedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, W, targets, chunk_size, ignore_index, mod):
        loss = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        grad = torch.empty(h.shape, dtype=torch.float32, device=h.device)
        mod.chunked_cross_entropy(h, W, targets, chunk_size, ignore_index, loss, grad)
        ctx.save_for_backward(grad)
        ctx.h_dtype = h.dtype
        return loss

    @staticmethod
    def backward(ctx, g_loss):
        (grad,) = ctx.saved_tensors
        return (g_loss[:, None] * grad).to(ctx.h_dtype), None, None, None, None, None


class _RefModule:
    """The reference behind the backend contract, so the autograd wrapper serves every path."""

    @staticmethod
    def chunked_cross_entropy(h, W, targets, chunk_size, ignore_index, loss, grad):
        lo, gr = reference.chunked_cross_entropy(h, W, targets, chunk_size, grad is not None, ignore_index)
        loss.copy_(lo)
        if grad is not None:
            grad.copy_(gr)


def chunked_cross_entropy(
    h: torch.Tensor,
    W: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_size: int = 8192,
    return_grad: bool = False,
    ignore_index: int = -100,
    backend: str | None = None,
):
    """Per-row CE of ``h [N, d] @ W [V, d]^T`` vs ``targets [N]`` without materialising ``[N, V]`` logits.

    Returns ``loss [N]`` float32, or ``(loss, grad_h [N, d])`` when ``return_grad``. Differentiable in
    ``h`` through autograd as well (``W`` must not require grad).
    """
    _check_float("h", h)
    _check_float("W", W)
    _check_rank("h", h, 2, "[N, d]")
    _check_rank("W", W, 2, "[V, d]")
    _check_index("targets", targets)
    _check_rank("targets", targets, 1, "[N]")
    _same_device(h=h, W=W, targets=targets)
    N, d = h.shape
    V = W.shape[0]
    _check_nonempty("h", N)
    if W.shape[1] != d:
        raise OpInputError(f"W has width {W.shape[1]} but h has width d={d}")
    if targets.shape[0] != N:
        raise OpInputError(f"targets has {targets.shape[0]} entries but h has {N} rows")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise OpInputError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    valid = targets != ignore_index
    if valid.any():
        tv = targets[valid]
        if int(tv.min()) < 0 or int(tv.max()) >= V:
            raise OpInputError(f"targets must lie in [0, V) = [0, {V}) or equal ignore_index={ignore_index}")
    if W.requires_grad and torch.is_grad_enabled():
        raise OpInputError("chunked_cross_entropy does not differentiate with respect to W; pass W.detach()")
    targets = targets.to(torch.int64).contiguous()
    name, mod = select_backend("chunked_cross_entropy", h.device, h.dtype, backend)
    if W.dtype != h.dtype:
        W = W.to(h.dtype)
    mod = mod if mod is not None else _RefModule
    hc, Wc = h.contiguous(), W.contiguous()
    if h.requires_grad and torch.is_grad_enabled():
        loss = _ChunkedCE.apply(hc, Wc, targets, chunk_size, ignore_index, mod)
        if return_grad:
            with torch.no_grad():
                _, g = chunked_cross_entropy(h.detach(), W, targets, chunk_size=chunk_size, return_grad=True,
                                             ignore_index=ignore_index, backend=name)
            return loss, g
        return loss
    loss = torch.empty(N, dtype=torch.float32, device=h.device)
    grad = torch.empty(N, d, dtype=torch.float32, device=h.device) if return_grad else None
    mod.chunked_cross_entropy(hc, Wc, targets, chunk_size, ignore_index, loss, grad)
    if return_grad:
        return loss, grad.to(h.dtype)
    return loss


def masked_topk(
    grad: torch.Tensor,
    k: int,
    forbidden: torch.Tensor | None = None,
    current: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Top-``k`` token ids per row of ``-grad [L, V]``, never a forbidden or the current id -> ``[L, k]``."""
    _check_float("grad", grad)
    _check_rank("grad", grad, 2, "[L, V]")
    L, V = grad.shape
    _check_nonempty("grad", L)
    if not isinstance(k, int) or k < 1:
        raise OpInputError(f"topk must be a positive integer, got {k!r}")
    fmask = None
    if forbidden is not None:
        if forbidden.dtype == torch.bool:
            if forbidden.shape != (V,):
                raise OpInputError(f"a forbidden mask must have shape [V] = [{V}], got {tuple(forbidden.shape)}")
            fmask = forbidden.to(grad.device).contiguous()
        else:
            _check_index("forbidden", forbidden)
            if forbidden.numel() and (int(forbidden.min()) < 0 or int(forbidden.max()) >= V):
                raise OpInputError(f"forbidden token ids must lie in [0, {V})")
            fmask = torch.zeros(V, dtype=torch.bool, device=grad.device)
            fmask[forbidden.to(grad.device).long()] = True
    n_allowed = V - (int(fmask.sum()) if fmask is not None else 0) - (1 if current is not None else 0)
    if k > n_allowed:
        raise OpInputError(f"topk={k} but only {n_allowed} token ids are allowed per position")
    cur = None
    if current is not None:
        _check_index("current", current)
        if current.shape != (L,):
            raise OpInputError(f"current ids must have shape [L] = [{L}], got {tuple(current.shape)}")
        if int(current.min()) < 0 or int(current.max()) >= V:
            raise OpInputError(f"current ids must lie in [0, {V})")
        cur = current.to(device=grad.device, dtype=torch.int64).contiguous()
    name, mod = select_backend("masked_topk", grad.device, grad.dtype, backend)
    if mod is None:
        return reference.masked_topk(grad, k, fmask, cur)
    return mod.masked_topk(grad.contiguous(), k, fmask, cur)


def sample_candidates(
    ids: torch.Tensor,
    grad: torch.Tensor,
    width: int,
    topk: int = 256,
    n_replace: int = 1,
    forbidden: torch.Tensor | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    *,
    exclude_current: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    """GCG candidates: ``width`` copies of ``ids [L]``, each with ``n_replace`` distinct positions replaced.

    Each replacement at position i is drawn uniformly from the top-``topk`` tokens of ``-grad[i]``
    (``grad [L, V]`` is the token gradient), excluding ``forbidden`` ids and the current ``ids[i]``, so
    every candidate differs from ``ids`` in exactly ``n_replace`` positions (``exclude_current=False``
    lets the current id be drawn, as nanoGCG does, so no-op candidates can occur). Random draws come from
    ``generator`` (or a CPU generator seeded with ``seed``) and are independent of the backend, so a seed
    reproduces the same candidates on every backend. Returns ``[width, L]`` int64 on ids' device.
    """
    _check_index("ids", ids)
    _check_rank("ids", ids, 1, "[L]")
    L = ids.shape[0]
    _check_float("grad", grad)
    if grad.dim() != 2 or grad.shape[0] != L:
        raise OpInputError(f"grad must have shape [L, V] with L = len(ids) = {L}, got {tuple(grad.shape)}")
    if not isinstance(width, int) or width < 1:
        raise OpInputError(f"width must be a positive integer, got {width!r}")
    if not isinstance(n_replace, int) or not 1 <= n_replace <= L:
        raise OpInputError(f"n_replace must be between 1 and L = {L}, got {n_replace!r}")
    if not bool(torch.isfinite(grad).all()):
        bad = (~torch.isfinite(grad)).nonzero()[0].tolist()
        raise OpInputError(f"grad contains NaN or infinite values (first at [{bad[0]}, {bad[1]}]): the token gradient "
                           "of a diverged loss cannot rank candidates; check the loss (a float16 overflow?)")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise OpInputError(f"seed must be an int or None, got {type(seed).__name__} {seed!r}")
    top = masked_topk(grad, topk, forbidden, ids if exclude_current else None, backend=backend)  # [L, topk]
    if generator is None:
        generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
    pos = torch.rand(width, L, generator=generator).argsort(dim=1)[:, :n_replace]  # [width, n_replace]
    pick = torch.randint(0, topk, (width, n_replace), generator=generator)
    pos, pick = pos.to(ids.device), pick.to(ids.device)
    new_tok = top[pos, pick]  # [width, n_replace]
    cand = ids.to(torch.int64).unsqueeze(0).repeat(width, 1)
    cand.scatter_(1, pos, new_tok)
    return cand
