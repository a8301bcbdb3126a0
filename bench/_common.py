"""Small helpers shared by the benchmarks: timing, peak memory, fresh worker processes, tables."""

from __future__ import annotations

import csv
import multiprocessing as mp
import os
import platform
import resource
import statistics
import time
import traceback


# ---------------------------------------------------------------- timing

def sync(device) -> None:
    """Wait for queued GPU work (no-op on CPU)."""
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize(device)


def timed(fn, device=None):
    """``(seconds, fn())``, synchronising the device before and after."""
    sync(device or "cpu")
    t0 = time.perf_counter()
    out = fn()
    sync(device or "cpu")
    return time.perf_counter() - t0, out


def median(xs):
    return statistics.median(xs) if xs else float("nan")


# ---------------------------------------------------------------- memory

def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """Current resident set size of this process (bytes)."""
    kb = _proc_status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    return peak_rss_bytes()


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS mark (Linux ``/proc/self/clear_refs``); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak RSS since the last :func:`reset_peak_rss` (VmHWM), else since process start (``ru_maxrss``)."""
    kb = _proc_status_kb("VmHWM")
    if kb is not None:
        return kb * 1024
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if platform.system() == "Darwin" else r * 1024  # bytes on macOS, KiB on Linux


def _tame_malloc() -> None:
    """Make RSS follow live memory: glibc's sliding mmap threshold otherwise keeps freed tensor buffers
    on the heap after the first large free, so peak RSS depends on allocation order, not just on size.
    A fixed threshold sends every large buffer to mmap (returned on free); then trim the heap."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD (fixing it turns the sliding threshold off)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory above a baseline: RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA.

    ``start()`` sets the baseline (and resets the peak mark); ``delta()`` is peak minus baseline (bytes).
    """

    def __init__(self, device):
        self.cuda = str(device).startswith("cuda")
        self.device = device
        self.base = 0

    def start(self) -> None:
        import gc

        gc.collect()
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            _tame_malloc()
            reset_peak_rss()
            self.base = rss_bytes()

    def delta(self) -> int:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return max(0, peak_rss_bytes() - self.base)


# ---------------------------------------------------------------- isolation

def _child(conn, fn, args):
    try:
        conn.send(("ok", fn(*args)))
    except BaseException as exc:  # report, never hang the parent
        conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"))
    finally:
        conn.close()


def run_isolated(fn, *args, isolate: bool = True):
    """Run ``fn(*args)`` in a fresh forked process (so its peak memory is its own) and return its result.

    The parent must not have run torch kernels or touched CUDA before (fork safety). Raises RuntimeError
    with the child's traceback when it failed. ``isolate=False`` runs in this process.
    """
    if not isolate or "fork" not in mp.get_all_start_methods():
        return fn(*args)
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(child, fn, args))
    p.start()
    child.close()
    try:
        status, payload = parent.recv()
    except EOFError:
        p.join()
        raise RuntimeError(f"worker died (exit code {p.exitcode}; out of memory?)") from None
    p.join()
    if status != "ok":
        raise RuntimeError(payload)
    return payload


# ---------------------------------------------------------------- tables

def fmt_bytes(n) -> str:
    if n is None:
        return "n/a"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def write_csv(path, rows: list[dict], columns: list[str] | None = None) -> None:
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def machine_line(device) -> str:
    """One line describing where the benchmark ran."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    s = f"{cpu}, {os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    if str(device).startswith("cuda") and torch.cuda.is_available():
        s += f", {torch.cuda.get_device_name(device)}"
    return s
