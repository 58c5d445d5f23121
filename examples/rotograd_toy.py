"""RotoGrad's toy problem: two tasks with conflicting optima on a 2-D shared representation.

This follows the example shipped with the authors' library (``example/toy.yml``,
``tasks.py``, ``dataset.py``): a constant input ``x = (0, 0)`` (a batch of
256), a ReLU backbone 2 -> 10 -> 2 giving the shared latent ``z``, identity
heads, and two non-convex task losses on the (rotated) latent::

    f_s(r) = - sum_{i=1,2} sin(3 (r_i + 1.5 s)) / (r_i + 1.5 s) + ||r + 1.5 s||_1

with ``s = -1`` ("left", global minimum at r = (1.5, 1.5)) and ``s = +1``
("right", minimum at (-1.5, -1.5)). Without rotations both tasks read the
same point and training settles on a compromise between the two minima; with
RotoGrad each task sees ``r_k = R_k z`` and both can reach their own minimum.

Runs the plain model (``RotateOnly`` with frozen rotations, i.e. the plain sum)
and RotoGrad with loss normalisation, as the authors' config
(``normalize: true``; rotations trained by Adam, 0.05), prints the final losses
and saves ``examples/out/rotograd_toy.png``: loss contours of both tasks and
the trajectories of ``r_1`` and ``r_2`` with and without RotoGrad.

The defaults are the authors' config: SGD with learning rate 0.001 for the
network, 400 steps (one batch per epoch), Adam with 0.05 for the rotations,
seed 5. Larger network learning rates make the iterates bounce around the
non-smooth minima (the L1 term's gradient never vanishes) and the rotations
chase those oscillations. One deviation: Flax's ``Dense`` initialises biases
at zero, which with a zero input would leave only the output bias trainable;
the backbone draws its first bias uniformly, as PyTorch's ``Linear`` does.

    python examples/rotograd_toy.py [--steps 400] [--lr 0.001] [--rotation-lr 0.05] [--seed 5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from softadapt_jax.flax.rotograd import (
    RotateOnly,
    RotoGrad,
    create_rotograd_train_state,
    make_rotograd_train_step,
    rotate,
    rotograd_optimizer,
)

OUT = Path(__file__).parent / "out" / "rotograd_toy.png"
BATCH = 256


class Backbone(nn.Module):
    """The authors' encoder: Linear(2, 10) -> ReLU -> Linear(10, 2), with biases."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # Non-zero bias init, as PyTorch's Linear: with a zero input and zero biases ReLU would
        # block every gradient but the output bias's.
        init = nn.initializers.uniform(scale=1.0)
        h = nn.relu(nn.Dense(10, bias_init=lambda k, s, d=jnp.float32: init(k, s, d) - 0.5)(x))
        return nn.Dense(2)(h)


class Identity(nn.Module):
    """The authors' decoder with ``num_layers: 0`` and identity activation."""

    @nn.compact
    def __call__(self, r: jax.Array) -> jax.Array:
        return r


def toy(r: jax.Array, sign: float) -> jax.Array:
    """The authors' toy loss per sample; ``sin(3u)/u = 3 sinc(3u/pi)`` avoids 0/0 at the optimum."""
    u = r + sign * 1.5
    return -jnp.sum(3.0 * jnp.sinc(3.0 * u / jnp.pi), axis=-1) + jnp.sum(jnp.abs(u), axis=-1)


def loss_fn(preds: list[jax.Array], targets: None) -> jax.Array:
    del targets
    return jnp.stack([jnp.mean(toy(preds[0], -1.0)), jnp.mean(toy(preds[1], 1.0))])


def run(model: RotoGrad, rotation_lr: float, args: argparse.Namespace, label: str) -> dict[str, np.ndarray]:
    x = jnp.zeros((BATCH, 2))
    params = model.init(jax.random.PRNGKey(args.seed), x)["params"]
    tx = rotograd_optimizer(
        optax.sgd(args.lr), optax.adam(rotation_lr) if rotation_lr > 0 else optax.set_to_zero()
    )
    state = create_rotograd_train_state(model, params, tx)
    step = jax.jit(make_rotograd_train_step(model, loss_fn))
    latent = jax.jit(
        lambda p: (
            model.apply({"params": p}, x[:1], method="encode")[0],
            model.apply({"params": p}, method="rotation_matrices"),
        )
    )
    traj, losses = [], []
    for _ in tqdm(range(args.steps), desc=label, leave=False, file=sys.stdout):
        z, rots = latent(state.params)
        traj.append([np.asarray(rotate(z, rots[k])) for k in range(2)])
        state, metrics = step(state, x, None)
        losses.append(np.asarray(metrics["losses"]))
    z, rots = latent(state.params)
    traj.append([np.asarray(rotate(z, rots[k])) for k in range(2)])
    final = np.asarray(loss_fn(model.apply({"params": state.params}, x), None))
    return {"traj": np.asarray(traj), "losses": np.asarray(losses), "final": final}


def plot(results: dict[str, dict[str, np.ndarray]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.linspace(-3.5, 3.5, 201)
    xx, yy = np.meshgrid(grid, grid)
    pts = jnp.asarray(np.stack([xx, yy], -1))
    f1, f2 = np.asarray(toy(pts, -1.0)), np.asarray(toy(pts, 1.0))
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 5.4))
    colors = ("tab:blue", "tab:red")
    for ax, (name, res) in zip(np.atleast_1d(axes), results.items(), strict=True):
        ax.contour(xx, yy, f1, levels=15, cmap="Blues", alpha=0.6, linewidths=0.8)
        ax.contour(xx, yy, f2, levels=15, cmap="Reds", alpha=0.6, linewidths=0.8)
        for k, task in enumerate(("left: min (1.5, 1.5)", "right: min (-1.5, -1.5)")):
            t = res["traj"][:, k]
            # r_1 dashed on top: without rotations r_1 = r_2 = z and the two paths coincide.
            style = {"ls": "--", "lw": 1.5, "zorder": 3} if k == 0 else {"ls": "-", "lw": 2.5, "zorder": 2}
            ax.plot(t[:, 0], t[:, 1], color=colors[k], label=f"r_{k + 1} ({task})", **style)
            ax.plot(*t[0], "o", color=colors[k], ms=6)
            ax.plot(*t[-1], "*", color=colors[k], ms=14, mec="k")
        ax.plot([1.5, -1.5], [1.5, -1.5], "kx", ms=9)
        ax.set_title(f"{name}: final losses {res['final'][0]:.2f}, {res['final'][1]:.2f}")
        ax.set_xlabel("r[0]")
        ax.set_ylabel("r[1]")
        ax.set_aspect("equal")
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle("RotoGrad toy: trajectory of each task's (rotated) representation (o start, * end)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--steps", type=int, default=400, help="training steps (>= 1)")
    p.add_argument("--lr", type=float, default=0.001, help="SGD learning rate of the backbone (> 0)")
    p.add_argument(
        "--rotation-lr", type=float, default=0.05, help="Adam learning rate of the rotations (> 0)"
    )
    p.add_argument("--seed", type=int, default=5, help="initialisation seed")
    p.add_argument("--out", type=Path, default=OUT, help="where to save the plot")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if not args.lr > 0 or not args.rotation_lr > 0:
        p.error(f"--lr and --rotation-lr must be > 0, got {args.lr} and {args.rotation_lr}")
    return args


def main(argv: list[str] | None = None) -> dict[str, dict[str, np.ndarray]]:
    args = parse_args(argv)
    heads = [Identity(), Identity()]
    results = {
        "without RotoGrad": run(
            RotateOnly(Backbone(), heads, latent_size=2, normalize_losses=True), 0.0, args, "plain"
        ),
        "with RotoGrad": run(
            RotoGrad(Backbone(), heads, latent_size=2, normalize_losses=True),
            args.rotation_lr,
            args,
            "rotograd",
        ),
    }
    print(f"{'method':<18} {'loss left':>10} {'loss right':>11}   (global minimum of each: -6.00)")
    for name, res in results.items():
        print(f"{name:<18} {res['final'][0]:>10.3f} {res['final'][1]:>11.3f}")
    plot(results, args.out)
    print(f"saved {args.out}")
    return results


if __name__ == "__main__":
    main()
