"""Op benchmark: every available backend of each pysafegeom op against the reference and a plain copy.

For each op and backend: median time over ``--repeats`` calls, the bytes the op must move at least
(inputs read + outputs written), the implied bandwidth, the speed-up over the reference (``torch``),
and the time relative to ``clone()`` of a tensor of the op's main size (same bytes read and written),
measured in the same run. For chunked cross-entropy also the peak memory of one (first) call: on CUDA
``torch.cuda.max_memory_allocated``; on CPU the peak RSS (VmHWM) of a fresh forked process; compared
with the unchunked ``F.cross_entropy(h @ W.T)`` and the chunked reference.

    python bench/ops.py                      # cuda when available, else cpu (~3 minutes on 2 cores)
    python bench/ops.py --quick              # smaller sizes, a smoke run
    python bench/ops.py --device cpu --csv ops.csv --backends torch,cpp

Targets (printed at the end, with whether each is met): C++ gather-and-accumulate >= 2x the reference;
C++ projection/ablation >= 1.5x the reference and within 2x of the copy time; chunked cross-entropy at
<= 1/4 of the unchunked reference's peak memory and no slower.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import PeakMemory, fmt_bytes, machine_line, markdown_table, median, run_isolated, timed, write_csv  # noqa: E402

COLUMNS = ["op", "case", "dtype", "device", "backend", "ms", "bytes", "GB/s", "x_torch", "x_copy", "peak_mem",
           "peak_vs_unchunked"]


def _bench(fn, device, repeats):
    timed(fn, device)  # warm-up
    return median([timed(fn, device)[0] for _ in range(repeats)])


def _dt(name):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _basis(d, k, device):
    import torch

    q, _ = torch.linalg.qr(torch.randn(d, k, dtype=torch.float64))
    return q.float().to(device)


# --- cases ------------------------------------------------------------------------------------------

def bandwidth_cases(device, quick):
    """(op, case, dtype, make(backend) -> (callable, bytes), copy_numel) for the memory-bound ops."""
    import torch

    from pysafegeom import ops

    big = device.startswith("cuda")
    s = 8 if quick else 1
    cases = []

    for d, B, T, P in ((576, 4096, 32, 16), (4096, 4096 if big else 1024, 16, 16)):
        B //= s

        def gather(backend, d=d, B=B, T=T, P=P):
            hidden = torch.randn(B, T, d, device=device, dtype=torch.bfloat16)
            pos = torch.randint(0, T, (B, P), device=device)
            nbytes = 2 * B * P * d * 2
            return (lambda: ops.gather_positions(hidden, pos, backend=backend)), nbytes

        cases.append(("gather_positions", f"N={B * P} rows, d={d}", "bf16", gather, B * P * d))

        for acc in (("float64", "kahan") if d == 576 else ("float64",)):
            G = 4
            Bk = B if acc == "float64" else B // 4  # the reference's Kahan path is a Python loop over rows

            def accumulate(backend, d=d, B=Bk, T=T, P=P, acc=acc, G=G):
                hidden = torch.randn(B, T, d, device=device, dtype=torch.bfloat16)
                pos = torch.randint(0, T, (B, P), device=device)
                groups = torch.randint(0, G, (B,), device=device)
                sdt = torch.float64 if acc == "float64" else torch.float32
                sums = torch.zeros(G, P, d, device=device, dtype=sdt)
                comp = torch.zeros(G, P, d, device=device) if acc == "kahan" else None
                counts = torch.zeros(G, dtype=torch.int64, device=device)
                nbytes = B * P * d * 2 + 2 * G * P * d * sums.element_size() * (2 if comp is not None else 1)
                return (lambda: ops.gather_accumulate(hidden, pos, groups, sums, counts, comp, backend=backend)), nbytes

            cases.append(("gather_accumulate", f"N={Bk * P} rows, d={d}, G={G}, {acc}", "bf16", accumulate, Bk * P * d))

    for d, N in ((576, 65536), (4096, 65536 if big else 16384)):
        N //= s
        for k in (1, 8):
            def project(backend, d=d, N=N, k=k):
                x = torch.randn(N, d, device=device, dtype=torch.bfloat16)
                Q = _basis(d, k, device)
                return (lambda: ops.project_ablate(x, Q, backend=backend)), 2 * N * d * 2

            cases.append(("project_ablate", f"N={N}, d={d}, k={k}", "bf16", project, N * d))
        if d == 4096:
            def project_inplace(backend, d=d, N=N):
                x = torch.randn(N, d, device=device, dtype=torch.bfloat16)
                Q = _basis(d, 1, device)
                v = torch.randn(d, device=device)
                return (lambda: ops.project_ablate(x, Q, 0.0, 0.5, v, inplace=True, backend=backend)), 2 * N * d * 2

            cases.append(("project_ablate", f"N={N}, d={d}, k=1, +alpha v, in place", "bf16", project_inplace, N * d))

    for rd, shape in ((0, (576, 1536)), (0, (4096, 14336 // (2 if quick else 1))), (1, (49152 // s, 576))):
        def ortho(backend, rd=rd, shape=shape):
            W = torch.randn(*shape, device=device, dtype=torch.bfloat16) * 0.02
            Q = _basis(shape[rd], 1, device)

            def run():
                with torch.no_grad():
                    ops.orthogonalize_weight(W, Q, rd, backend=backend)

            return run, 2 * W.numel() * 2

        cases.append(("orthogonalize_weight", f"W={shape[0]}x{shape[1]}, residual_dim={rd}", "bf16", ortho,
                      shape[0] * shape[1]))

    for L, V in ((20, 49152), (20, 128256)):
        def topk(backend, L=L, V=V):
            g = torch.randn(L, V, device=device, dtype=torch.bfloat16)
            forb = torch.randperm(V, device=device)[:1000]
            cur = torch.randint(0, V, (L,), device=device)
            return (lambda: ops.masked_topk(g, 256, forb, cur, backend=backend)), L * V * 2

        cases.append(("masked_topk", f"L={L}, V={V}, k=256", "bf16", topk, L * V))
    return cases


def ce_cases(device, quick):
    big = device.startswith("cuda")
    cases = [
        (512 if not quick else 128, 576, 49152, "fp32"),
        (64 if not quick else 32, 4096, 128256 if not quick else 32000, "fp32"),
        (256 if not quick else 64, 576, 49152, "bf16"),
    ]
    if big and not quick:
        cases += [(2048, 4096, 128256, "bf16")]
    return cases


def _ce_worker(device, N, d, V, dtype_name, method, repeats, seed=0):
    """Runs in a fresh process on CPU: peak memory of the first call above the inputs, then timings."""
    import torch
    import torch.nn.functional as F

    from pysafegeom import ops

    torch.manual_seed(seed)
    dt = _dt(dtype_name)

    def make(N, V):
        h = torch.randn(N, d, device=device).to(dt)
        W = ((torch.rand(V, d, device=device) - 0.5) * (4 / d ** 0.5)).to(dt)
        t = torch.randint(0, V, (N,), device=device)
        if method == "unchunked":
            return lambda: F.cross_entropy(h @ W.T, t, reduction="none")
        return lambda: ops.chunked_cross_entropy(h, W, t, chunk_size=8192, backend=method)

    make(4, 300)()  # load libraries and start thread pools before measuring
    fn = make(N, V)
    mem = PeakMemory(device)
    mem.start()
    out = fn()
    timed(lambda: None, device)
    peak = mem.delta()
    del out
    ms = 1e3 * median([timed(fn, device)[0] for _ in range(repeats)])
    return ms, peak


# --- run --------------------------------------------------------------------------------------------

def main(argv=None):
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--backends", default=None, help="comma list (default: torch + every available kernel backend)")
    p.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    p.add_argument("--skip-ce", action="store_true")
    args = p.parse_args(argv)
    device = args.device
    repeats = args.repeats or (3 if args.quick else 5)
    cuda = device.startswith("cuda")

    from pysafegeom.ops import _backends

    if args.backends:
        names = [b.strip() for b in args.backends.split(",") if b.strip()]
    else:
        names = ["torch"] + [n for n in ("cpp", "cuda", "triton") if n != "triton" or cuda]
    backends = []
    for n in names:
        mod, why = _backends.load(n)
        if n == "torch" or (mod is not None and device.split(":")[0] in mod.DEVICES):
            backends.append(n)
        else:
            print(f"# backend {n}: skipped ({why or 'does not run on ' + device})")
    print(f"# {machine_line(device)}; device {device}; backends {', '.join(backends)}")
    rows = []

    # Chunked cross-entropy first: on CPU each run is a forked process, and forking is only safe
    # before this process has run any (OpenMP) kernel.
    ce_targets = []
    if not args.skip_ce:
        for N, d, V, dtn in ce_cases(device, args.quick):
            res = {}
            for method in ["unchunked"] + backends:
                try:
                    ms, peak = run_isolated(_ce_worker, device, N, d, V, dtn, method, max(2, repeats - 2),
                                            isolate=not cuda)
                except Exception as exc:  # noqa: BLE001 - report and go on
                    print(f"# chunked_cross_entropy {method}: failed: {str(exc).splitlines()[0]}")
                    continue
                res[method] = (ms, peak)
            es = 4 if dtn == "fp32" else 2
            nbytes = (N * d + V * d) * es + N * 4
            un = res.get("unchunked")
            for method, (ms, peak) in res.items():
                rows.append({
                    "op": "chunked_cross_entropy", "case": f"N={N}, d={d}, V={V}, chunk=8192", "dtype": dtn,
                    "device": device, "backend": method if method != "unchunked" else "F.cross_entropy(h@W.T)",
                    "ms": round(ms, 3), "bytes": nbytes, "GB/s": round(nbytes / ms / 1e6, 1),
                    "x_torch": round(res["torch"][0] / ms, 2) if "torch" in res else "",
                    "x_copy": "", "peak_mem": peak,
                    "peak_vs_unchunked": round(peak / un[1], 3) if un and un[1] else "",
                })
            for kb in backends:
                if kb != "torch" and kb in res and un:
                    ce_targets.append((f"chunked_cross_entropy {kb} N={N} d={d} V={V} {dtn}",
                                       res[kb][1] <= un[1] / 4 and res[kb][0] <= un[0] * 1.05,
                                       f"peak {fmt_bytes(res[kb][1])} vs unchunked {fmt_bytes(un[1])} "
                                       f"({res[kb][1] / max(un[1], 1):.3f}x), time {res[kb][0]:.1f} vs "
                                       f"{un[0]:.1f} ms"
                                       + (" (the unchunked reference runs a 16-bit GEMM with 16-bit logits; "
                                          "the kernels keep float32 logits)" if dtn != "fp32" else "")))

    torch.manual_seed(0)
    for op, case, dtn, make, copy_numel in bandwidth_cases(device, args.quick):
        src = torch.randn(copy_numel, device=device, dtype=_dt(dtn))
        t_copy = _bench(lambda: src.clone(), device, repeats)
        del src
        times = {}
        for b in backends:
            try:
                fn, nbytes = make(b)
                times[b] = (_bench(fn, device, repeats), nbytes)
            except Exception as exc:  # noqa: BLE001 - e.g. a backend without this op
                print(f"# {op} [{case}] {b}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
            fn = None
        for b, (t, nbytes) in times.items():
            rows.append({
                "op": op, "case": case, "dtype": dtn, "device": device, "backend": b,
                "ms": round(1e3 * t, 3), "bytes": nbytes, "GB/s": round(nbytes / t / 1e9, 1),
                "x_torch": round(times["torch"][0] / t, 2) if "torch" in times else "",
                "x_copy": round(t / t_copy, 2), "peak_mem": "", "peak_vs_unchunked": "",
            })
        if cuda:
            torch.cuda.empty_cache()

    shown = [dict(r, bytes=fmt_bytes(r["bytes"]), peak_mem=fmt_bytes(r["peak_mem"]) if r["peak_mem"] != "" else "")
             for r in rows]
    print()
    print(markdown_table(shown, COLUMNS))
    print("\nx_torch: speed-up over the reference (higher is better); x_copy: time / clone() time of the same "
          "bytes (1 = copy speed); peak_mem: peak extra memory of one call.")

    # targets
    kernel = "cuda" if cuda else "cpp"
    targets = []
    for r in rows:
        if r["backend"] != kernel:
            continue
        if r["op"] == "gather_accumulate":
            targets.append((f"gather_accumulate {kernel} [{r['case']}] >= 2x torch", r["x_torch"] >= 2,
                            f"{r['x_torch']}x"))
        if r["op"] == "project_ablate":
            large = r["bytes"] >= 64 * 2**20
            ok = r["x_torch"] >= 1.5 and (r["x_copy"] <= 2 or not large)
            targets.append((f"project_ablate {kernel} [{r['case']}] >= 1.5x torch, <= 2x copy", ok,
                            f"{r['x_torch']}x torch, {r['x_copy']}x copy"))
    targets += ce_targets
    print("\nTargets:")
    for name, ok, detail in targets:
        print(f"  [{'met' if ok else 'NOT met'}] {name}: {detail}")
    if args.csv:
        write_csv(args.csv, rows, COLUMNS)
        print(f"\nwrote {args.csv}")


if __name__ == "__main__":
    main()
