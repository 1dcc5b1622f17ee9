"""Process settings that must be in place before JAX starts its backend and threads.

Importing eb_jax changes nothing in the process: entry points (`eb_jax.main`,
`eb_jax.experiments`, the benchmarks, the test session) call `configure_process` first.
"""

from __future__ import annotations

import ctypes
import os
from platform import libc_ver, system

import jax

# XLA's Eigen convolution instead of YNNPACK's on CPU: much faster for the mid-sized
# VGG/ResNet convolutions on CPU (docs/design.md). Ignored by other backends.
CPU_CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


def set_cpu_xla_flags(enable: bool = True) -> None:
    """Adds (or removes) eb_jax's CPU XLA flags; only effective before JAX's first use."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if f != CPU_CONV_FLAG]
    if enable:
        flags.append(CPU_CONV_FLAG)
    os.environ["XLA_FLAGS"] = " ".join(flags)


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_GLIBC_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536, _M_ARENA_MAX: 0}
_REUSE = {_M_TRIM_THRESHOLD: -1, _M_MMAP_MAX: 0, _M_ARENA_MAX: 1}  # -1: never trim (size_t)


def reuse_host_memory(enable: bool = True) -> bool:
    """Makes glibc's malloc keep freed host memory for reuse (one arena, large blocks
    from the heap, no trimming), or restores its defaults. Returns False where the C
    library is not glibc (nothing to do).

    XLA's CPU runtime takes a step's working memory as one block (811 MB for PreResNet-56
    at batch 64). glibc's default serves such a block from a thread's arena by mapping
    fresh pages and unmaps them on free, so every step page-faults through all of it:
    measured, a third of the step's CPU time in the kernel. Kept for reuse, the step
    faults only the first time. Threads that already allocated keep their arena, so
    this is applied before JAX starts its threads (`configure_process`).
    """
    if system() != "Linux" or libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    for param, value in (_REUSE if enable else _GLIBC_DEFAULTS).items():
        mallopt(param, value)
    return True


def configure_process(cpu_xla_flags: bool = True, reuse_memory: bool = True) -> None:
    """eb_jax's process settings (the config's cpu_xla_flags and reuse_host_memory):
    call before JAX's first computation; later calls change only what is still open."""
    set_cpu_xla_flags(cpu_xla_flags)
    reuse_host_memory(reuse_memory)


def describe(whole_run: bool = False) -> str:
    """'2 x cpu': this process's devices (and, in a multi-process run, how many processes
    have as many), or with `whole_run` every device of the run."""
    kind = jax.local_devices()[0].device_kind
    if whole_run:
        return f"{jax.device_count()} x {kind}"
    where = f" in each of {jax.process_count()} processes" if jax.process_count() > 1 else ""
    return f"{jax.local_device_count()} x {kind}{where}"
