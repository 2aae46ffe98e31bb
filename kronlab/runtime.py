"""Threads, the OpenMP wait policy, timing and machine facts: one set-up for every script.

On a shared CPU, OpenMP threads that spin at barriers steal the cores other
processes need and make timings noisy; ``OMP_WAIT_POLICY=PASSIVE`` stops that.
OpenMP reads the variable once, when torch is loaded, so :func:`configure_threads`
must run before the first ``import torch`` of the process. This module, and
``import kronlab`` itself (its names load lazily), import no torch at import time.

Timing: :func:`time_rounds` times several functions in interleaved rounds and returns
each one's median (ratios measured in one run on a noisy machine);
:class:`Stopwatch` records the wall time of the phases of one long command.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "Stopwatch",
    "configure_threads",
    "cpu_name",
    "machine_info",
    "time_rounds",
]


def configure_threads(threads: int | None = None, *, wait_policy: str | None = None) -> dict:
    """Set ``OMP_WAIT_POLICY`` (``PASSIVE`` unless already set) and torch's thread count.

    Call it before torch is imported: afterwards the wait policy can no longer change
    (``"omp_wait_policy_effective"`` in the result says whether it took effect).
    ``threads=None`` leaves torch's default. Returns what is in force.
    """
    torch_loaded = "torch" in sys.modules
    if wait_policy is not None:
        if wait_policy.upper() not in ("PASSIVE", "ACTIVE"):
            raise ValueError(f"wait_policy must be 'PASSIVE' or 'ACTIVE', got {wait_policy!r}")
        os.environ["OMP_WAIT_POLICY"] = wait_policy.upper()
    else:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if threads is not None:
        if isinstance(threads, bool) or int(threads) != threads or threads < 1:
            raise ValueError(f"threads must be a positive integer, got {threads!r}")
        import torch

        torch.set_num_threads(int(threads))
    return {"omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
            "omp_wait_policy_effective": not torch_loaded,
            "threads": threads}


def _sync(device) -> None:
    if device is not None and str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def time_rounds(fns: Sequence[Callable[[], object]], *, repeats: int, warmup: int = 1,
                device=None) -> list[float]:
    """Median seconds per call of each function, timed in interleaved rounds.

    ``warmup`` untimed rounds, then ``repeats`` rounds that each call every function once in
    turn (synchronising a CUDA ``device`` around each call), so a slow phase of a shared
    machine hits every function alike. One function gives its own median time.

    >>> [t >= 0 for t in time_rounds([lambda: None, lambda: sum(range(100))], repeats=3)]
    [True, True]
    """
    if isinstance(repeats, bool) or int(repeats) != repeats or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    for _ in range(int(warmup)):
        for f in fns:
            f()
    _sync(device)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(int(repeats)):
        for i, f in enumerate(fns):
            _sync(device)
            t0 = time.perf_counter()
            f()
            _sync(device)
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


class Stopwatch:
    """Wall time of named phases: ``with sw.phase("load"): ...``; ``sw.seconds`` maps them.

    >>> sw = Stopwatch()
    >>> with sw.phase("fit"):
    ...     _ = sum(range(10))
    >>> list(sw.seconds), sw.total >= 0
    (['fit'], True)
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


def cpu_name() -> str:
    """The processor's model name from ``/proc/cpuinfo`` (or ``platform``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device="cpu", *, load_start=None) -> dict:
    """The facts a recorded timing needs: date, machine, threads, wait policy, torch, load.

    ``load_start`` is ``os.getloadavg()`` taken when the measurement began; the load at
    the end is read now. ``command`` is the command line that is running.
    """
    import torch

    dev = torch.device(device)
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": cpu_name(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "torch": torch.__version__,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name(),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
    }
    if hasattr(os, "getloadavg"):
        if load_start is not None:
            info["load_start"] = [round(v, 2) for v in load_start]
        info["load_end"] = [round(v, 2) for v in os.getloadavg()]
    return info
