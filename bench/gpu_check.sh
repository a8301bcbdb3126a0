#!/usr/bin/env bash
# One-shot check of the CUDA (and Triton) kernels on a lent GPU machine (H200: python3 with a CUDA build of
# torch, triton, pytest; cmake, ninja and nvcc; no internet). Run from the repository root:
#
#   bash bench/gpu_check.sh            # logs under $OUT (default ./gpu_out)
#
# Short lease: GPU_CHECK_BUDGET=200 GPU_CHECK_TESTS=cuda GPU_CHECK_QUICK=1 bash bench/gpu_check.sh
#
# Steps, each under a time cap so that the whole run stays inside GPU_CHECK_BUDGET seconds (default 540):
#   1. build + install the extension with the CUDA kernels (sm_90 only, 16 parallel jobs)   -> build.log
#   2. environment and backend availability (pysafegeom.ops.backend_report())                -> info.log
#   3. CUDA-only checks at realistic sizes (vectorised paths, k up to 16, exact orders) and a
#      few timings                                                                            -> extra.log
#   4. the generic backend suite on the GPU: cuda and triton vs the reference                 -> pytest.log
#   5. bench/ops.py --device cuda, if present                                                  -> bench.log
#   6c. AutoDAN: scoring equality on CUDA (5 archs), throughput at population 64/256 in bf16 vs the
#      reference and HarmBench's padded way (bench/autodan_gpu.py); tests/test_autodan.py   -> autodan.log
#   6b. GCG: equality to brute force on CUDA (5 archs), one step at width 512 in bf16 on a
#      SmolLM2-shaped and a Llama-3.2-1B-shaped model (bench/gcg_gpu.py); tests/test_gcg.py    -> gcg.log
#   6f. GCG candidates split over devices: devices=("cuda:0",) vs the plain path, one step at width 64
#      (bench/gcg_devices.py: the split path's own overhead, and the same suffixes)          -> gcg_devices.log
#   6d. R2D2: full fine-tuning steps in bf16 on a random Llama-3.2-1B-shaped model with HarmBench's R2D2
#      settings, the step's time split (bench/r2d2_gpu.py)                                   -> r2d2.log
#   6e. trajectory: two quick LoRA SFT runs of SmolLM2 on the GPU, pysafegeom.trajectory against the same
#      measurements by separate calls (bench/trajectory.py --synthetic)                     -> trajectory.log
#   6. compute-sanitizer memcheck over every CUDA op at small sizes, if time is left            -> sanitizer.log
# The last lines printed are a summary table (also in summary.log). Exit status: 0 when every step that
# ran passed.
set -u -o pipefail

OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
BUDGET="${GPU_CHECK_BUDGET:-540}"
START=$SECONDS
PY="${PYTHON:-python3}"

export PATH="$PATH:/usr/local/cuda/bin"
export PYTHONUNBUFFERED=1
export MAX_JOBS=16 CMAKE_BUILD_PARALLEL_LEVEL=16
export PYSAFEGEOM_CUDA_ARCH=90 TORCH_CUDA_ARCH_LIST=9.0
export PYSAFEGEOM_BUILD_VERBOSE=1
export PYSAFEGEOM_GPU_CHECK=1       # tests/conftest.py: real Triton on the GPU, not the interpreter
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

declare -a SUMMARY=()
STATUS=0
note() { SUMMARY+=("$(printf '%-10s %-5s %4ss  %s' "$1" "$2" "$3" "$4")"); [ "$2" = FAIL ] && STATUS=1; return 0; }
left() { echo $((BUDGET - (SECONDS - START))); }
cap() {  # cap SECONDS -> min(SECONDS, time left - reserve), at least 10
  local want=$1 l
  l=$(( $(left) - 20 ))
  [ "$l" -lt "$want" ] && want=$l
  [ "$want" -lt 10 ] && want=10
  echo "$want"
}
run_step() {  # run_step NAME LOG CAP cmd...  (stdout+stderr tee'd to LOG; 124 = timed out)
  local name=$1 log=$2 c=$3 t0=$SECONDS rc
  shift 3
  echo "=== [$name] $* (cap ${c}s, $(left)s of the budget left)" | tee "$log"
  timeout --kill-after=10 "$c" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  echo "=== [$name] exit $rc after $((SECONDS - t0))s" | tee -a "$log"
  return "$rc"
}

# --- 1. build ----------------------------------------------------------------------------------------
t0=$SECONDS
run_step build "$OUT/build.log" "$(cap 300)" "$PY" setup.py build_ext --inplace
brc=$?
have_cuda_ext() {
  "$PY" -c "from pysafegeom.ops import _ext; import sys; i=_ext.build_info(); print('build_info:', i); sys.exit(0 if 'cuda' in i else 1)"
}
if [ $brc -ne 0 ] || ! have_cuda_ext >>"$OUT/build.log" 2>&1; then
  echo "in-place build gave no CUDA extension (exit $brc); trying pip install -e" | tee -a "$OUT/build.log"
  run_step build-pip "$OUT/build2.log" "$(cap 300)" "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e .
  cat "$OUT/build2.log" >>"$OUT/build.log"; rm -f "$OUT/build2.log"
fi
if have_cuda_ext 2>&1 | tee -a "$OUT/build.log"; then
  note build PASS $((SECONDS - t0)) "$(ls pysafegeom/_C*.so 2>/dev/null | head -1) has the CUDA kernels"
else
  note build FAIL $((SECONDS - t0)) "no CUDA kernels in the extension: see build.log"
fi

# --- 2. environment and backends ---------------------------------------------------------------------
{
  nvidia-smi -L 2>&1 || true
  nvcc --version 2>&1 | tail -1 || true
  "$PY" - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available()
      and torch.cuda.get_device_name(), "cap", torch.cuda.is_available() and torch.cuda.get_device_capability())
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton: not importable:", exc)
from pysafegeom import ops
from pysafegeom.ops import _ext
print("extension:", _ext.build_info())
for name, why in ops.backend_report().items():
    print(f"  {name:<7} {why}")
EOF
} 2>&1 | tee "$OUT/info.log"
if grep -qE '^  cuda +available' "$OUT/info.log"; then note backends PASS 0 "cuda available"; else note backends FAIL 0 "cuda backend unavailable: see info.log"; fi

# --- 4. the generic backend suite on the GPU ---------------------------------------------------------
XDIST=()
if "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n 8); fi  # Triton's JIT compiles are CPU-bound
t0=$SECONDS
run_step pytest "$OUT/pytest.log" "$(cap 300)" "$PY" -m pytest tests/test_ops_backends.py -q -rs "${XDIST[@]}" \
  -k "${GPU_CHECK_TESTS:-cuda or triton}" -p no:cacheprovider
prc=$?
tail_line=$(grep -E '(passed|failed|error)' "$OUT/pytest.log" | tail -1)
if [ $prc -ne 0 ]; then
  note pytest FAIL $((SECONDS - t0)) "exit $prc: $tail_line"
elif grep -q 'backend cuda unavailable' "$OUT/pytest.log"; then
  note pytest FAIL $((SECONDS - t0)) "the cuda backend was skipped (unavailable): $tail_line"
else
  note pytest PASS $((SECONDS - t0)) "$tail_line"
fi

# --- 5. benchmark ------------------------------------------------------------------------------------
t0=$SECONDS
if [ -f bench/ops.py ]; then
  if run_step bench "$OUT/bench.log" "$(cap 120)" "$PY" bench/ops.py --device cuda ${GPU_CHECK_QUICK:+--quick}; then
    note bench PASS $((SECONDS - t0)) "see bench.log"
  else
    note bench FAIL $((SECONDS - t0)) "see bench.log"
  fi
else
  note bench SKIP 0 "bench/ops.py not present"
fi

# --- 3. CUDA-only checks at realistic sizes ----------------------------------------------------------
cat >/tmp/psg_extra.py <<'EOF'
"""CUDA backend vs the reference at sizes that take the vectorised and multi-block paths."""
import sys
import torch
from pysafegeom import ops
from pysafegeom.ops import reference

dev = "cuda"
torch.manual_seed(0)
DT = (torch.float32, torch.bfloat16, torch.float16)
OUT_TOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}  # relative (norm) error of outputs
fails = []


def check(name, ok, detail=""):
    print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}", flush=True)
    if not ok:
        fails.append(name)


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def basis(d, k):
    q, _ = torch.linalg.qr(torch.randn(d, k, dtype=torch.float64))
    return q.float().to(dev)


def timed(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(reps):
        a.record(); fn(); b.record(); torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]  # ms, median


def section(name):
    print(f"--- {name}", flush=True)


try:
    section("gather_positions (exact)")
    for dt in DT:
        for B, T, P, d in [(8, 512, 4, 4096), (3, 100, 5, 4095), (2, 7, 3, 1), (4, 33, 2, 6)]:
            h = torch.randn(B, T, d, device=dev).to(dt)
            pos = torch.randint(0, T, (B, P), device=dev)
            got = ops.gather_positions(h, pos, backend="cuda")
            check(f"gather {dt} B,T,P,d={B, T, P, d}", torch.equal(got, reference.gather_positions(h, pos)))

    section("gather_accumulate vs the CPU reference (sequential order)")
    for dt in DT:
        for acc in ("float64", "kahan"):
            for B, T, P, d, G in [(50, 64, 3, 1000, 4), (9, 5, 1, 4096, 1)]:
                h = (torch.randn(B, T, d) * 100).to(dt)
                pos = torch.randint(0, T, (B, P))
                groups = torch.randint(0, G, (B,))
                sdt = torch.float64 if acc == "float64" else torch.float32
                sums = (torch.randn(G, P, d) * 1e4).to(sdt)
                comp = None if acc == "float64" else torch.randn(G, P, d) * 1e-4
                counts = torch.arange(G)
                s_ref, c_ref = sums.clone(), counts.clone()
                k_ref = None if comp is None else comp.clone()
                reference.gather_accumulate(h, pos, groups, s_ref, c_ref, k_ref)
                s, c = sums.to(dev), counts.to(dev)
                k = None if comp is None else comp.to(dev)
                ops.gather_accumulate(h.to(dev), pos.to(dev), groups.to(dev), s, c, k, backend="cuda")
                exact = torch.equal(s.cpu(), s_ref) and (k is None or torch.equal(k.cpu(), k_ref))
                close = torch.allclose(s.cpu().double(), s_ref.double(), rtol=1e-12, atol=1e-9)
                ok = torch.equal(c.cpu(), c_ref) and (exact if acc == "kahan" else close)
                check(f"accumulate {dt} {acc} B,T,P,d,G={B, T, P, d, G}", ok, f"bitwise={exact}")

    section("project_ablate vs float64")
    for dt in DT:
        for N, d in [(1000, 4096), (7, 100)]:
            for k in (1, 3, 5, 8, 16):
                x = (torch.randn(N, d, device=dev) * 3).to(dt)
                Q = basis(d, k)
                v = torch.randn(d, device=dev)
                x64, Q64 = x.double(), Q.double()
                p64 = x64 @ Q64
                r64 = x64 - 0.7 * (p64 @ Q64.T) + 1.5 * v.double()
                out, proj = ops.project_ablate(x, Q, 0.7, 1.5, v, return_proj=True, backend="cuda")
                e_out, e_proj = rel(out, r64), rel(proj, p64)
                xi = x.clone()
                ops.project_ablate(xi, Q, 0.7, 1.5, v, inplace=True, backend="cuda")
                e_in = rel(xi, r64)
                ok = e_out < OUT_TOL[dt] and e_in < OUT_TOL[dt] and e_proj < 1e-5
                check(f"project {dt} N,d,k={N, d, k}", ok, f"out {e_out:.2e} inplace {e_in:.2e} proj {e_proj:.2e}")

    section("orthogonalize_weight vs float64")
    for dt in (torch.float32, torch.bfloat16):
        for rd, shape in [(0, (2048, 4096)), (0, (577, 301)), (0, (64, 6)), (1, (1000, 2048))]:
            for k in (1, 4, 8, 16):
                d = shape[rd]
                W = (torch.randn(*shape, device=dev) * 0.05).to(dt)
                Q = basis(d, k)
                W64, Q64 = W.double(), Q.double()
                r64 = W64 - Q64 @ (Q64.T @ W64) if rd == 0 else W64 - (W64 @ Q64) @ Q64.T
                with torch.no_grad():
                    got = ops.orthogonalize_weight(W, Q, rd, backend="cuda")
                    Wi = W.clone()
                    ops.orthogonalize_weight(Wi, Q, rd, inplace=True, backend="cuda")
                e, ei = rel(got, r64), rel(Wi, r64)
                check(f"orthogonalize {dt} rd={rd} shape={shape} k={k}", e < OUT_TOL[dt] and ei < OUT_TOL[dt],
                      f"{e:.2e} inplace {ei:.2e}")

    section("chunked_cross_entropy vs float64")
    import torch.nn.functional as F
    for dt in DT:
        for N, d, V, chunk in [(256, 1024, 32000, 8192), (5, 64, 1000, 7)]:
            h = torch.randn(N, d, device=dev).to(dt)
            W = (torch.randn(V, d, device=dev) * (4 / d ** 0.5)).to(dt)
            t = torch.randint(0, V, (N,), device=dev)
            t[1] = -100
            h64 = h.double().requires_grad_(True)
            valid = t != -100
            l64 = F.cross_entropy(h64 @ W.double().T, torch.where(valid, t, 0), reduction="none") * valid
            (g64,) = torch.autograd.grad(l64.sum(), h64)
            loss, grad = ops.chunked_cross_entropy(h, W, t, chunk_size=chunk, return_grad=True, backend="cuda")
            only = ops.chunked_cross_entropy(h, W, t, chunk_size=chunk, backend="cuda")
            el, eg, eo = rel(loss, l64), rel(grad, g64), rel(only, l64)
            gtol = {torch.float32: 1e-4, torch.bfloat16: 1.5e-2, torch.float16: 3e-3}[dt]
            ok = el < 1e-4 and eo < 1e-4 and eg < gtol and loss[1].item() == 0 and bool((grad[1] == 0).all())
            check(f"cross_entropy {dt} N,d,V,chunk={N, d, V, chunk}", ok, f"loss {el:.2e} grad {eg:.2e}")

    section("masked_topk (exact order)")
    for dt in DT:
        for L, V, k in [(20, 128256, 256), (3, 50, 40)]:
            g = torch.randn(L, V, device=dev).to(dt)
            g[:, ::11] = g[:, 5:6]  # ties
            forb = torch.randperm(V)[: V // 20].to(dev)
            cur = torch.randint(0, V, (L,), device=dev)
            got = ops.masked_topk(g, k, forb, cur, backend="cuda")
            want = ops.masked_topk(g.cpu(), k, forb.cpu(), cur.cpu(), backend="torch")
            check(f"topk {dt} L,V,k={L, V, k}", torch.equal(got.cpu(), want))
except Exception as exc:  # report, do not hide
    import traceback
    traceback.print_exc()
    fails.append(f"exception {type(exc).__name__}")

section("timings (median of 20, ms; cuda backend vs the torch reference on the GPU)")
try:
    rows = []
    bf = torch.bfloat16
    h = torch.randn(64, 512, 4096, device=dev, dtype=bf)
    pos = torch.randint(0, 512, (64, 8), device=dev)
    rows.append(("gather 64x512x4096 P=8", *(timed(lambda b=b: ops.gather_positions(h, pos, backend=b))
                                               for b in ("cuda", "torch")), None))
    for k in (1, 16):
        x = torch.randn(32768, 4096, device=dev, dtype=bf)
        Q = basis(4096, k)
        tc = timed(lambda: ops.project_ablate(x, Q, backend="cuda"))
        tt = timed(lambda: ops.project_ablate(x, Q, backend="torch"))
        rows.append((f"project 32768x4096 bf16 k={k}", tc, tt, 2 * x.numel() * 2 / tc / 1e6))
    W = torch.randn(4096, 14336, device=dev, dtype=bf)
    Q = basis(4096, 1)
    with torch.no_grad():
        tc = timed(lambda: ops.orthogonalize_weight(W, Q, 0, backend="cuda"))
        tt = timed(lambda: ops.orthogonalize_weight(W, Q, 0, backend="torch"))
    rows.append(("orthogonalize 4096x14336 k=1", tc, tt, 3 * W.numel() * 2 / tc / 1e6))
    hs = torch.randn(2048, 4096, device=dev, dtype=bf)
    Wv = torch.randn(128256, 4096, device=dev, dtype=bf) * 0.05
    tg = torch.randint(0, 128256, (2048,), device=dev)
    tc = timed(lambda: ops.chunked_cross_entropy(hs, Wv, tg, return_grad=True, backend="cuda"), reps=5)
    tt = timed(lambda: ops.chunked_cross_entropy(hs, Wv, tg, return_grad=True, backend="torch"), reps=5)
    rows.append(("CE+grad N=2048 d=4096 V=128256", tc, tt, None))
    gg = torch.randn(20, 128256, device=dev, dtype=bf)
    cur = torch.randint(0, 128256, (20,), device=dev)
    rows.append(("topk 20x128256 k=256", timed(lambda: ops.masked_topk(gg, 256, None, cur, backend="cuda")),
                 timed(lambda: ops.masked_topk(gg, 256, None, cur, backend="torch")), None))
    print(f"{'op':<34} {'cuda ms':>9} {'torch ms':>9} {'GB/s':>7}")
    for name, tc, tt, bw in rows:
        print(f"{name:<34} {tc:9.3f} {tt:9.3f} {'' if bw is None else f'{bw:7.0f}':>7}")
except Exception:
    import traceback
    traceback.print_exc()

print(f"extra checks: {len(fails)} failed" + (": " + ", ".join(fails) if fails else ""))
sys.exit(1 if fails else 0)
EOF
t0=$SECONDS
if [ "$(left)" -lt 60 ]; then
  note extra SKIP 0 "not enough of the time budget left ($(left)s)"
elif run_step extra "$OUT/extra.log" "$(cap 150)" "$PY" /tmp/psg_extra.py; then
  note extra PASS $((SECONDS - t0)) "$(grep -c '^PASS' "$OUT/extra.log") checks"
else
  note extra FAIL $((SECONDS - t0)) "$(grep -E '^extra checks:|Error' "$OUT/extra.log" | tail -1) (see extra.log)"
fi

# --- 6b. GCG on the GPU: equality to a float64 brute force on CUDA, one step at width 512 in bf16 ---------
t0=$SECONDS
if [ "$(left)" -lt 90 ]; then
  note gcg SKIP 0 "not enough of the time budget left ($(left)s)"
elif run_step gcg "$OUT/gcg.log" "$(cap 180)" "$PY" bench/gcg_gpu.py ${GPU_CHECK_QUICK:+--quick}; then
  note gcg PASS $((SECONDS - t0)) "$(grep -c '^PASS' "$OUT/gcg.log") equality checks; $(grep -E 'shape' "$OUT/gcg.log" | tr -s ' ' | paste -sd';' -)"
else
  note gcg FAIL $((SECONDS - t0)) "see gcg.log"
fi
t0=$SECONDS
if [ "$(left)" -lt 90 ] || [ ! -f tests/test_gcg.py ]; then
  note gcg-tests SKIP 0 "no time left or no tests/test_gcg.py"
elif run_step gcg-tests "$OUT/gcg_tests.log" "$(cap 120)" "$PY" -m pytest -q -x tests/test_gcg.py -m "not real_model"; then
  note gcg-tests PASS $((SECONDS - t0)) "$(tail -1 "$OUT/gcg_tests.log")"
else
  note gcg-tests FAIL $((SECONDS - t0)) "see gcg_tests.log"
fi

# --- 6f. GCG candidates over devices: the one GPU named as devices=("cuda:0",) vs the plain path (the split's overhead) ---
t0=$SECONDS
if [ "$(left)" -lt 60 ] || [ ! -f bench/gcg_devices.py ]; then
  note gcg-dev SKIP 0 "not enough of the time budget left ($(left)s) or no bench/gcg_devices.py"
elif run_step gcg-devices "$OUT/gcg_devices.log" "$(cap 90)" "$PY" bench/gcg_devices.py --devices cuda:0 --steps 5; then
  note gcg-dev PASS $((SECONDS - t0)) "$(grep -E 'replica' "$OUT/gcg_devices.log" | tr -s ' ' | paste -sd';' -)"
else
  note gcg-dev FAIL $((SECONDS - t0)) "see gcg_devices.log"
fi

# --- 6c. AutoDAN on the GPU: scoring equality on CUDA (5 archs), throughput vs the reference and HarmBench's way ---
t0=$SECONDS
if [ "$(left)" -lt 90 ] || [ ! -f bench/autodan_gpu.py ]; then
  note autodan SKIP 0 "not enough of the time budget left ($(left)s) or no bench/autodan_gpu.py"
elif run_step autodan "$OUT/autodan.log" "$(cap 180)" "$PY" bench/autodan_gpu.py ${GPU_CHECK_QUICK:+--quick}; then
  note autodan PASS $((SECONDS - t0)) "$(grep -c '^PASS' "$OUT/autodan.log") equality checks; $(grep -E 'shape' "$OUT/autodan.log" | tr -s ' ' | paste -sd';' -)"
else
  note autodan FAIL $((SECONDS - t0)) "see autodan.log"
fi
t0=$SECONDS
if [ "$(left)" -lt 90 ] || [ ! -f tests/test_autodan.py ]; then
  note autodan-tests SKIP 0 "no time left or no tests/test_autodan.py"
elif run_step autodan-tests "$OUT/autodan_tests.log" "$(cap 120)" "$PY" -m pytest -q -x tests/test_autodan.py -m "not real_model"; then
  note autodan-tests PASS $((SECONDS - t0)) "$(tail -1 "$OUT/autodan_tests.log")"
else
  note autodan-tests FAIL $((SECONDS - t0)) "see autodan_tests.log"
fi

# --- 6d. R2D2 on the GPU: a few full fine-tuning steps in bf16 on a random 1B Llama, the step's time split ---
t0=$SECONDS
if [ "$(left)" -lt 100 ] || [ ! -f bench/r2d2_gpu.py ]; then
  note r2d2 SKIP 0 "not enough of the time budget left ($(left)s) or no bench/r2d2_gpu.py"
elif run_step r2d2 "$OUT/r2d2.log" "$(cap 200)" "$PY" bench/r2d2_gpu.py ${GPU_CHECK_QUICK:+--quick}; then
  note r2d2 PASS $((SECONDS - t0)) "$(grep -E '^median' "$OUT/r2d2.log" | tr -s ' ')"
else
  note r2d2 FAIL $((SECONDS - t0)) "see r2d2.log"
fi

# --- 6e. trajectory on the GPU: two quick LoRA SFT runs of SmolLM2 (checkpoints 0, 2, 4), ours vs separate calls ---
t0=$SECONDS
if [ "$(left)" -lt 120 ] || [ ! -f bench/trajectory.py ]; then
  note trajectory SKIP 0 "not enough of the time budget left ($(left)s) or no bench/trajectory.py"
elif run_step trajectory "$OUT/trajectory.log" "$(cap 240)" "$PY" bench/trajectory.py --synthetic /tmp/psg_traj --quick \
    --paths ours,separate --threads 8 --out "$OUT/trajectory_results.json"; then
  note trajectory PASS $((SECONDS - t0)) "$(grep -E '^\| (ours|separate) ' "$OUT/trajectory.log" | tr -s ' ' | tr '\n' ' ')"
else
  note trajectory FAIL $((SECONDS - t0)) "see trajectory.log"
fi

# --- 6. compute-sanitizer memcheck (each tensor its own allocation, so out-of-bounds accesses show) ----
cat >/tmp/psg_sanitize.py <<'EOF'
import torch
from pysafegeom import ops
dev = "cuda"
torch.manual_seed(1)
for dt in (torch.float32, torch.bfloat16, torch.float16):
    h = torch.randn(3, 9, 37, device=dev).to(dt)
    pos = torch.randint(0, 9, (3, 2), device=dev)
    ops.gather_positions(h, pos, backend="cuda")
    for sdt in (torch.float64, torch.float32):
        s = torch.zeros(2, 2, 37, device=dev, dtype=sdt)
        comp = torch.zeros(2, 2, 37, device=dev) if sdt == torch.float32 else None
        ops.gather_accumulate(h, pos, torch.tensor([0, 1, 1], device=dev), s, torch.zeros(2, dtype=torch.long,
                              device=dev), comp, backend="cuda")
    for k in (1, 3, 6, 16):
        x = torch.randn(11, 40, device=dev).to(dt)
        Q, _ = torch.linalg.qr(torch.randn(40, k, device=dev))
        ops.project_ablate(x, Q, 0.5, 1.0, torch.randn(40, device=dev), return_proj=True, backend="cuda")
        ops.project_ablate(x, Q, 0.5, 1.0, torch.randn(40, device=dev), inplace=True, backend="cuda")
        with torch.no_grad():
            for shape, rd in (((40, 12), 0), ((40, 13), 0), ((40, 2), 0), ((7, 40), 1)):
                W = torch.randn(*shape, device=dev).to(dt)
                ops.orthogonalize_weight(W, Q, rd, backend="cuda")
                ops.orthogonalize_weight(W, Q, rd, inplace=True, backend="cuda")
    hh = torch.randn(5, 24, device=dev).to(dt)
    Wv = torch.randn(50, 24, device=dev).to(dt)
    t = torch.tensor([1, -100, 49, 0, 7], device=dev)
    for chunk in (1, 16, 64):
        ops.chunked_cross_entropy(hh, Wv, t, chunk_size=chunk, return_grad=True, backend="cuda")
        ops.chunked_cross_entropy(hh, Wv, t, chunk_size=chunk, backend="cuda")
    g = torch.randn(3, 50, device=dev).to(dt)
    ops.masked_topk(g, 5, torch.tensor([1, 2], device=dev), torch.tensor([0, 3, 4], device=dev), backend="cuda")
torch.cuda.synchronize()
print("sanitizer workload done")
EOF
t0=$SECONDS
if ! command -v compute-sanitizer >/dev/null 2>&1; then
  note sanitizer SKIP 0 "compute-sanitizer not on PATH"
elif [ "$(left)" -lt 90 ]; then
  note sanitizer SKIP 0 "not enough of the time budget left ($(left)s)"
else
  if run_step sanitizer "$OUT/sanitizer.log" "$(cap 150)" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" /tmp/psg_sanitize.py; then
    note sanitizer PASS $((SECONDS - t0)) "memcheck clean on the pysafegeom kernels"
  else
    note sanitizer FAIL $((SECONDS - t0)) "see sanitizer.log"
  fi
fi

# --- summary -----------------------------------------------------------------------------------------
{
  echo
  echo "=== gpu_check summary ($((SECONDS - START))s; logs in $OUT)"
  printf '%s\n' "${SUMMARY[@]}"
} | tee "$OUT/summary.log"
exit $STATUS
