"""Timing on a device's timeline and peak memory, shared by every benchmark (and bench/).

* :class:`Clock` / :func:`time_call`: CUDA events (no host sync until read) on CUDA, ``perf_counter`` elsewhere;
* :class:`PhaseTimes`: a phase timer (``phase -> context manager``, device synced at each boundary), the
  ``timer`` that :func:`nbl_ext.calibrate` and the engine's ``LayerwiseRunner`` accept;
* :class:`PeakMemory`: peak host RSS growth (VmHWM, reset at the start) and peak CUDA memory over a block;
  :func:`proc_status`, :func:`reset_peak_rss` and :func:`available_host_bytes` read Linux's /proc.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn


class Clock:
    """Marks on one device's timeline: CUDA events (no host sync) or perf_counter."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        """Each mark's time after the first, in seconds (waits for the device)."""
        if self.cuda:
            self.marks[-1].synchronize()
            return [self.marks[0].elapsed_time(e) / 1e3 for e in self.marks]
        return [t - self.marks[0] for t in self.marks]


def time_call(device: str | torch.device, fn: Callable[[], Any]) -> float:
    """Seconds one call of ``fn`` takes on ``device``'s timeline (CUDA events, waited for; perf_counter on CPU)."""
    clock = Clock(torch.device(device))
    clock.mark()
    fn()
    clock.mark()
    return clock.seconds()[-1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter."""
    return next(p.device for p in model.parameters())


def free_memory(device: torch.device) -> None:
    """Collect garbage and, on CUDA, return the cached blocks (between two models of a comparison)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class PhaseTimes:
    """Seconds per named phase, each timed at its boundaries with the device synced (one sync per entry).

    Called with a phase name it is a context manager (``with phases("accumulate"): ...``): the ``timer``
    argument of :func:`nbl_ext.calibrate`. ``seconds[phase]`` sums every entry of that phase.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        sync(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            sync(self.device)
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0

    def get(self, phase: str) -> float:
        """Seconds spent in ``phase`` (0 if it never ran)."""
        return self.seconds.get(phase, 0.0)


class PeakMemory:
    """Peak memory over a block, for the generation and the calibration measurements alike.

    ``host``: the process's peak RSS growth (VmHWM, reset at the start, minus VmRSS at the
    start); ``cuda``: ``torch.cuda.max_memory_allocated`` (weights included) and
    ``cuda_growth`` over the start, on CUDA devices. ``value`` is the one number a
    generation run reports: ``cuda`` on CUDA, ``host`` elsewhere.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.host: int | None = None
        self.cuda: int | None = None
        self.cuda_growth: int | None = None

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._cuda0 = torch.cuda.memory_allocated(self.device)
        self._rss0 = proc_status("VmRSS")
        self._reset = reset_peak_rss()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.cuda = int(torch.cuda.max_memory_allocated(self.device))
            self.cuda_growth = self.cuda - self._cuda0
        hwm = proc_status("VmHWM")
        if self._reset and self._rss0 is not None and hwm is not None:
            self.host = max(0, hwm - self._rss0)

    @property
    def value(self) -> int | None:
        return self.cuda if self.device.type == "cuda" else self.host

    @property
    def method(self) -> str:
        host = (
            "host: peak RSS (VmHWM, reset at the start) minus RSS at the start: the growth over the loaded "
            "model; a lower bound where the allocator reuses memory kept from earlier work"
            if self.host is not None
            else "host: unavailable (the RSS high-water mark cannot be reset here)"
        )
        if self.device.type == "cuda":
            host += "; CUDA: torch.cuda.max_memory_allocated (weights included) and its growth over the start"
        return host


def proc_status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0), so that the peak is measured
    from here on and not the import-time peak. False where not supported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def available_host_bytes() -> int | None:
    """MemAvailable of /proc/meminfo in bytes; None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
