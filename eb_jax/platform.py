"""Backend-specific settings that must be in place before JAX starts its backend."""

from __future__ import annotations

import os

import jax

# XLA's Eigen convolution instead of YNNPACK's on CPU: much faster for the mid-sized
# VGG/ResNet convolutions on CPU (DESIGN.md). Ignored by other backends.
CPU_CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


def set_cpu_xla_flags(enable: bool = True) -> None:
    """Adds (or removes) eb_jax's CPU XLA flags; only effective before JAX's first use."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if f != CPU_CONV_FLAG]
    if enable:
        flags.append(CPU_CONV_FLAG)
    os.environ["XLA_FLAGS"] = " ".join(flags)


def describe() -> str:
    devices = jax.local_devices()
    return f"{len(devices)} x {devices[0].device_kind}"
