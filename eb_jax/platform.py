"""Backend-specific settings that must be in place before JAX starts its backend."""

from __future__ import annotations

import os

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


def describe(whole_run: bool = False) -> str:
    """'2 x cpu': this process's devices (and, in a multi-process run, how many processes
    have as many), or with `whole_run` every device of the run."""
    kind = jax.local_devices()[0].device_kind
    if whole_run:
        return f"{jax.device_count()} x {kind}"
    where = f" in each of {jax.process_count()} processes" if jax.process_count() > 1 else ""
    return f"{jax.local_device_count()} x {kind}{where}"
