"""Helpers shared by the Triton launch wrappers: block-size choices and the interpreter switch."""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def num_programs_target(device: torch.device) -> int:
    """About how many programs fill the device: two waves of the multiprocessors (a few on CPU)."""
    if device.type == "cuda" and not interpreting():
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4
