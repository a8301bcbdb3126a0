"""The protocol metrics measure what they say (PROTOCOL.md sections 2 and 3).

Four kinds of evidence:
  * planted geometry: synthetic activations with known carriers, fitted as the protocol fits them, must
    give back the planted coupling / subspace coupling / drift within a tolerance derived from the
    noise (see ``_angle_bound``), chosen so that the tolerance stays below 0.5 and the test can fail;
  * invariances: sign and positive scale of carriers, change of basis, and an orthogonal rotation of
    the residual space applied to every activation and carrier;
  * known values and brute-force references (Spearman, AUROC, principal angles);
  * clear errors on bad input.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pysafegeom.protocol import (
    CouplingProfile,
    DriftEntry,
    auroc,
    behaviour_distance,
    coupling,
    coupling_profile,
    difference_of_means,
    direction_drift,
    drift_report,
    effective_rank,
    latent_guard_scores,
    low_rank_basis,
    mid_band,
    principal_angles,
    process_correlation,
    readouts,
    spearman,
    subspace_coupling,
    subspace_drift,
    unit,
)

F64 = torch.float64
C_SAFE = 4.0  # safety factor on the noise-derived angular error (see _angle_bound)
PROP = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
seeds = st.integers(0, 2**31 - 1)


pytestmark = pytest.mark.usefixtures("one_thread")  # (small float64 SVDs: ~40x slower with threads on a busy machine)


# --- synthetic geometry --------------------------------------------------------------------------------

def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(g, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=F64)


def _rand_unit(g, d) -> torch.Tensor:
    v = _randn(g, d)
    return v / v.norm()


def _planted_pair(g, d: int, c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit H, R [d] with cos(H, R) = c exactly: R = c·H + sqrt(1 − c²)·H⊥."""
    H = _rand_unit(g, d)
    z = _randn(g, d)
    perp = z - (z @ H) * H
    perp = perp / perp.norm()
    return H, c * H + math.sqrt(max(0.0, 1 - c * c)) * perp


def _planted_subspaces(g, d: int, thetas: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal U_H, U_R [d, k] whose principal angles are exactly ``thetas``."""
    k = len(thetas)
    basis = torch.linalg.qr(_randn(g, d, 2 * k)).Q  # 2k orthonormal columns
    UH, Uperp = basis[:, :k], basis[:, k:]
    t = torch.tensor(thetas, dtype=F64)
    return UH, UH * torch.cos(t) + Uperp * torch.sin(t)


def _orthogonal(g, d: int) -> torch.Tensor:
    """A random orthogonal [d, d] (Haar: QR of a Gaussian with the signs of diag(R) fixed)."""
    Q, R = torch.linalg.qr(_randn(g, d, d))
    return Q * torch.sign(torch.diagonal(R))


def _angle_bound(sigma: float, d: int, n: int, signal: float) -> float:
    """Bound on the angle (radians) between a difference-of-means direction and the planted one.

    With n samples per group and per-coordinate noise σ, the fitted difference of means is
    signal·u + e with e ~ N(0, σ²·(2/n)·I_d), so ‖e‖ ≈ σ·sqrt(2d/n) (and ‖e‖ ≤ 2σ·sqrt(2d/n) except with
    probability < e^{−d/2} for d ≥ 16). The angle to u is at most arcsin(‖e‖/signal) ≤ 1.1·‖e‖/signal
    while ‖e‖/signal ≤ 0.4. So C_SAFE = 4 leaves a factor ~1.8 of margin over the 2 × 1.1 needed.
    """
    return C_SAFE * sigma * math.sqrt(2 * d / n) / signal


def _two_position_data(g, d, n, a, b, sigma, H, R):
    """Harmful (label 1, refused) and harmless (label 0, complied) activations at t_inst and t_post.

    x_inst = base_inst + label·a·H + σ·noise,  x_post = base_post + refused·b·R + σ·noise, n per group.
    """
    base_i, base_p = 3 * _rand_unit(g, d), 3 * _rand_unit(g, d)
    pos_i = base_i + a * H + sigma * _randn(g, n, d)
    neg_i = base_i + sigma * _randn(g, n, d)
    pos_p = base_p + b * R + sigma * _randn(g, n, d)
    neg_p = base_p + sigma * _randn(g, n, d)
    return pos_i, neg_i, pos_p, neg_p


# --- planted geometry: the fitted metric recovers the planted value --------------------------------------

@PROP
@given(
    seed=seeds,
    d=st.integers(16, 128),
    n=st.integers(64, 400),
    c=st.floats(0.0, 1.0),
    a=st.floats(1.0, 10.0),
    b=st.floats(1.0, 10.0),
    rel=st.floats(0.005, 0.06),
)
def test_planted_coupling_is_recovered(seed, d, n, c, a, b, rel):
    g = _gen(seed)
    sigma = rel * min(a, b) / math.sqrt(2 * d / n)  # noise level giving each angular bound <= C_SAFE·rel
    H, R = _planted_pair(g, d, c)
    pos_i, neg_i, pos_p, neg_p = _two_position_data(g, d, n, a, b, sigma, H, R)
    h_hat, r_hat = difference_of_means(pos_i, neg_i), difference_of_means(pos_p, neg_p)
    # |cos φ̂ − cos φ| <= |φ̂ − φ| <= ∠(ĥ, H) + ∠(r̂, R) (triangle inequality for angles between lines)
    bound = _angle_bound(sigma, d, n, a) + _angle_bound(sigma, d, n, b)
    assert bound < 0.5  # the tolerance is informative: a wrong metric would fail it
    kappa = coupling(h_hat, r_hat)
    assert abs(kappa - c) <= bound
    assert abs(direction_drift(h_hat, H)) <= _angle_bound(sigma, d, n, a) ** 2 / 2 + 1e-12  # 1 − cos φ <= φ²/2
    assert subspace_drift(r_hat, R) <= math.degrees(_angle_bound(sigma, d, n, b))


@PROP
@given(
    seed=seeds,
    L=st.integers(3, 12),
    d=st.integers(16, 64),
    n=st.integers(64, 256),
    rel=st.floats(0.005, 0.05),
    data=st.data(),
)
def test_planted_profile_is_recovered(seed, L, d, n, rel, data):
    g = _gen(seed)
    cs = data.draw(st.lists(st.floats(0.0, 1.0), min_size=L, max_size=L))
    a = b = 4.0
    sigma = rel * a / math.sqrt(2 * d / n)
    Hs, Rs = zip(*(_planted_pair(g, d, c) for c in cs))
    H, R = torch.stack(Hs), torch.stack(Rs)  # [L, d]
    base = _randn(g, L, d)
    X_pos_i = base + a * H + sigma * _randn(g, n, L, d)  # [n, L, d]
    X_neg_i = base + sigma * _randn(g, n, L, d)
    X_pos_p = base + b * R + sigma * _randn(g, n, L, d)
    X_neg_p = base + sigma * _randn(g, n, L, d)
    prof = coupling_profile(difference_of_means(X_pos_i, X_neg_i), difference_of_means(X_pos_p, X_neg_p))
    bound = 2 * _angle_bound(sigma, d, n, a)
    assert bound < 0.5
    truth = torch.tensor(cs, dtype=F64)
    assert isinstance(prof, CouplingProfile) and prof.per_layer.shape == (L,)
    assert torch.all((prof.per_layer - truth).abs() <= bound)
    lo, hi = prof.band
    assert abs(prof.mid_band_mean - truth[lo:hi].mean().item()) <= bound
    assert abs(prof.max - truth.max().item()) <= bound
    assert prof.per_layer[prof.argmax] == prof.per_layer.max()


@PROP
@given(
    seed=seeds,
    d=st.integers(16, 96),
    n=st.integers(96, 400),
    thetas=st.lists(st.floats(0.0, math.pi / 2), min_size=3, max_size=3),
    rel=st.floats(0.002, 0.04),
)
def test_planted_subspace_coupling_is_recovered(seed, d, n, thetas, rel):
    """Low-rank carriers (k = 3) of section 2.3 recover planted subspaces; κ_sub and drift follow.

    Rows of Δ are a·U z_j + noise with z_j ~ N(m, I_3), so σ_3 of the signal is about a·sqrt(n) and
    the noise (plus the error of μ(D⁻)) has operator norm about σ(sqrt(n) + 2 sqrt(d)). By Wedin, the
    largest principal angle between the fitted and planted subspaces is then about
    σ(1 + 2 sqrt(d/n))/a; C_SAFE absorbs the constants. Principal angles move by at most the sum of the
    two subspaces' largest errors, and |d cos²θ/dθ| <= 1, which bounds the κ_sub error.
    """
    g = _gen(seed)
    k, a = 3, 5.0
    sigma = rel * a / (1 + 2 * math.sqrt(d / n))
    eps = C_SAFE * sigma * (1 + 2 * math.sqrt(d / n)) / a
    bound = 2 * eps
    assert bound < 0.5
    UH, UR = _planted_subspaces(g, d, sorted(thetas))
    m = torch.tensor([2.0, 1.0, 0.5], dtype=F64)
    fitted = []
    for U in (UH, UR):
        base = _randn(g, d)
        X_neg = base + sigma * _randn(g, n, d)
        X_pos = base + a * (m + _randn(g, n, k)) @ U.T + sigma * _randn(g, n, d)
        Q = low_rank_basis(X_pos, X_neg.mean(0), k=k)
        assert torch.allclose(Q.T @ Q, torch.eye(k, dtype=F64), atol=1e-10)
        assert principal_angles(Q, U).max() <= eps
        fitted.append(Q)
    truth = sum(math.cos(t) ** 2 for t in thetas) / k
    assert abs(subspace_coupling(*fitted) - truth) <= bound
    true_angles = torch.tensor(sorted(thetas), dtype=F64)
    assert torch.all((principal_angles(*fitted) - true_angles).abs() <= bound)


@PROP
@given(seed=seeds, d=st.integers(16, 96), n=st.integers(64, 400), rel=st.floats(0.002, 0.04))
def test_low_rank_k1_is_the_mean_direction_when_rank1_dominated(seed, d, n, rel):
    """k = 1: the top singular direction of Δ matches unit(difference_of_means) when the shift dominates.

    Δ = 1·(aH − ē)ᵀ + N: a rank-1 signal of singular value a·sqrt(n) plus noise of operator norm about
    σ(sqrt(n) + sqrt(d)), so by Wedin the top singular direction is within about σ(1 + sqrt(d/n))/a of
    H; the difference of means is within σ·sqrt(2d/n)/a. Both are below ε = C_SAFE·σ(1 + 2 sqrt(d/n))/a,
    so the angle between them is at most 2ε and 1 − |cos| at most (2ε)²/2.
    """
    g = _gen(seed)
    a = 5.0
    sigma = rel * a / (1 + 2 * math.sqrt(d / n))
    H = _rand_unit(g, d)
    base = _randn(g, d)
    X_pos = base + a * H + sigma * _randn(g, n, d)
    X_neg = base + sigma * _randn(g, n, d)
    q = low_rank_basis(X_pos, X_neg.mean(0), k=1)[:, 0]
    dom = unit(difference_of_means(X_pos, X_neg))
    assert q @ dom > 0  # signed like the mean difference
    bound = 2 * C_SAFE * sigma * (1 + 2 * math.sqrt(d / n)) / a
    assert bound < 0.5
    assert 1 - coupling(q, dom) <= bound**2 / 2


def test_low_rank_k1_differs_from_mean_direction_when_spread_dominates():
    """Documented limit: a large per-example spread orthogonal to the shift wins the top singular value."""
    g = _gen(0)
    d, n = 32, 200
    H, U = _planted_pair(g, d, 0.0)
    z = _randn(g, n, 1)
    X_pos = 1.0 * H + 10.0 * (z - z.mean()) * U + 0.01 * _randn(g, n, d)  # spread along U, shift along H
    q = low_rank_basis(X_pos, torch.zeros(d, dtype=F64), k=1)[:, 0]
    assert coupling(q, U) > 0.99
    assert coupling(q, difference_of_means(X_pos, torch.zeros(1, d, dtype=F64))) < 0.2


def test_process_correlation_tracks_a_monotone_readout():
    """If the refusal readout is a monotone function of the harmfulness readout, ρ = 1 (section 3)."""
    g = _gen(1)
    d, n = 24, 120
    H, R = _planted_pair(g, d, 0.3)
    s = _randn(g, n)
    noise_i, noise_p = _randn(g, n, d), _randn(g, n, d)
    X_inst = 2.0 + s[:, None] * H + (noise_i - (noise_i @ H)[:, None] * H)  # noise orthogonal to H
    X_inst = X_inst - 2.0 * (torch.ones(d, dtype=F64) @ H) * H  # a base with no component along H
    X_post = torch.exp(s)[:, None] * R + (noise_p - (noise_p @ R)[:, None] * R)
    ro = readouts(X_inst, X_post, 3.0 * H, 0.5 * R)
    assert torch.allclose(ro.h, s) and torch.allclose(ro.r, torch.exp(s))
    assert process_correlation(ro.h, ro.r) == pytest.approx(1.0)
    assert process_correlation(ro.h, -ro.r) == pytest.approx(-1.0)


@PROP
@given(seed=seeds, d=st.integers(16, 64), n=st.integers(40, 200))
def test_latent_guard_null_and_planted(seed, d, n):
    """Held-out Latent Guard AUROC: ~0.5 when nothing is planted (within 5 s.d. of Mann–Whitney), 1 when
    the harmful shift dwarfs the noise."""
    g = _gen(seed)
    L = 3
    H = torch.stack([_rand_unit(g, d) for _ in range(L)])
    base = 4 * torch.stack([_rand_unit(g, d) for _ in range(L)])
    labels = torch.cat([torch.ones(n), torch.zeros(n)]).long()
    sd = math.sqrt((2 * n + 1) / (12 * n * n))
    for a, check in ((0.0, lambda v: abs(v - 0.5) <= 5 * sd), (30.0, lambda v: v == 1.0)):
        def sample(label):
            return base + label * a * H + _randn(g, n, L, d)

        tr_pos, tr_neg, te_pos, te_neg = sample(1), sample(0), sample(1), sample(0)
        scores = latent_guard_scores(torch.cat([te_pos, te_neg]), tr_pos.mean(0), tr_neg.mean(0))
        assert scores.shape == (2 * n,)
        assert check(auroc(scores, labels))


# --- invariances -------------------------------------------------------------------------------------------

def _scenario(g, d=20, n=30, L=6, k=3):
    """Random activations and carriers for the invariance tests."""
    return dict(
        h=_randn(g, d), r=_randn(g, d),
        H=_randn(g, L, d), R=_randn(g, L, d),
        QA=_randn(g, d, k), QB=_randn(g, d, k - 1),
        M=_randn(g, 4, d),
        X_inst=_randn(g, n, d), X_post=_randn(g, n, d),
        X=_randn(g, n, L, d), c_pos=_randn(g, L, d), c_neg=_randn(g, L, d),
        labels=torch.arange(n) % 2,
    )


def _metrics(s) -> dict[str, float]:
    ro = readouts(s["X_inst"], s["X_post"], s["h"], s["r"])
    prof = coupling_profile(s["H"], s["R"])
    rep = drift_report({"H": s["H"], "Q_H": s["QA"]}, {"H": s["R"], "Q_H": s["QB"]})
    return {
        "coupling": coupling(s["h"], s["r"]),
        "profile_mid": prof.mid_band_mean,
        "profile_max": prof.max,
        "profile_argmax": float(prof.argmax),
        **{f"profile_{i}": float(v) for i, v in enumerate(prof.per_layer)},
        "subspace_coupling": subspace_coupling(s["QA"], s["QB"]),
        **{f"angle_{i}": float(v) for i, v in enumerate(principal_angles(s["QA"], s["QB"]))},
        "erank": effective_rank(s["M"]),
        "rho": process_correlation(ro.h, ro.r),
        "auroc": auroc(latent_guard_scores(s["X"], s["c_pos"], s["c_neg"]), s["labels"]),
        "subspace_drift": subspace_drift(s["QA"], s["QB"]),
        "direction_drift": direction_drift(s["h"], s["r"]),
        "report_H_mean_deg": float(rep["H"].angle_deg.mean()),
        "report_H_dd": float(rep["H"].direction_drift.sum()),
        "report_Q_H": float(rep["Q_H"].angle_deg),
    }


def _assert_same(m1, m2, atol=1e-9):
    assert m1.keys() == m2.keys()
    for key in m1:
        assert m1[key] == pytest.approx(m2[key], abs=atol), key


@settings(max_examples=15, deadline=None)
@given(seed=seeds)
def test_invariant_to_rotation_of_residual_space(seed):
    g = _gen(seed)
    s = _scenario(g)
    Q = _orthogonal(g, s["h"].shape[0])
    rot = dict(s)
    for key in ("h", "r", "H", "R", "M", "X_inst", "X_post", "X", "c_pos", "c_neg"):
        rot[key] = s[key] @ Q.T  # vectors / rows [..., d]: x -> Q x
    for key in ("QA", "QB"):
        rot[key] = Q @ s[key]  # bases [d, k]
    _assert_same(_metrics(s), _metrics(rot))


@settings(max_examples=15, deadline=None)
@given(seed=seeds)
def test_invariant_to_sign_and_positive_scale_of_carriers(seed):
    """Carriers: each vector / row gets a random sign and positive scale, each basis a random invertible
    change of basis. ρ is signed, so the readout carriers get positive scales only (sign: next test)."""
    g = _gen(seed)
    s = _scenario(g)

    def sign_scale(shape):
        sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0).to(F64)
        return sign * torch.exp(_randn(g, *shape))

    t = dict(s)
    t["H"] = s["H"] * sign_scale((s["H"].shape[0], 1))
    t["R"] = s["R"] * sign_scale((s["R"].shape[0], 1))
    k = s["QA"].shape[1]
    t["QA"] = s["QA"] @ (_randn(g, k, k) + 3 * torch.eye(k, dtype=F64))
    t["QB"] = s["QB"] @ (_randn(g, k - 1, k - 1) + 3 * torch.eye(k - 1, dtype=F64))
    t["M"] = 7.5 * s["M"] * torch.where(torch.rand(4, 1, generator=g) < 0.5, -1.0, 1.0).to(F64)
    t["c_pos"] = s["c_pos"] * torch.exp(_randn(g, s["c_pos"].shape[0], 1))
    t["c_neg"] = s["c_neg"] * torch.exp(_randn(g, s["c_neg"].shape[0], 1))
    t["X"] = s["X"] * torch.exp(_randn(g, *s["X"].shape[:2], 1))  # per-activation scale too
    t["h"] = s["h"] * float(torch.exp(_randn(g, 1)))
    t["r"] = s["r"] * float(torch.exp(_randn(g, 1)))
    m_s, m_t = _metrics(s), _metrics(t)
    _assert_same(m_s, m_t, atol=1e-8)
    # the coupling and drifts also ignore the sign of h and r
    assert coupling(-s["h"], s["r"]) == pytest.approx(m_s["coupling"])
    assert direction_drift(s["h"], -3 * s["r"]) == pytest.approx(m_s["direction_drift"])
    # per-row positive scale of M is ignored once rows are normalised (the section 10.5 default)
    rows = torch.exp(_randn(g, 4, 1))
    assert effective_rank(s["M"] * rows, unit_rows=True) == pytest.approx(effective_rank(s["M"], unit_rows=True))


@settings(max_examples=10, deadline=None)
@given(seed=seeds)
def test_signed_metrics_flip_with_the_carrier_orientation(seed):
    """ρ and the Latent Guard score use the harmful-minus-harmless orientation: flipping it flips them."""
    g = _gen(seed)
    s = _scenario(g)
    ro = readouts(s["X_inst"], s["X_post"], s["h"], s["r"])
    rho = process_correlation(ro.h, ro.r)
    flip_one = readouts(s["X_inst"], s["X_post"], -s["h"], s["r"])
    flip_both = readouts(s["X_inst"], s["X_post"], -s["h"], -s["r"])
    assert process_correlation(flip_one.h, flip_one.r) == pytest.approx(-rho)
    assert process_correlation(flip_both.h, flip_both.r) == pytest.approx(rho)
    scores = latent_guard_scores(s["X"], s["c_pos"], s["c_neg"])
    a = auroc(scores, s["labels"])
    assert torch.allclose(latent_guard_scores(s["X"], -s["c_pos"], -s["c_neg"]), -scores)
    assert auroc(-scores, s["labels"]) == pytest.approx(1 - a)


# --- known values and references ---------------------------------------------------------------------------

def test_coupling_known_values():
    e = torch.eye(8, dtype=F64)
    assert coupling(e[0], e[1]) == 0.0
    assert coupling(e[0], e[0]) == 1.0
    assert coupling(e[0], -5 * e[0]) == 1.0
    assert coupling(e[0] + e[1], e[0]) == pytest.approx(1 / math.sqrt(2))
    assert coupling(torch.tensor([1, 2, 3]), torch.tensor([2, 4, 6])) == pytest.approx(1.0)  # ints are fine
    assert torch.allclose(unit(torch.tensor([3.0, 4.0])), torch.tensor([0.6, 0.8], dtype=F64))


def test_mid_band_and_profile_summaries():
    assert mid_band(32) == (7, 26)  # 6.4 <= l < 25.6
    assert mid_band(10) == (2, 8)
    assert mid_band(5) == (1, 4)
    for L in range(2, 80):
        lo, hi = mid_band(L)
        assert [l for l in range(L) if 0.2 * L <= l < 0.8 * L] == list(range(lo, hi))
    e = torch.eye(10, dtype=F64)
    H = e.clone()
    R = torch.stack([e[(i + 1) % 10] if i != 9 else e[9] for i in range(10)])  # orthogonal except layer 9
    prof = coupling_profile(H, R)
    assert prof.per_layer.tolist() == [0.0] * 9 + [1.0]
    assert (prof.mid_band_mean, prof.max, prof.argmax, prof.band) == (0.0, 1.0, 9, (2, 8))


@settings(max_examples=30, deadline=None)
@given(seed=seeds, d=st.integers(4, 40))
def test_subspace_coupling_k1_is_coupling_squared(seed, d):
    g = _gen(seed)
    h, r = _randn(g, d), _randn(g, d)
    assert subspace_coupling(h, r) == pytest.approx(coupling(h, r) ** 2, abs=1e-12)
    assert subspace_coupling(h[:, None], 2 * r[:, None]) == pytest.approx(coupling(h, r) ** 2, abs=1e-12)
    assert principal_angles(h, r)[0] == pytest.approx(math.acos(coupling(h, r)), abs=1e-7)


def test_principal_angles_known_values_and_precision():
    g = _gen(2)
    d = 30
    thetas = [1e-9, 0.3, math.pi / 4, 1.2, math.pi / 2]
    UA, UB = _planted_subspaces(g, d, thetas)
    got = principal_angles(UA, UB)
    assert torch.allclose(got, torch.tensor(thetas, dtype=F64), rtol=1e-6, atol=1e-12)  # even the 1e-9
    assert subspace_drift(UA, UA @ _randn(g, 5, 5)) < 1e-5  # same span, other basis
    assert subspace_coupling(UA, UA) == pytest.approx(1.0)
    e = torch.eye(d, dtype=F64)
    assert subspace_coupling(e[:, :3], e[:, 3:6]) == 0.0
    assert subspace_drift(e[:, :3], e[:, 3:6]) == pytest.approx(90.0)
    # unequal sizes: a line inside a plane is at angle 0; k = min(ka, kb)
    assert principal_angles(e[:, :3], e[:, 1]).tolist() == [0.0]
    assert principal_angles(e[:, :1], e[:, :4]).shape == (1,)
    # reference: arccos of the singular values, for generic (not tiny) angles
    A, B = _randn(g, d, 4), _randn(g, d, 3)
    ref = torch.arccos(torch.linalg.svdvals(torch.linalg.qr(A).Q.T @ torch.linalg.qr(B).Q).clamp(0, 1))
    assert torch.allclose(principal_angles(A, B), ref, atol=1e-7)


def test_effective_rank_known_values():
    g = _gen(3)
    assert effective_rank(torch.outer(_randn(g, 5), _randn(g, 16))) == pytest.approx(1.0, abs=1e-12)
    assert effective_rank(torch.outer(torch.randn(5), torch.randn(16))) == pytest.approx(1.0, abs=1e-12)  # float32
    for k in (1, 2, 3, 5):
        Q = torch.linalg.qr(_randn(g, 16, k)).Q
        assert effective_rank(Q.T) == pytest.approx(k)
    assert effective_rank(torch.eye(4, dtype=F64)) == pytest.approx(4)
    assert effective_rank(torch.diag(torch.tensor([3.0, 1.0, 0.0]))) == pytest.approx(
        math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    )
    assert effective_rank(torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0])), top=1) == 1.0
    assert effective_rank(_randn(g, 3)) == 1.0  # one row
    # near-parallel unit rows (the section 3 scale, erank ≈ 1.24) stay close to 1
    r = _rand_unit(g, 64)
    M = unit(r + 0.02 * _randn(g, 5, 64) / 8)  # rows within ~1° of each other
    assert 1.0 < effective_rank(M) < 1.5


def _brute_average_ranks(x: list[float]) -> list[float]:
    return [sum(1 for y in x if y < v) + (sum(1 for y in x if y == v) + 1) / 2 for v in x]


@settings(max_examples=40, deadline=None)
@given(data=st.data(), n=st.integers(3, 40))
def test_spearman_matches_brute_force_with_ties(data, n):
    ints = st.integers(-4, 4)
    a = data.draw(st.lists(ints, min_size=n, max_size=n).filter(lambda v: len(set(v)) > 1))
    b = data.draw(st.lists(ints, min_size=n, max_size=n).filter(lambda v: len(set(v)) > 1))
    ra, rb = torch.tensor(_brute_average_ranks(a)), torch.tensor(_brute_average_ranks(b))
    ref = float(torch.corrcoef(torch.stack([ra, rb]).double())[0, 1])
    assert spearman(torch.tensor(a, dtype=F64), torch.tensor(b, dtype=F64)) == pytest.approx(ref, abs=1e-12)


def test_spearman_known_values():
    x = torch.linspace(-3, 3, 50, dtype=F64)
    assert spearman(x, torch.exp(x)) == pytest.approx(1.0)
    assert spearman(x, x ** 3 + 7) == pytest.approx(1.0)
    assert spearman(x, -torch.exp(x)) == pytest.approx(-1.0)
    assert spearman(torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([1.0, 3.0, 3.0, 4.0])) == pytest.approx(1.0)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), n=st.integers(2, 40))
def test_auroc_matches_pair_counting_with_ties(data, n):
    s = data.draw(st.lists(st.integers(-3, 3), min_size=n, max_size=n))
    y = data.draw(st.lists(st.booleans(), min_size=n, max_size=n).filter(lambda v: 0 < sum(v) < len(v)))
    pos = [a for a, t in zip(s, y) if t]
    neg = [a for a, t in zip(s, y) if not t]
    ref = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))
    assert auroc(torch.tensor(s, dtype=F64), torch.tensor(y)) == pytest.approx(ref, abs=1e-12)


def test_auroc_known_values():
    s = torch.tensor([0.1, 0.2, 0.7, 0.9])
    y = torch.tensor([0, 0, 1, 1])
    assert auroc(s, y) == 1.0
    assert auroc(-s, y) == 0.0
    assert auroc(torch.zeros(4), y) == 0.5
    assert auroc(s, y.bool()) == 1.0


def test_latent_guard_known_values():
    e = torch.eye(4, dtype=F64)
    X = torch.stack([e[0], e[1], e[0] + e[1]])[:, None, :]  # [3, 1, 4]
    scores = latent_guard_scores(X, e[:1], e[1:2])
    assert torch.allclose(scores, torch.tensor([1.0, -1.0, 0.0], dtype=F64))
    assert torch.allclose(latent_guard_scores(X[:, 0], e[0], e[1]), scores)  # one-layer form
    X2 = torch.stack([X[:, 0], X[:, 0]], dim=1)  # two identical layers: same mean
    assert torch.allclose(latent_guard_scores(X2, torch.stack([e[0], e[0]]), torch.stack([e[1], e[1]])), scores)


def test_drift_report_and_behaviour_distance():
    e = torch.eye(6, dtype=F64)
    a = {"H": torch.stack([e[0], e[1]]), "R": e[2], "Q_R": e[:, :2]}
    b = {"H": torch.stack([-2 * e[0], e[0] + e[1]]), "R": e[3], "Q_R": e[:, 1:3]}
    rep = drift_report(a, b)
    assert set(rep) == {"H", "R", "Q_R"} and all(isinstance(v, DriftEntry) for v in rep.values())
    assert rep["H"].kind == "direction" and rep["Q_R"].kind == "subspace"
    assert torch.allclose(rep["H"].angle_deg, torch.tensor([0.0, 45.0], dtype=F64))
    assert torch.allclose(rep["H"].direction_drift, torch.tensor([0.0, 1 - 1 / math.sqrt(2)], dtype=F64))
    assert float(rep["R"].angle_deg) == pytest.approx(90.0) and float(rep["R"].direction_drift) == 1.0
    assert float(rep["Q_R"].angle_deg) == pytest.approx(45.0)  # angles 0° and 90°
    assert rep["Q_R"].direction_drift is None
    assert direction_drift(e[0], e[0] + 1e-3 * e[1]) == pytest.approx(1 - 1 / math.sqrt(1 + 1e-6))
    assert behaviour_distance(torch.tensor([0.1, 0.5, 1.0, 0.8]), torch.tensor([0.4, 0.1, 1.0, 0.8])) == pytest.approx(0.5)
    assert behaviour_distance(torch.ones(4), torch.ones(4)) == 0.0


def test_difference_of_means_and_low_rank_basics():
    X_pos = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    X_neg = torch.tensor([[0.0, 1.0]])
    dom = difference_of_means(X_pos, X_neg)
    assert dom.dtype == F64 and dom.tolist() == [2.0, 2.0]
    assert difference_of_means(torch.ones(3, 4, 5), torch.zeros(2, 4, 5)).shape == (4, 5)  # all layers at once
    X = _randn(_gen(4), 10, 8) + 1.0
    mu = 0.1 * torch.ones(8, dtype=F64)
    Q = low_rank_basis(X, mu, k=3)
    assert Q.shape == (8, 3) and torch.allclose(Q.T @ Q, torch.eye(3, dtype=F64), atol=1e-12)
    assert ((X - mu).mean(0) @ Q >= 0).all()  # each column signed like the mean difference
    _, s, _ = torch.linalg.svd(X - mu)
    assert torch.allclose(torch.linalg.vector_norm((X - mu) @ Q, dim=0), s[:3])  # the top-3 singular directions


# --- bad input -----------------------------------------------------------------------------------------------

def _bad_cases():
    z, v, w = torch.zeros(4), torch.randn(4), torch.randn(5)
    nan = torch.tensor([1.0, float("nan"), 0.0, 1.0])
    B = torch.randn(4, 2)
    return [
        ("zero vector", lambda: coupling(z, v), ValueError, "zero"),
        ("zero unit", lambda: unit(z), ValueError, "zero"),
        ("width", lambda: coupling(v, w), ValueError, "widths"),
        ("nan", lambda: coupling(nan, v), ValueError, "NaN"),
        ("inf", lambda: coupling(v, torch.tensor([1.0, float("inf"), 0, 0])), ValueError, "NaN or inf"),
        ("empty", lambda: coupling(torch.zeros(0), torch.zeros(0)), ValueError, "empty"),
        ("not tensor", lambda: coupling([1.0, 0.0], v), TypeError, "torch.Tensor"),
        ("rank", lambda: coupling(B, B), ValueError, "1-D"),
        ("profile layers", lambda: coupling_profile(torch.randn(3, 4), torch.randn(4, 4)), ValueError, "layers"),
        ("profile width", lambda: coupling_profile(torch.randn(3, 4), torch.randn(3, 5)), ValueError, "widths"),
        ("profile zero row", lambda: coupling_profile(torch.randn(3, 4), torch.cat([B.T, torch.zeros(1, 4)])),
         ValueError, "zero"),
        ("profile L=1", lambda: coupling_profile(torch.randn(1, 4), torch.randn(1, 4)), ValueError, "mid band"),
        ("angles width", lambda: principal_angles(torch.randn(4, 2), torch.randn(5, 2)), ValueError, "widths"),
        ("angles rank-deficient", lambda: principal_angles(torch.ones(4, 2), B), ValueError, "rank-deficient"),
        ("angles transposed", lambda: subspace_coupling(torch.randn(2, 4), B), ValueError, "transposed"),
        ("angles zero", lambda: subspace_drift(z, v), ValueError, "rank-deficient"),
        ("dom shapes", lambda: difference_of_means(torch.randn(3, 4), torch.randn(3, 5)), ValueError, "different shapes"),
        ("dom empty", lambda: difference_of_means(torch.zeros(0, 4), torch.randn(3, 4)), ValueError, "empty"),
        ("lowrank k>n", lambda: low_rank_basis(torch.randn(2, 8), torch.zeros(8), k=3), ValueError, "min"),
        ("lowrank k>rank", lambda: low_rank_basis(torch.outer(torch.randn(6), torch.randn(8)), torch.zeros(8), k=2),
         ValueError, "numerical rank"),
        ("lowrank k=0", lambda: low_rank_basis(torch.randn(6, 8), torch.zeros(8), k=0), ValueError, "positive"),
        ("lowrank width", lambda: low_rank_basis(torch.randn(6, 8), torch.zeros(7), k=1), ValueError, "widths"),
        ("erank zero", lambda: effective_rank(torch.zeros(3, 4)), ValueError, "all zeros"),
        ("erank zero row", lambda: effective_rank(torch.stack([v, z]), unit_rows=True), ValueError, "zero"),
        ("erank top", lambda: effective_rank(B, top=0), ValueError, "positive"),
        ("spearman constant", lambda: spearman(torch.ones(5), torch.randn(5)), ValueError, "constant"),
        ("spearman length", lambda: process_correlation(torch.randn(5), torch.randn(4)), ValueError, "same length"),
        ("spearman n=1", lambda: spearman(torch.ones(1), torch.ones(1)), ValueError, "at least 2"),
        ("readouts rows", lambda: readouts(torch.randn(3, 4), torch.randn(2, 4), v, v), ValueError, "same prompts"),
        ("readouts width", lambda: readouts(torch.randn(3, 4), torch.randn(3, 4), w, v), ValueError, "widths"),
        ("readouts zero", lambda: readouts(torch.randn(3, 4), torch.randn(3, 4), z, v), ValueError, "zero"),
        ("guard shape", lambda: latent_guard_scores(torch.randn(3, 2, 4), torch.randn(3, 4), torch.randn(2, 4)),
         ValueError, "c_pos"),
        ("guard zero x", lambda: latent_guard_scores(torch.zeros(3, 4), v, v), ValueError, "zero"),
        ("auroc one class", lambda: auroc(torch.randn(4), torch.ones(4)), ValueError, "both classes"),
        ("auroc labels", lambda: auroc(torch.randn(4), torch.tensor([0, 1, 2, 1])), ValueError, "0/1"),
        ("auroc length", lambda: auroc(torch.randn(4), torch.tensor([0, 1])), ValueError, "shape"),
        ("auroc empty", lambda: auroc(torch.zeros(0), torch.zeros(0)), ValueError, "empty"),
        ("auroc nan", lambda: auroc(nan, torch.tensor([0, 1, 0, 1])), ValueError, "NaN"),
        ("report names", lambda: drift_report({"H": v}, {"R": v}), ValueError, "names differ"),
        ("report shape", lambda: drift_report({"H": v}, {"H": w}), ValueError, "shape"),
        ("report empty", lambda: drift_report({}, {}), ValueError, "no carriers"),
        ("behaviour length", lambda: behaviour_distance(torch.ones(4), torch.ones(3)), ValueError, "same length"),
        ("complex", lambda: coupling(torch.ones(2, dtype=torch.complex64), torch.ones(2)), TypeError, "real"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input_raises_clear_error(case):
    _, call, exc, match = case
    with pytest.raises(exc, match=match):
        call()
