"""Measured energy in two labelled figures, never one passed off as the other:

- ACCELERATOR: NVML's total-energy counter (millijoules, Volta or newer) of each NVIDIA GPU
  this process's JAX devices run on, found by PCI bus id (so CUDA_VISIBLE_DEVICES order,
  UUIDs and MIG ids cannot send it to another GPU); n/a with the reason on a TPU, a MIG
  slice, a GPU without the counter, or when JAX runs on the CPU.
- HOST: Linux's powercap RAPL counters, every CPU package plus its DRAM (never added to
  `psys`, which contains them, nor the `core`/`uncore` subzones inside a package), read by
  one process per host.

`open_meter()` builds this process's `Meter`; a background thread samples it every few
seconds so that no RAPL wrap-around is missed between reads. A read error (an NVML
error, a vanished file) makes the stretch until the next good read a lost one, reported
as n/a with the reason, and training goes on. `EnergyClock` turns the readings of every
process (gathered, each process with its own devices) into the run's energy so far,
carried across restarts; what a killed process drew after its last checkpoint is wasted,
summed over every kill, from the notes (`NOTE_FILE`) each process keeps up to date.
"""

from __future__ import annotations

import ctypes
import dataclasses
import glob
import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable

import numpy as np

from eb_jax.runlog import logger, write_json

ACCELERATOR, HOST = "accelerator", "host"
CHANNELS = (ACCELERATOR, HOST)
RAPL_ROOT = "/sys/class/powercap"
SAMPLE_SECONDS = 5.0  # config.energy_sample_seconds' default
_MAX_ZONE_WATTS = 2000.0  # a wrapping counter is read before this draw could wrap it
MEASURED, NOT_MEASURED, ELSEWHERE = 0, 1, 2  # a channel's state on one process
_WHY_BYTES = 240  # a reason travels between processes as this many bytes
_ROW = 4 + _WHY_BYTES  # joules, state, lost stretches, failing now; the reason


@dataclasses.dataclass
class Source:
    """Cumulative counters: `read()` -> joules of each (raises on a read error); `ranges`:
    the joules at which each wraps back to 0 (None: never)."""

    name: str
    read: Callable[[], list[float]]
    ranges: list[float | None]


@dataclasses.dataclass(frozen=True)
class Device:
    """A JAX device as the meter needs it: platform ('gpu', 'tpu', 'cpu'), PCI bus id."""

    platform: str
    bus_id: str | None = None


class Channel:
    """One figure on this process: its source's counters summed with wraps undone. A read
    error starts a lost stretch (`lost` += 1) that lasts until the next good read."""

    def __init__(self, source: Source | None, why: str = "", state: int = MEASURED):
        self.source, self.why = source, why
        self.state = NOT_MEASURED if source is None and state == MEASURED else state
        self.joules, self.lost, self.failing, self.last = 0.0, 0, False, None
        self.sample()  # the origin

    def sample(self) -> None:
        if self.source is None:
            return
        try:
            now = [float(v) for v in self.source.read()]
        except Exception as e:  # NVMLError, OSError, ValueError: the stretch is lost
            self.lost += 0 if self.failing else 1
            self.failing, self.last = True, None
            self.why = f"a read failed ({type(e).__name__}: {e}); that stretch is unmeasured"
            return
        if self.last is not None:
            for value, last, wrap in zip(now, self.last, self.source.ranges, strict=True):
                delta = value - last
                self.joules += delta + wrap if delta < 0 and wrap else max(delta, 0.0)
        self.last, self.failing = now, False

    def row(self) -> np.ndarray:
        """[joules, state, lost, failing, reason bytes...] for the gather."""
        why = np.zeros(_WHY_BYTES)
        text = self.why.encode()[:_WHY_BYTES]
        why[: len(text)] = np.frombuffer(text, np.uint8)
        return np.concatenate([[self.joules, self.state, self.lost, self.failing], why])


class Meter:
    """This process's channels, sampled on every read and by a background thread."""

    def __init__(self, channels: dict[str, Channel], counted: str):
        self.channels, self.counted = channels, counted
        self.lock = threading.Lock()
        self._stop, self._thread = threading.Event(), None

    def name(self, channel: str) -> str | None:
        source = self.channels[channel].source
        return source.name if source else None

    def rows(self) -> np.ndarray:
        """Samples now; this process's rows, [channel, _ROW]."""
        with self.lock:
            self._sample()
            return np.stack([self.channels[c].row() for c in CHANNELS])

    def joules(self) -> dict:
        """Samples now; this process's joules per channel since it started."""
        with self.lock:
            self._sample()
            return {c: self.channels[c].joules for c in CHANNELS}

    def zero(self) -> None:
        """Counts from now (the run's clock starts)."""
        with self.lock:
            self._sample()
            for channel in self.channels.values():
                channel.joules, channel.lost = 0.0, 0

    def _sample(self) -> None:
        for channel in self.channels.values():
            channel.sample()

    def start(self, seconds: float, after: Callable[[], object] | None = None) -> None:
        """Calls `after()` (which samples) every `seconds`, less if a counter could wrap
        sooner."""
        ranges = [r for ch in self.channels.values() if ch.source for r in ch.source.ranges]
        seconds = min([seconds] + [r / _MAX_ZONE_WATTS for r in ranges if r])
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run,
            args=(seconds, after or self.joules),
            name="eb_jax-energy",
            daemon=True,
        )
        self._thread.start()

    def _run(self, seconds: float, after) -> None:
        while not self._stop.wait(seconds):
            try:
                after()
            except Exception as e:  # never take the training down; the next sample retries
                logger.warning("energy: sampling failed (%s)", e)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def open_meter(
    devices: list[Device] | None = None,
    rapl_root: str = RAPL_ROOT,
    nvml=None,
    host_reader: int | None = None,
) -> Meter:
    """This process's meter: its own `devices` (default: JAX's local devices) through
    `nvml` (default: pynvml, imported here), the host's RAPL under `rapl_root` unless
    `host_reader` names another process that reads it. The figure the table shows
    (`counted`) is the accelerator's, or the host's when JAX runs on the CPU."""
    devices = jax_devices() if devices is None else devices
    platforms = {d.platform for d in devices}
    counted = HOST if platforms == {"cpu"} else ACCELERATOR
    channels = {ACCELERATOR: _accelerator_channel(devices, platforms, nvml)}
    if host_reader is None:
        channels[HOST] = Channel(*_rapl_source(rapl_root))
    else:
        channels[HOST] = Channel(None, f"counted by process {host_reader}", ELSEWHERE)
    return Meter(channels, counted)


def _accelerator_channel(devices: list[Device], platforms: set, nvml) -> Channel:
    if platforms == {"cpu"}:
        return Channel(None, "JAX runs on the CPU (no accelerator; see the host figure)")
    if platforms == {"tpu"}:
        return Channel(None, "no TPU energy counter is readable from the host")
    if platforms != {"gpu"}:
        return Channel(None, f"no energy counter for {'/'.join(sorted(platforms))} devices")
    return Channel(*_nvml_source(devices, nvml))


def _nvml_source(devices: list[Device], nvml) -> tuple[Source | None, str]:
    """NVML's energy counters of the GPUs with the devices' bus ids, or why there are none."""
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            return None, "no NVML on this GPU run (nvidia-ml-py is not installed)"
    if any(d.bus_id is None for d in devices):
        return None, "no PCI bus id for JAX's GPUs from the CUDA driver (not NVIDIA GPUs?)"
    try:
        nvml.nvmlInit()
        by_bus = {_bus_key(_text(nvml.nvmlDeviceGetPciInfo(h).busId)): h for h in _handles(nvml)}
        buses = list(dict.fromkeys(_bus_key(d.bus_id) for d in devices))
        if not set(buses) <= set(by_bus):
            missing = [d.bus_id for d in devices if _bus_key(d.bus_id) not in by_bus]
            return None, f"NVML has no GPU at PCI bus id {missing[0]} (a JAX device's)"
        handles = [by_bus[b] for b in buses]
        for handle in handles:
            why = _why_no_counter(nvml, handle)
            if why:
                return None, why
        kind = _text(nvml.nvmlDeviceGetName(handles[0]))
    except nvml.NVMLError as e:
        return None, f"NVML failed ({e})"

    def read() -> list[float]:
        return [nvml.nvmlDeviceGetTotalEnergyConsumption(h) / 1e3 for h in handles]

    return Source(f"nvml ({len(handles)} x {kind})", read, [None] * len(handles)), ""


def _handles(nvml) -> list:
    return [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]


def _why_no_counter(nvml, handle) -> str:
    """'' if `handle`'s energy counter is this process's alone to read, else why not."""
    name = _text(nvml.nvmlDeviceGetName(handle))
    try:
        mig = nvml.nvmlDeviceGetMigMode(handle)[0] == nvml.NVML_DEVICE_MIG_ENABLE
    except nvml.NVMLError:  # not a MIG-capable GPU
        mig = False
    if mig:
        return f"{name} is split into MIG slices: NVML counts the whole GPU, other slices too"
    try:
        nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    except nvml.NVMLError as e:
        return f"no NVML energy counter on {name} ({e}; Volta or newer has one)"
    return ""


def _bus_key(bus_id: str | None) -> tuple | None:
    """'0000:3B:00.0' and NVML's '00000000:3b:00.0' alike: (domain, bus, device, function)."""
    try:
        domain, bus, rest = bus_id.strip().split(":")
        device, function = rest.split(".")
        return tuple(int(part, 16) for part in (domain, bus, device, function))
    except (AttributeError, ValueError):
        return None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def jax_devices() -> list[Device]:
    """This process's JAX devices; a GPU's PCI bus id from the CUDA driver, asked for the
    device's CUDA ordinal (the same visible devices, in the same order, as JAX's)."""
    import jax

    return [
        Device(d.platform, _cuda_bus_id(d.local_hardware_id) if d.platform == "gpu" else None)
        for d in jax.local_devices()
    ]


def _cuda_bus_id(ordinal: int) -> str | None:
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    device, bus_id = ctypes.c_int(), ctypes.create_string_buffer(64)
    if cuda.cuInit(0) or cuda.cuDeviceGet(ctypes.byref(device), ordinal):
        return None
    if cuda.cuDeviceGetPCIBusId(bus_id, len(bus_id), device):
        return None
    return bus_id.value.decode()


def host_key() -> int:
    """The same number on every process of one machine: its kernel's boot id (shared by
    containers on one machine, whose RAPL counters are the same), else its hostname."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = socket.gethostname()
    digest = hashlib.sha256(boot.encode()).digest()
    return int.from_bytes(digest[:7], "little")


def host_reader(keys: np.ndarray, process_index: int) -> int | None:
    """None if this process reads its host's RAPL (the lowest-numbered process on the
    host, by the gathered `keys`), else the process that does."""
    first = int(np.flatnonzero(keys == keys[process_index])[0])
    return None if first == process_index else first


def _rapl_source(root: str) -> tuple[Source | None, str]:
    """The RAPL zones' counters (`_rapl_zones`), or why they cannot be read."""
    tops = sorted(glob.glob(os.path.join(root, "intel-rapl:*")))
    zones = _rapl_zones([z for z in tops if os.path.basename(z).count(":") == 1])
    if not zones:
        return None, f"no RAPL ({root} has no intel-rapl package, DRAM or psys zones)"

    def read() -> list[float]:
        return [_read_int(os.path.join(z, "energy_uj")) / 1e6 for z in zones]

    try:
        ranges = [_read_int(os.path.join(z, "max_energy_range_uj")) / 1e6 for z in zones]
        read()
    except (OSError, ValueError) as e:
        why = f"{e.strerror}: {e.filename}" if isinstance(e, OSError) else str(e)
        return None, f"RAPL not readable ({why}; usually root only)"
    names = [_read_text(os.path.join(z, "name")) for z in zones]
    return Source(f"rapl ({', '.join(names)})", read, ranges), ""


def _rapl_zones(tops: list[str]) -> list[str]:
    """Every package zone and its DRAM subzone (never `core`/`uncore`, inside the package);
    only where there are none, `psys` (it contains them: one or the other)."""
    zones, psys = [], []
    for top in tops:
        name = _read_text(os.path.join(top, "name"))
        if name.startswith(("package", "dram")):
            zones.append(top)
        elif name == "psys":
            psys.append(top)
        for sub in sorted(glob.glob(os.path.join(top, os.path.basename(top) + ":*"))):
            if _read_text(os.path.join(sub, "name")) == "dram":
                zones.append(sub)
    return zones or psys


def _read_int(path: str) -> int:
    with open(path) as f:
        return int(f.read().strip())


def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


# --- The run's energy: every process's readings combined, carried across restarts ---

NOTE_FILE = "energy.json"  # process 0's note; process i > 0 keeps energy.<i>.json


def note_path(workdir: str, process_index: int) -> str:
    name = NOTE_FILE if process_index == 0 else f"energy.{process_index}.json"
    return os.path.join(workdir, name)


def combine(rows: np.ndarray) -> dict:
    """The run's reading from every process's rows [process, channel, _ROW]: per channel
    {'j': joules summed over the processes that measure it, or None (n/a) if one cannot,
    'lost': unmeasured stretches, 'failing': a read failing now, 'why': the reason}."""
    reading = {}
    for c, channel in enumerate(CHANNELS):
        r = rows[:, c]
        missing = np.flatnonzero(r[:, 1] == NOT_MEASURED)
        said = missing if missing.size else np.flatnonzero(r[:, 2] > 0)
        why = _decode(r[said[0], 4:]) if said.size else None
        if why and len(rows) > 1:
            why = f"process {said[0]}: {why}"
        reading[channel] = {
            "j": None if missing.size else float(r[r[:, 1] == MEASURED, 0].sum()),
            "lost": int(r[:, 2].sum()),
            "failing": bool(r[:, 3].any()),
            "why": why,
        }
    return reading


def _decode(values: np.ndarray) -> str:
    return bytes(values.astype(np.uint8)).rstrip(b"\0").decode(errors="replace")


def unknown(why: str) -> dict:
    """A reading of a stretch nothing measured."""
    return {c: {"j": None, "lost": 0, "failing": False, "why": why} for c in CHANNELS}


def _continued(now: dict, before: dict | None) -> dict:
    """`now` (this process's part of the run) after `before` (the run's, at its restart)."""
    if before is None:
        return now
    run = {}
    for c in CHANNELS:
        a, b = before[c], now[c]
        if b["j"] is None:
            run[c] = b
        elif a["j"] is None:  # the run's earlier part went unmeasured: one lost stretch
            run[c] = {**b, "lost": a["lost"] + b["lost"] + 1, "why": b["why"] or a["why"]}
        else:
            run[c] = {**b, "j": a["j"] + b["j"], "lost": a["lost"] + b["lost"]}
            run[c]["why"] = b["why"] or a["why"]
    return run


def joules_between(then, now: dict, channel: str) -> float | None:
    """`channel`'s joules from reading `then` to `now`; None unless measured all along."""
    if not isinstance(then, dict):  # no mark, or one an older eb_jax wrote
        return None
    a, b = then[channel], now[channel]
    if a["j"] is None or b["j"] is None or a["lost"] != b["lost"] or a["failing"] or b["failing"]:
        return None
    return b["j"] - a["j"]


def total(reading: dict, channel: str) -> tuple[float | None, str | None]:
    """(`channel`'s joules over the whole run, None) or (None, why it is n/a)."""
    r = reading[channel]
    if r["j"] is None:
        return None, r["why"]
    if r["lost"] or r["failing"]:
        return None, f"{max(r['lost'], 1)} stretch(es) unmeasured, e.g. {r['why']}"
    return r["j"], None


class EnergyClock:
    """The run's energy so far: the checkpoint's reading `before` plus what every process's
    meter counted since this process started (rows gathered by `gather`: array ->
    [process, ...]; None: one process). `wasted`: joules per channel and 'seconds' drawn
    by work that kills threw away. `note`: this process's note file, rewritten at every
    checkpoint and sample, so that a restarted run knows what a killed one drew."""

    def __init__(self, meter=None, before=None, wasted=None, gather=None, note=None, mark=None):
        self.meter = meter or Meter({c: Channel(None, "not measured") for c in CHANNELS}, HOST)
        self.before, self.gather, self.note = before, gather, note
        self.wasted = wasted or {ACCELERATOR: 0.0, HOST: 0.0, "seconds": 0.0}
        self._lock = threading.Lock()
        self.meter.zero()
        self.checkpointed(*(mark or (-1, before, 0.0)))

    def reading(self) -> dict:
        """The run's reading (every process calls this at the same points)."""
        rows = self.meter.rows()
        rows = rows[None] if self.gather is None else self.gather(rows)
        return _continued(combine(rows), self.before)

    def start(self, seconds: float) -> None:
        """Samples (and rewrites the note) every `seconds` in a background thread."""
        self.meter.start(seconds, self.write_note)

    def close(self) -> None:
        """Stops sampling; a last note (a process killed outright keeps its newest)."""
        self.meter.close()
        self.write_note()

    def checkpointed(self, step: int, reading: dict | None, wall_s: float) -> None:
        """A checkpoint of `step` holds the run's `reading` and wall time: the note
        counts from here."""
        with self._lock:
            self._mark = {
                "step": step,
                "run": reading,
                "wall_s": wall_s,
                "local": self.meter.joules(),
                "started": time.perf_counter(),
            }
        self.write_note()

    def write_note(self) -> None:
        """This process's note: the newest checkpoint's step, reading and wall time, what
        this process drew since (joules per channel, seconds), and the run's waste."""
        local = self.meter.joules()  # the sample that catches every wrap
        if self.note is None:
            return
        with self._lock:
            mark = self._mark
            note = {k: mark[k] for k in ("step", "run", "wall_s")}
            note["since"] = {c: local[c] - mark["local"][c] for c in CHANNELS}
            note["seconds"] = time.perf_counter() - mark["started"]
            note["wasted"] = dict(self.wasted)
            try:
                write_json(self.note, note)
            except OSError as e:  # the waste of a kill goes uncounted; the run goes on
                logger.warning("energy: cannot write %s (%s)", self.note, e.strerror)


def resumed_clock(meter, saved, step: int, wall_s: float, note: str, gather=None):
    """The clock of a run started at its checkpoint of `step` (-1: from scratch) whose
    energy record is `saved` (None: none, or an older eb_jax's) and wall time `wall_s`.
    The checkpoint's reading goes on; what killed processes drew after it (their notes,
    summed over the processes) is added to the waste, every earlier kill's kept."""
    before = saved["reading"] if saved else None
    if saved is None and step >= 0:
        before = unknown("the checkpoint is from an older eb_jax")
    wasted = dict(saved["wasted"]) if saved else None
    row = _note_row(_read_note(note), before, step, wall_s)
    rows = row[None] if gather is None else gather(row)
    noted = np.flatnonzero(rows[:, -1])
    if noted.size:  # the run-level parts: the first process with a note's
        first = rows[noted[0]]
        wasted = {c: first[6 + i] + first[3 + i] for i, c in enumerate((*CHANNELS, "seconds"))}
        for i, c in enumerate(CHANNELS):
            wasted[c] += float(rows[:, i].sum())
        wasted["seconds"] += float(rows[:, 2].max())
    mark = (step, before, wall_s)
    return EnergyClock(meter, before, wasted, gather, note, mark)


def _note_row(last: dict | None, before: dict | None, step: int, wall_s: float) -> np.ndarray:
    """[since (2 channels), seconds since; the run's part from the checkpoint to the
    note's newer one (2 channels, seconds); the note's waste (3); has a note]."""
    row = np.zeros(10)
    if last is None or last["step"] < step or (step < 0 <= last["step"]):
        return row  # none, older than the checkpoint, or a checkpointed run's (now gone)
    row[:3] = [last["since"][c] or 0.0 for c in CHANNELS] + [last["seconds"]]
    if last["step"] > step and before and last["run"]:  # its newer checkpoint is lost
        for i, c in enumerate(CHANNELS):
            joules = joules_between(before, last["run"], c)
            row[3 + i] = joules or 0.0
        row[5] = last["wall_s"] - wall_s
    row[6:9] = [last["wasted"][k] for k in (*CHANNELS, "seconds")]
    row[9] = 1
    return row


def _read_note(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def summary(reading: dict, clock: EnergyClock) -> dict:
    """report.json's energy: each figure apart, and the one the table shows ('counted':
    the accelerator's, or the host's when JAX ran on the CPU) as total_kj."""
    record = {"counted": clock.meter.counted}
    for c in CHANNELS:
        joules, why = total(reading, c)
        measured = reading[c]["j"]
        record[c] = {
            "total_kj": None if joules is None else joules / 1e3,
            "measured_kj": None if measured is None else measured / 1e3,
            "wasted_kj": None if measured is None else clock.wasted[c] / 1e3,
            "meter": clock.meter.name(c),
            "why_not": why,
        }
    shown = record[record["counted"]]
    record.update({k: shown[k] for k in ("total_kj", "wasted_kj", "meter", "why_not")})
    record["wasted_s"] = clock.wasted["seconds"]
    return record
