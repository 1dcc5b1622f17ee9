"""Vision Transformer with a slimming gate per attention head and per MLP hidden neuron.

The gates (EarlyBERT's slimming coefficients, initialised to 1) play the BN scales' part:
each is a param named `scale`, `bn_paths()` lists their modules, so the L1 term, the
masks, the detector and the surgery read them as they read a CNN's BN scales. A head's
gate multiplies its attention output before the output projection; a neuron's gate its
activation after the GELU. Every layer is a top-level module (`block{i}_query`, ...)
so the surgery's (module, param, axis) cuts address them directly; the q/k/v kernels
keep flax's explicit head axis, [hidden, heads, head_dim], the output kernel
[heads, head_dim, hidden]. A cut ViT is the same class with per-layer `head_widths` and
`mlp_widths`; the head dimension stays hidden // num_heads.

Pre-LN blocks, a class token, learned position embeddings, no dropout (big_vision's
plain ViT); LayerNorm and softmax compute in fp32 under bf16.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from eb_jax.lowp import FP32, Precision

_xavier = nn.initializers.xavier_uniform()


class Gate(nn.Module):
    """Multiplies each unit along `axis` of its input by a learned `scale` (init 1)."""

    axis: int = -1

    @nn.compact
    def __call__(self, x):
        width = x.shape[self.axis]
        scale = self.param("scale", nn.initializers.ones, (width,), jnp.float32)
        shape = [1] * x.ndim
        shape[self.axis] = width
        return x * scale.reshape(shape).astype(x.dtype)

    def flops(self, inputs, out) -> tuple[int, int]:
        """(FLOPs, MACs) of one call: one multiply per element."""
        return out.size, 0


class LayerNorm(nn.Module):
    """LayerNorm over the last axis in fp32. Its affine params are `weight` and `bias`:
    `scale` marks the ticket's gates, which the L1 term finds by that name."""

    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x):
        features = x.shape[-1]
        weight = self.param("weight", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        y = x.astype(jnp.float32)
        mean = jnp.mean(y, -1, keepdims=True)
        var = jnp.mean(jnp.square(y - mean), -1, keepdims=True)
        y = (y - mean) * jax.lax.rsqrt(var + self.epsilon) * weight + bias
        return y.astype(x.dtype)

    def flops(self, inputs, out) -> tuple[int, int]:
        """Mean and variance sums, normalisation, scale and shift: 5 per element."""
        return 5 * out.size, 0


class Gelu(nn.Module):
    """GELU (tanh form), counted as one FLOP per element like ReLU."""

    @nn.compact
    def __call__(self, x):
        return nn.gelu(x)

    def flops(self, inputs, out) -> tuple[int, int]:
        return out.size, 0


class DotProductAttention(nn.Module):
    """softmax(q k^T / sqrt(d)) v per head over [batch, tokens, heads, head_dim]."""

    @nn.compact
    def __call__(self, q, k, v):
        q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", weights, v)

    def flops(self, inputs, out) -> tuple[int, int]:
        """Both matmuls (2 per multiply-add), the q scaling (1 per element) and the
        softmax (exp, sum, divide: 3 per score)."""
        batch, tokens, heads, dim = out.shape
        macs = 2 * batch * heads * tokens * tokens * dim
        return 2 * macs + out.size + 3 * batch * heads * tokens * tokens, macs


class ViT(nn.Module):
    """ViT with head and neuron gates. `head_widths` / `mlp_widths`: kept heads and
    MLP units per block (None = `num_heads` / `mlp_dim` everywhere)."""

    num_classes: int = 10
    patch_size: int = 16
    hidden: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_dim: int = 768
    head_widths: tuple | None = None
    mlp_widths: tuple | None = None
    conv_impl: str = "auto"  # unused: every model takes it
    precision: Precision = FP32

    WIDTH_FIELDS = ("head_widths", "mlp_widths")
    ELEMENTWISE_IN_MODULES = True  # cost.py: every non-matmul FLOP is a module's own

    def widths(self) -> tuple[tuple, tuple]:
        """(heads, mlp units) per block."""
        heads = self.head_widths or (self.num_heads,) * self.depth
        mlp = self.mlp_widths or (self.mlp_dim,) * self.depth
        if len(heads) != self.depth or len(mlp) != self.depth:
            raise ValueError(f"a depth-{self.depth} ViT needs {self.depth} head and mlp widths")
        if self.hidden % self.num_heads:
            raise ValueError(f"hidden={self.hidden} must be a multiple of {self.num_heads} heads")
        return heads, mlp

    def bn_paths(self) -> list[tuple[str, ...]]:
        """Param paths of the gates (the ticket's scales): per block, heads then neurons."""
        paths = []
        for i in range(self.depth):
            paths += [(f"block{i}_head_gate",), (f"block{i}_mlp_gate",)]
        return paths

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train  # no dropout, no BatchNorm: training and evaluation compute the same
        if self.precision.quantized:
            raise ValueError(
                "precision 'bfp8' is implemented for the CNNs; a ViT takes fp32 or bf16"
            )
        dtype = self.precision.compute_dtype
        heads, mlp = self.widths()
        x = self._embed(x.astype(dtype), dtype)
        for i in range(self.depth):
            x = x + self._attention(LayerNorm(name=f"block{i}_ln1")(x), i, heads[i], dtype)
            x = x + self._mlp(LayerNorm(name=f"block{i}_ln2")(x), i, mlp[i], dtype)
        x = LayerNorm(name="norm")(x)[:, 0]
        head = nn.Dense(
            self.num_classes, kernel_init=nn.initializers.zeros, dtype=dtype, name="classifier"
        )
        return head(x).astype(jnp.float32)

    def _embed(self, x, dtype):
        """Patches (non-overlapping, row-major) -> tokens, class token first, + positions."""
        b, h, w, c = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image {h}x{w} is not a whole number of {p}x{p} patches")
        x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(b, (h // p) * (w // p), p * p * c)
        x = nn.Dense(self.hidden, dtype=dtype, name="embedding")(x)
        cls = self.param("cls", nn.initializers.zeros, (1, 1, self.hidden), jnp.float32)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (b, 1, self.hidden)), x], 1)
        pos_init = nn.initializers.normal(0.02)
        pos = self.param("pos_embedding", pos_init, (1, x.shape[1], self.hidden), jnp.float32)
        return x + pos.astype(dtype)

    def _attention(self, x, i: int, heads: int, dtype):
        dim = self.hidden // self.num_heads
        qkv = [
            nn.DenseGeneral((heads, dim), kernel_init=_xavier, dtype=dtype, name=f"block{i}_{n}")(x)
            for n in ("query", "key", "value")
        ]
        y = DotProductAttention(name=f"block{i}_attention")(*qkv)
        y = Gate(axis=-2, name=f"block{i}_head_gate")(y)
        out = nn.DenseGeneral(
            self.hidden, axis=(-2, -1), kernel_init=_xavier, dtype=dtype, name=f"block{i}_out"
        )
        return out(y)

    def _mlp(self, x, i: int, width: int, dtype):
        bias_init = nn.initializers.normal(1e-6)
        dense = dict(kernel_init=_xavier, bias_init=bias_init, dtype=dtype)
        x = nn.Dense(width, name=f"block{i}_mlp1", **dense)(x)
        x = Gate(name=f"block{i}_mlp_gate")(Gelu(name=f"block{i}_gelu")(x))
        return nn.Dense(self.hidden, name=f"block{i}_mlp2", **dense)(x)
