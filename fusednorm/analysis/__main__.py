"""``python -m fusednorm.analysis``: the paper's power plots (its Fig. 2 and Fig. 6).

For each normalization, a network at initialization is applied to one batch of natural images
(crops of scikit-learn's sample photos; ``--inputs synthetic`` for smooth random images), and the
four terms of the power decomposition of every normalization step's output (before affine and
activation: the paper's y^l) are plotted against depth as stacked areas (they sum to 1): the mean
over ``--seeds`` seeds (weights and crops), with the min-max range over seeds of each boundary
between terms as a band. ``--figure random-net``: the paper's Definition 1 net (plain, 3x3
periodic convolutions, gamma ~ N(1, 0.2^2), beta ~ N(0, 0.2^2)); ``--figure resnet50``: the
project's pre-activation ResNet-50 (``resnet_v2(50)``, default initialization).
"""
from __future__ import annotations

import argparse
import time

import torch

from ..models.norms import NORMS
from .random_net import (PAPER_NORMS, natural_inputs, power_profile, random_inputs,
                         resnet_power_profile)

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
    parser.add_argument("--figure", choices=("random-net", "resnet50"), default="random-net",
                        help="the paper's Fig. 2 (random plain nets) or Fig. 6 (ResNet-50 v2)")
    parser.add_argument("--norms", nargs="+", default=list(PAPER_NORMS), choices=NORMS,
                        help="the norms to compare, one panel each")
    parser.add_argument("--depth", type=int, default=50, help="random-net: norm-act-conv layers")
    parser.add_argument("--width", type=int, default=256, help="random-net: channels per layer")
    parser.add_argument("--groups", type=int, default=8, help="groups of GN and GN+PN")
    parser.add_argument("--activation", default="relu", help="the activation after each norm")
    parser.add_argument("--inputs", choices=("natural", "synthetic"), default="natural",
                        help="natural: crops of scikit-learn's sample photos (needs scikit-learn)")
    parser.add_argument("--batch", type=int, default=32, help="input images per forward")
    parser.add_argument("--size", type=int,
                        help="image height and width (default: 16 random-net, 64 resnet50)")
    parser.add_argument("--padding", default="circular", choices=("circular", "zeros"),
                        help="random-net: boundary of the 3x3 convolutions (circular: periodic)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 of weights and inputs")
    parser.add_argument("--out", default="power_plots.png", help="PNG file to write")
    parser.add_argument("--dpi", type=int, default=80, help="resolution of the PNG")
    args = parser.parse_args(argv)
    args.size = args.size or (16 if args.figure == "random-net" else 64)

    profiles = {}
    for norm in args.norms:
        start = time.perf_counter()
        runs = []
        for seed in range(args.seeds):
            inputs = (natural_inputs(args.batch, args.size, seed=seed) if args.inputs == "natural"
                      else random_inputs(args.batch, 3, args.size, seed))
            if args.figure == "random-net":
                runs.append(power_profile(norm, inputs, depth=args.depth, width=args.width,
                                          num_groups=args.groups, activation=args.activation,
                                          padding_mode=args.padding, seed=seed))
            else:
                runs.append(resnet_power_profile(norm, inputs, depth=50, seed=seed,
                                                 num_groups=args.groups,
                                                 activation=args.activation))
        profiles[norm] = torch.stack(runs)  # (seeds, layers, 4)
        last = ", ".join(f"{t:.3f}" for t in profiles[norm][:, -1].mean(0).tolist())
        print(f"{LABELS[norm]:>6}: last layer terms, mean over seeds [{last}] "
              f"({time.perf_counter() - start:.1f} s)", flush=True)
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
    for ax, (norm, runs) in zip(axes.flat, profiles.items()):
        depth = torch.arange(1, runs.shape[1] + 1).numpy()
        ax.stackplot(depth, runs.mean(0).T.numpy(), colors=COLORS, labels=TERM_LABELS)
        boundaries = runs.cumsum(dim=2)[:, :, :3]  # (seeds, layers, 3): between the 4 terms
        for k in range(3):
            ax.fill_between(depth, boundaries[:, :, k].min(0).values.numpy(),
                            boundaries[:, :, k].max(0).values.numpy(), color="black",
                            alpha=0.25, linewidth=0)
        ax.set_title(LABELS[norm])
        ax.set_xlim(1, runs.shape[1])
        ax.set_ylim(0, 1)
    for ax in axes.flat[len(profiles):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("normalization layer")
    for ax in axes[:, 0]:
        ax.set_ylabel("fraction of power")
    fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="lower center", ncol=4,
               frameon=False)
    what = (f"random nets, {args.depth} layers, width {args.width}" if args.figure == "random-net"
            else "ResNet-50 v2")
    fig.suptitle(f"Power decomposition after each normalization step, at initialization ({what}, "
                 f"{args.activation}, {args.inputs} inputs, mean and range of {args.seeds} seeds)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(args.out, dpi=args.dpi)
    plt.close(fig)


if __name__ == "__main__":
    main()
