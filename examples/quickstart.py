"""Quickstart: SoftAdapt weights of the original SoftAdapt README's two examples.

Three loss components over 5 epochs (component 1 rises, 2 and 3 fall, 3 ten times faster), then
the same with a fourth, worst-performing component, weighted by the three variants at beta = 0.1:

* ``"original"``:      softmax of the slopes;
* ``"normalized"``:    softmax of the slopes divided by their (signed) sum;
* ``"loss_weighted"``: the same as original, times the mean loss of each component.

64-bit floats are enabled below so that the numbers match the original PyTorch package's printout
(which computes in float64); the float32 result, the JAX default, is shown alongside. The script
checks both against the README's numbers to 4 significant digits and exits with status 1 if any
differs.

Run it with ``python examples/quickstart.py``.
"""

from __future__ import annotations

import argparse
import sys

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402

from softadapt_jax import softadapt_weights  # noqa: E402

# The README's loss histories, as the PyTorch tensors held them: integer lists are int64 tensors,
# the list containing 0.1 is a float32 tensor (so its last value is 0.10000000149011612).
LOSS_COMPONENT_1 = np.array([1, 2, 3, 4, 5], dtype=np.int64)
LOSS_COMPONENT_2 = np.array([150, 100, 50, 10, 0.1], dtype=np.float32)
LOSS_COMPONENT_3 = np.array([1500, 1000, 500, 100, 1], dtype=np.int64)
LOSS_COMPONENT_4 = np.array([10, 20, 30, 40, 50], dtype=np.int64)

BETA = 0.1
VARIANTS = ("original", "normalized", "loss_weighted")

# What the original SoftAdapt README prints (seed README), as printed.
EXPECTED = {
    3: {
        "original": "[9.9343e-01, 6.5666e-03, 3.8908e-22]",
        "normalized": "[0.3221, 0.3251, 0.3528]",
        "loss_weighted": "[8.7978e-01, 1.2022e-01, 7.1234e-20]",
    },
    4: {
        "original": "[2.8850e-01, 1.9070e-03, 1.1299e-22, 7.0959e-01]",
        "normalized": "[0.2436, 0.2459, 0.2673, 0.2432]",
        "loss_weighted": "[3.8861e-02, 5.3104e-03, 3.1465e-21, 9.5583e-01]",
    },
}
# "4 significant digits": the README rounds to 4 or 5 of them, so a relative 5e-4 covers both.
RTOL = 5e-4


def history_of(*components: np.ndarray) -> np.ndarray:
    """Stacks per-component loss lists into the library's time-major ``[T, K]`` float64 layout."""
    return np.stack([c.astype(np.float64) for c in components], axis=1)


def format_weights(weights) -> str:
    """Formats like the README: ``[9.9343e-01, 6.5666e-03, 3.8908e-22]``."""
    return "[" + ", ".join(f"{float(w):.4e}" for w in np.asarray(weights)) + "]"


def main(argv: list[str] | tuple[str, ...] = ()) -> int:
    """Prints the weights of both examples for every variant; returns 0 if all match the README."""
    argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    ).parse_args(list(argv))
    examples = {
        3: history_of(LOSS_COMPONENT_1, LOSS_COMPONENT_2, LOSS_COMPONENT_3),
        4: history_of(LOSS_COMPONENT_1, LOSS_COMPONENT_2, LOSS_COMPONENT_3, LOSS_COMPONENT_4),
    }
    failures = []
    for num_components, history in examples.items():
        print(f"Example with {num_components} loss components, history [T, K] = {history.shape}:")
        for variant in VARIANTS:
            printed = EXPECTED[num_components][variant]
            expected = np.array([float(v) for v in printed.strip("[]").split(",")])
            w64 = softadapt_weights(history, BETA, variant=variant)
            w32 = softadapt_weights(history.astype(np.float32), BETA, variant=variant)
            assert w64.dtype == np.float64 and w32.dtype == np.float32
            print(f"  {variant:<14} float64 {format_weights(w64)}")
            print(f"  {'':<14} float32 {format_weights(w32)}")
            print(f"  {'':<14} README  {printed}")
            for name, w in (("float64", w64), ("float32", w32)):
                if not np.allclose(np.asarray(w, dtype=np.float64), expected, rtol=RTOL, atol=0):
                    failures.append(f"{num_components} components, {variant}, {name}: {format_weights(w)}")
        print()
    if failures:
        print("MISMATCH with the README:\n  " + "\n  ".join(failures))
        return 1
    print("all match the README to 4 significant digits")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
