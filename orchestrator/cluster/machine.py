"""How fast is this machine? A one-second probe printed beside every published time, because the same 2-core
machine kind runs 3x slower on some days than on others."""

from __future__ import annotations

import os
import platform
import time


def probe(seconds: float = 1.0) -> dict:
    """fp32 1,024 × 1,024 matmul on one thread for about `seconds`: GFLOP/s, with the cores and the CPU's name."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
        a @ b  # warm-up
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            n += 1
        elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    return {"gflops_1_thread": round(2 * 1024 ** 3 * n / elapsed / 1e9, 1), "cores": os.cpu_count(), "cpu": _cpu_name(),
            "load_1min": round(os.getloadavg()[0], 1)}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(info: dict) -> str:
    """One line: 'one core 17.0 GFLOP/s fp32 matmul, 2 cores, load 0.4' (a loaded machine probes slow too)."""
    load = f", load {info['load_1min']}" if "load_1min" in info else ""
    return f"one core {info['gflops_1_thread']} GFLOP/s fp32 matmul, {info['cores']} cores{load}"
