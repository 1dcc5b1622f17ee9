"""eb_jax: Early-Bird tickets (You et al., ICLR 2020) in JAX/Flax.

Importing it changes no process state; entry points call
`eb_jax.platform.configure_process()` before JAX starts (the CPU convolution path and
host memory reuse, see platform.py).
"""

__version__ = "0.1.0"
