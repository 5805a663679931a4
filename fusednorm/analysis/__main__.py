"""``python -m fusednorm.analysis``: the paper's random-network experiment, drawn as power plots.

For each normalization, a deep random convolutional net (:func:`random_net`) is applied to one
batch of fixed-seed random images, and the four terms of the power decomposition of every
normalization layer's output are plotted against depth as stacked areas (they sum to 1).
"""
from __future__ import annotations

import argparse
import time

import torch

from ..models.norms import NORMS
from .random_net import PAPER_NORMS, power_profile, random_inputs

LABELS = {"bn": "BN", "ln": "LN", "in": "IN", "gn": "GN", "bn+pn": "BN+PN", "ln+pn": "LN+PN",
          "gn+pn": "GN+PN", "in+pn": "IN+PN"}
COLORS = ("#d62728", "#ff9896", "#1f77b4", "#aec7e8")
TERM_LABELS = (r"$(E_n[\mu_c])^2$", r"$\mathrm{Var}_n[\mu_c]$", r"$(E_n[\sigma_c])^2$",
               r"$\mathrm{Var}_n[\sigma_c]$")


def main(argv=None):
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        """The module docstring as written, and every flag's default."""

    parser = argparse.ArgumentParser(prog="python -m fusednorm.analysis", description=__doc__,
                                     formatter_class=Formatter)
    parser.add_argument("--norms", nargs="+", default=list(PAPER_NORMS), choices=NORMS,
                        help="the norms to compare, one panel each")
    parser.add_argument("--depth", type=int, default=50, help="number of norm-act-conv layers")
    parser.add_argument("--width", type=int, default=128, help="channels of every layer")
    parser.add_argument("--groups", type=int, default=8, help="groups of GN and GN+PN")
    parser.add_argument("--activation", default="relu", help="the activation after each norm")
    parser.add_argument("--batch", type=int, default=32, help="input images per forward")
    parser.add_argument("--size", type=int, default=16, help="image height and width")
    parser.add_argument("--padding", default="circular", choices=("circular", "zeros"),
                        help="boundary of the 3x3 convolutions (circular: periodic, as the paper)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the inputs and weights")
    parser.add_argument("--out", default="power_plots.png", help="PNG file to write")
    parser.add_argument("--dpi", type=int, default=80, help="resolution of the PNG")
    args = parser.parse_args(argv)

    inputs = random_inputs(args.batch, 3, args.size, args.seed)
    profiles = {}
    for norm in args.norms:
        start = time.perf_counter()
        profiles[norm] = power_profile(norm, inputs, depth=args.depth, width=args.width,
                                       num_groups=args.groups, activation=args.activation,
                                       padding_mode=args.padding, seed=args.seed)
        last = ", ".join(f"{t:.3f}" for t in profiles[norm][-1].tolist())
        print(f"{LABELS[norm]:>6}: last layer terms [{last}] ({time.perf_counter() - start:.1f} s)")
    plot(profiles, args)
    print(f"wrote {args.out}")


def plot(profiles, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, len(profiles))
    rows = -(-len(profiles) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 2.8 * rows + 0.8), sharex=True,
                             sharey=True, squeeze=False)
    for ax, (norm, terms) in zip(axes.flat, profiles.items()):
        depth = torch.arange(1, terms.shape[0] + 1).numpy()
        ax.stackplot(depth, terms.T.numpy(), colors=COLORS, labels=TERM_LABELS)
        ax.set_title(LABELS[norm])
        ax.set_xlim(1, terms.shape[0])
        ax.set_ylim(0, 1)
    for ax in axes.flat[len(profiles):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("layer")
    for ax in axes[:, 0]:
        ax.set_ylabel("fraction of power")
    fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="lower center", ncol=4,
               frameon=False)
    fig.suptitle(f"Power decomposition of each norm layer's output at initialization "
                 f"({args.depth} layers, width {args.width}, {args.activation})", fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(args.out, dpi=args.dpi)
    plt.close(fig)


if __name__ == "__main__":
    main()
