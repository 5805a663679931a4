"""Train a small pre-activation ResNet on scikit-learn's digits with BN, GN and GN+PN (CPU).

The digits (1797 grayscale 8x8 images, 10 classes) ship with scikit-learn, an optional
dependency of this example only: ``pip install scikit-learn``.

    python examples/train_digits.py [--epochs 15] [--norms bn gn gn+pn]
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from fusednorm.models import NORMS, resnet_v2


def load_digits_tensors(seed):
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("this example needs scikit-learn for its dataset: pip install scikit-learn")
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(y))
    train, val = order[:split], order[split:]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return (x[train], y[train]), (x[val], y[val])


@torch.no_grad()
def accuracy(model, x, y, batch_size=256):
    model.eval()
    correct = sum((model(xb).argmax(1) == yb).sum().item()
                  for xb, yb in zip(x.split(batch_size), y.split(batch_size)))
    return correct / len(y)


def train(norm, data, args):
    (x_train, y_train), (x_val, y_val) = data
    torch.manual_seed(args.seed)
    model = resnet_v2(args.depth, num_classes=10, norm=norm, num_groups=args.groups,
                      width=args.width, in_channels=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4,
                                nesterov=True)
    steps = args.epochs * -(-len(y_train) // args.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=steps)
    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        for batch in torch.randperm(len(y_train), generator=gen).split(args.batch_size):
            loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        if args.verbose:
            print(f"  {norm} epoch {epoch + 1}: loss {loss.item():.3f}, "
                  f"val {accuracy(model, x_val, y_val):.4f}")
    seconds = time.perf_counter() - start
    return accuracy(model, x_train, y_train), accuracy(model, x_val, y_val), seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--norms", nargs="+", default=["bn", "gn", "gn+pn"], choices=NORMS)
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="print every epoch")
    args = parser.parse_args()

    data = load_digits_tensors(args.seed)
    print(f"digits: {len(data[0][1])} train / {len(data[1][1])} validation images; ResNet-v2 "
          f"depth {args.depth}, width {args.width}, {args.epochs} epochs, batch {args.batch_size}")
    print(f"{'norm':>6}  {'train acc':>9}  {'val acc':>7}  {'time':>6}")
    for norm in args.norms:
        train_acc, val_acc, seconds = train(norm, data, args)
        print(f"{norm:>6}  {train_acc:9.4f}  {val_acc:7.4f}  {seconds:5.0f}s")


if __name__ == "__main__":
    main()
