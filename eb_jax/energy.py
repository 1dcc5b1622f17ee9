"""Measured energy: NVML's total-energy counter on NVIDIA GPUs, RAPL on CPUs.

`open_meter()` finds the meter this machine has — every visible NVIDIA GPU summed through
nvidia-ml-py (Volta or newer: a millijoule counter since the driver loaded), else the
CPU packages and DRAM through Linux's powercap RAPL files — or says why there is none.
A meter reads cumulative joules; `EnergyClock` turns readings into the run's energy so
far, carried across restarts like the wall time. Counters update every 20-100 ms: read
them around whole epochs, after the device work is done.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from collections.abc import Callable

RAPL_ROOT = "/sys/class/powercap"


@dataclasses.dataclass
class Meter:
    """`read()`: cumulative joules from an arbitrary origin; `name`: what it measures."""

    name: str
    read: Callable[[], float]


def open_meter(rapl_root: str = RAPL_ROOT) -> tuple[Meter | None, str]:
    """(the machine's meter, '') or (None, why no meter could be read)."""
    reasons = []
    for find in (_nvml_meter, lambda why: _rapl_meter(why, rapl_root)):
        meter = find(reasons)
        if meter is not None:
            return meter, ""
    return None, "; ".join(reasons)


def _nvml_meter(reasons: list) -> Meter | None:
    try:
        import pynvml
    except ImportError:
        reasons.append("no NVML (nvidia-ml-py is not installed)")
        return None
    try:
        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in _visible_gpus(pynvml)]
        if not handles:
            reasons.append("no NVIDIA GPU")
            return None
        for handle in handles:
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        kind = pynvml.nvmlDeviceGetName(handles[0])
    except pynvml.NVMLError as e:
        reasons.append(f"no NVML energy counter ({e})")
        return None
    kind = kind.decode() if isinstance(kind, bytes) else kind

    def read() -> float:
        return sum(pynvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in handles) / 1e3

    return Meter(f"nvml ({len(handles)} x {kind})", read)


def _visible_gpus(pynvml) -> list[int]:
    """NVML indices of the GPUs this process may use (CUDA_VISIBLE_DEVICES, if numeric)."""
    count = pynvml.nvmlDeviceGetCount()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or not all(v.strip().isdigit() for v in visible.split(",") if v.strip()):
        return list(range(count))
    return [int(v) for v in visible.split(",") if v.strip() and int(v) < count]


class _RaplCounter:
    """The sum of RAPL package and DRAM zones, in joules, with counter wrap-around undone."""

    def __init__(self, zones: list[str]):
        self.zones = zones
        self.ranges = [_read_int(os.path.join(z, "max_energy_range_uj")) for z in zones]
        self.last = [_read_int(os.path.join(z, "energy_uj")) for z in zones]
        self.total_uj = 0

    def read(self) -> float:
        for i, zone in enumerate(self.zones):
            now = _read_int(os.path.join(zone, "energy_uj"))
            delta = now - self.last[i]
            self.total_uj += delta if delta >= 0 else delta + self.ranges[i]
            self.last[i] = now
        return self.total_uj / 1e6


def _rapl_meter(reasons: list, root: str) -> Meter | None:
    packages = sorted(glob.glob(os.path.join(root, "intel-rapl:[0-9]*")))
    packages = [p for p in packages if os.path.basename(p).count(":") == 1]
    if not packages:
        reasons.append(f"no RAPL ({root} has no intel-rapl zones)")
        return None
    zones = list(packages)
    for package in packages:
        for sub in sorted(glob.glob(os.path.join(package, os.path.basename(package) + ":*"))):
            if _read_text(os.path.join(sub, "name")) == "dram":
                zones.append(sub)
    try:
        counter = _RaplCounter(zones)
    except OSError as e:
        reasons.append(f"no readable RAPL ({e.strerror}: {e.filename})")
        return None
    names = [_read_text(os.path.join(z, "name")) or os.path.basename(z) for z in zones]
    return Meter(f"rapl ({', '.join(names)})", counter.read)


def _read_int(path: str) -> int:
    with open(path) as f:
        return int(f.read().strip())


def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


@dataclasses.dataclass
class EnergyClock:
    """The run's measured joules so far: `before_j` from earlier processes of the run plus
    what the meter counted since this process started it. Without a meter every reading
    is None and `why_not` says why."""

    meter: Meter | None
    why_not: str = ""
    before_j: float = 0.0
    wasted_j: float = 0.0  # drawn by work a kill threw away (redone after the restart)

    def __post_init__(self):
        self.origin = self.meter.read() if self.meter else None

    def joules(self) -> float | None:
        """The run's measured energy so far (call after blocking on the device)."""
        if self.meter is None:
            return None
        return self.before_j + self.meter.read() - self.origin
