"""A small symmetric positive definite solve, shared by the Newton and pivoting solvers of the aggregators."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def spd_solve(m: jax.Array, rhs: jax.Array) -> jax.Array:
    """``m^-1 rhs`` for a small symmetric positive definite ``m`` with eigenvalues >= 1.

    Gauss-Jordan elimination without pivoting, which is stable here: every pivot is a Schur
    complement of ``m``, so at least 1. A ``fori_loop`` of rank-one updates compiles in a
    fraction of the time of a batched LU or Cholesky solve.
    """
    k = m.shape[0]

    def eliminate(i: int, a: jax.Array) -> jax.Array:
        row = a[i] / a[i, i]
        return (a - a[:, i, None] * row[None, :]).at[i].set(row)

    return jax.lax.fori_loop(0, k, eliminate, jnp.concatenate([m, rhs], axis=1))[:, k:]
