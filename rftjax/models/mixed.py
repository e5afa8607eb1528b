"""Mixed-precision projections: bf16 operands, products accumulated and returned in float32.

`matmul(x, w)` is ``x · wᵀ`` for a weight in the Hugging Face layout ``[out, in]``, with both
operands rounded to bfloat16 and the sums kept in float32 (the precision a TPU's default f32
matmul has). Its gradient rounds the incoming cotangent to bfloat16 the same way:
``dx = bf16(g) · bf16(w)``, ``dw = bf16(g)ᵀ · bf16(x)``.

Why a function of its own: on CPUs with AVX512-BF16, XLA:CPU runs a bf16 × bf16 → f32 dot
through YNNPACK at about twice the float32 rate, but only when both operands are row-major with
the contraction on the left operand's last and the right operand's first axis. A transpose
inside the program stays a layout change (column-major), so ``x · wᵀ`` and the weight gradient
would fall back to float32 (or, when XLA's later passes change a layout, to a dot its runtime
refuses). On CPU each transposed operand is therefore made a fresh row-major array by a while
loop that XLA cannot elide (its trip count is not a constant); on other backends it is a plain
transpose. Dots too small or of vectors for YNNPACK multiply the rounded operands in float32:
the same products, summed in another order.

A weight used by many calls in one program (each length bucket, decode phase and micro-batch)
is rounded and transposed once: `prepare(w)` gives a `Prepared` that `matmul` takes in place
of w (`models.prepare_matmuls` does it for a model's params).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

BF16, F32 = jnp.bfloat16, jnp.float32
_MIN_DIM = 8  # YNNPACK takes a dot when some dimension is at least this and none is a vector


def _row_major_transpose(t: jax.Array) -> jax.Array:
    """``t.T`` materialized row-major on CPU (see the module); ``t.T`` elsewhere."""
    if jax.default_backend() != "cpu":
        return t.T
    trips = jax.lax.optimization_barrier(jnp.int32(1))  # not a constant: the loop stays
    _, out = jax.lax.while_loop(
        lambda c: c[0] < trips, lambda c: (c[0] + 1, t.T), (jnp.int32(0), jnp.zeros_like(t.T))
    )
    return out


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a [M, K] · b [K, N]`` of bf16 operands, accumulated and returned in float32."""
    (m, k), n = a.shape, b.shape[1]
    if min(m, n) < 2 or max(m, k, n) < _MIN_DIM:
        return jnp.dot(a.astype(F32), b.astype(F32))
    # The barrier keeps XLA from folding a later transpose of the product into the dot (it
    # would swap the operands into a column-major one, which YNNPACK refuses at run time).
    return jax.lax.optimization_barrier(jnp.dot(a, b, preferred_element_type=F32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Prepared:
    """A weight [out, in] with its bfloat16 operands made once, for many `matmul` calls (the
    length buckets and decode phases of one step would otherwise each round and transpose
    every weight again: XLA does not move that work out of a `switch` or a loop).

    `weight` is the parameter itself (its gradient arrives there); `transposed` is bf16
    [in, out] row-major; `rounded` is bf16 [out, in] for the backward pass, or None where
    nothing is differentiated (made per call when needed)."""

    weight: jax.Array
    transposed: jax.Array
    rounded: jax.Array | None = None


def prepare(w: jax.Array, *, backward: bool = False) -> Prepared:
    """`Prepared` operands of weight w [out, in]; `backward`: keep the rounded weight too."""
    wb = jax.lax.stop_gradient(w).astype(BF16)  # w's gradient is `matmul`'s own, never theirs
    return Prepared(w, _row_major_transpose(wb), wb if backward else None)


def matmul(x: jax.Array, w: jax.Array | Prepared) -> jax.Array:
    """``x [M, K] · w [N, K]ᵀ -> [M, N]``: x float32, w float32 or `Prepared`, operands rounded
    to bfloat16, products summed in float32."""
    p = w if isinstance(w, Prepared) else prepare(w, backward=True)
    rounded = p.rounded if p.rounded is not None else jax.lax.stop_gradient(p.weight).astype(BF16)
    return _product(x, p.weight.astype(F32), p.transposed, rounded)


@jax.custom_vjp
def _product(x, w, wt, wb):
    """x · wᵀ from the prepared operands wt = bf16(w)ᵀ and wb = bf16(w); w carries the gradient."""
    return _forward(x, w, wt, wb)[0]


def _forward(x, w, wt, wb):
    xb = x.astype(BF16)
    return _dot(xb, wt), (xb, wb)


def _backward(residuals, g):
    xb, wb = residuals
    gb = g.astype(BF16)
    dx = _dot(gb, wb)  # [M, N] · [N, K]: both row-major as they are
    dw = _dot(_row_major_transpose(gb), xb)  # [N, M] · [M, K]
    return dx, dw, None, None


_product.defvjp(_forward, _backward)
