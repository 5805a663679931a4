"""The diffusers benchmark runs end to end (small models, one repeat) and writes its results."""
import csv
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers", reason="diffusers is not installed (.ci/run installs it)")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ holds scripts, not a package
import convert_diffusers  # noqa: E402


def test_quick_run_writes_csv_and_json(tmp_path):
    results = convert_diffusers.main(["--quick", "--device", "cpu", "--warmup", "0",
                                      "--repeats", "1", "--output-dir", str(tmp_path)])
    assert [(r.model, r.mode) for r in results] == [
        ("unet2d", "infer"), ("unet2d", "train"), ("sd-unet", "infer"), ("sd-unet", "train")]
    for r in results:
        assert r.fused_norms > 0 and r.left_norms > 0  # attention GroupNorms stay
        assert r.max_abs_diff < 1e-4, r  # the converted model computes the same function
        assert r.original_ms > 0 and r.converted_ms > 0
    [csv_path] = tmp_path.glob("diffusers-cpu-*-quick-*.csv")
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 4 and float(rows[0]["speedup"]) > 0
    meta = json.loads(csv_path.with_suffix(".json").read_text())
    assert meta["diffusers_version"] and len(meta["results"]) == 4
