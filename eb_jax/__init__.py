"""eb_jax: Early-Bird tickets (You et al., ICLR 2020) in JAX/Flax."""

from eb_jax import platform as _platform

__version__ = "0.1.0"

# Before JAX initialises its backend and threads: the fast CPU convolution path, and
# host memory kept for reuse between steps (see platform.py).
_platform.set_cpu_xla_flags(True)
_platform.reuse_host_memory(True)
