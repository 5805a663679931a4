"""pytest-benchmark suite of the CPU providers: small shapes, a few short rounds, for CI (< 30 s).
Each case also checks that what was timed computes its op: the provider's output and gradients
against the eager reference of that op (GN+PN or GN+act; batch norm + act for BatchNorm).

    pytest bench/test_bench_group_norm_proxy_act.py                       # times each case
    pytest bench/test_bench_group_norm_proxy_act.py --benchmark-disable   # runs each once

The torch.compile providers are left out (compiling takes longer than the whole suite may);
fusednorm-cpu is skipped, with the reason, when the C++ CPU kernel is not built.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fusednorm import reference
from fusednorm.activations import native_activation

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ holds scripts, not a package
from harness import cases, providers, report, timing  # noqa: E402

CPU = torch.device("cpu")
PROVIDERS = ["fusednorm-cpu", "reference", "native-gn", "batchnorm"]
CASES = [
    cases.Case("resnet", (2, 64, 16, 16), 8, "relu", True),
    cases.Case("diffusion", (1, 64, 16, 16), 32, "silu", False),
]

# Each case: 3 rounds at least, and no more than 0.05 s of rounds once there are 3.
pytestmark = pytest.mark.benchmark(min_rounds=3, max_time=0.05, warmup=True, warmup_iterations=2)


@pytest.mark.parametrize("mode", cases.MODES)
@pytest.mark.parametrize("layout", cases.LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=lambda case: f"{case.shape_text}-{case.op_text}")
@pytest.mark.parametrize("provider_name", PROVIDERS)
def test_group_norm_proxy_act(benchmark, provider_name, case, layout, mode):
    provider = providers.PROVIDERS[provider_name]
    reason = provider.unavailable(CPU)
    if reason is not None:
        pytest.skip(f"{provider_name}: {reason}")
    inputs = cases.make_inputs(case, torch.float32, layout, CPU)
    forward, params = provider.build(case, inputs)
    grad_y = torch.randn_like(inputs.x)
    benchmark.group = f"{case.shape_text} {case.op_text} {layout} {mode}"
    benchmark(timing.timed_call(mode, forward, inputs.x, params, grad_y))
    assert benchmark.stats.stats.rounds >= 3 and benchmark.stats.stats.median > 0
    forward_matches_its_op(provider_name, case, forward, inputs, params, grad_y)


def forward_matches_its_op(provider_name, case, forward, inputs, params, grad_y):
    """The timed forward (and its backward) against the eager op it stands for."""
    x = inputs.x
    if provider_name == "batchnorm":
        def expected_fn(x):
            return native_activation(case.activation)(F.batch_norm(x, None, None, training=True))
        expected_params = []
    elif provider_name == "native-gn" or not case.proxy:
        def expected_fn(x):
            return reference.group_norm_act(x, case.groups, *inputs.gn_params[:2],
                                            activation=case.activation)
        expected_params = inputs.gn_params[:2]
    else:
        def expected_fn(x):
            return reference.group_norm_proxy_act(x, case.groups, *inputs.gn_params,
                                                  activation=case.activation)
        expected_params = inputs.gn_params
    y, expected = forward(x), expected_fn(x)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    grads = torch.autograd.grad(y, [x, *params], grad_y)
    expected_grads = torch.autograd.grad(expected, [x, *expected_params], grad_y)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-4)


def test_runs_write_to_an_ignored_folder_unless_asked():
    assert cases.RESULTS_DIR == Path(__file__).resolve().parent / "results"
    assert cases.OUTPUT_DIR == Path(__file__).resolve().parent / "out"
    ignored = subprocess.run(["git", "check-ignore", "-q", str(cases.OUTPUT_DIR / "x.json")],
                             cwd=cases.REPO_ROOT, capture_output=True)
    if ignored.returncode == 128:
        pytest.skip("not a git checkout: nothing to ignore the output folder")
    assert ignored.returncode == 0, "bench/out/ is not ignored by git"


def _result(provider, ms, shape="8x64x7x7", mode="fwd+bwd"):
    return report.Result("resnet", shape, "G=8 relu+PN", "fp32", "nchw", mode, provider, ms,
                         ms, ms, ms, 1.0, 0.5, 1.0, None)


META = {"settings": {"repeats": 5}, "device_name": "test CPU", "torch_threads": 2,
        "torch_version": "0", "copy_bandwidth_gbps": 2.0}


def test_readme_table_bolds_only_what_beats_every_native_baseline():
    results = [_result("fusednorm-cpu", 1.0), _result("native-gn", 1.5), _result("batchnorm", 2.0),
               _result("fusednorm-cpu", 1.0, shape="8x64x14x14"),
               _result("native-gn", 0.9, shape="8x64x14x14"),
               _result("batchnorm", 2.0, shape="8x64x14x14")]
    rows = report.readme_table(results, META).splitlines()[4:]
    assert rows[0].startswith("| 8×64×7×7 |") and "**1.00 (" in rows[0]
    assert rows[1].startswith("| 8×64×14×14 |") and "**" not in rows[1] and "| 0.90 |" in rows[1]


def test_wins_report_names_the_fastest_and_where_a_fused_provider_trails():
    results = [_result("fusednorm-cpu", 1.0), _result("native-gn", 1.5),
               _result("fusednorm-cpu", 1.0, shape="8x64x14x14"),
               _result("native-gn", 0.8, shape="8x64x14x14")]
    fused = [providers.PROVIDERS["fusednorm-cpu"], providers.PROVIDERS["native-gn"]]
    text = report.wins_report(results, fused)
    assert "8x64x7x7 G=8 relu+PN fp32 nchw fwd+bwd: fastest fusednorm-cpu" in text
    assert "fusednorm-cpu 1.50x vs native-gn" in text
    assert "fastest native-gn 0.800 ms; fusednorm-cpu 0.80x vs native-gn" in text
    assert "fusednorm-cpu trails a baseline in 1 of 2 cases" in text


def test_readme_benchmark_table_is_regenerated_from_the_committed_run():
    """Each marked table in the README is the .md the benchmark wrote for the run it names, and
    that run's JSON regenerates it."""
    readme = (cases.REPO_ROOT / "README.md").read_text()
    matches = list(re.finditer(
        r"<!-- benchmark table: (bench/results/\S+)\.json -->\n(.*?)\n<!-- end -->", readme, re.S))
    assert matches, "README.md lacks the marked benchmark table"
    for match in matches:
        run = json.loads((cases.REPO_ROOT / f"{match.group(1)}.json").read_text())
        results = [report.Result(**r) for r in run["results"]]
        assert match.group(2).strip() == report.readme_table(results, run["meta"]).strip()
        table = (cases.REPO_ROOT / f"{match.group(1)}.md").read_text().strip()
        assert table == match.group(2).strip(), f"{match.group(1)}.md differs from the README"


def test_interleaved_timer_times_single_calls():
    timer = timing.Timer(CPU)
    calls = []
    ms = timer.once(lambda: calls.append(1))
    assert calls == [1] and ms >= 0


def test_measure_case_takes_copy_percent_from_a_copy_timed_in_its_rounds():
    import argparse

    import group_norm_proxy_act as bench

    case = CASES[0]
    inputs = cases.make_inputs(case, torch.float32, "nchw", CPU)
    chosen = [providers.PROVIDERS[name] for name in ("native-gn", "batchnorm")]
    args = argparse.Namespace(modes=["fwd", "fwd+bwd"], warmup=1, repeats=3)
    failed = []
    results = bench.measure_case(case, inputs, chosen, "fp32", "nchw", args, timing.Timer(CPU),
                                 failed)
    assert not failed and len(results) == 4
    copy_gbps = {r.case_copy_gbps for r in results}
    assert len(copy_gbps) == 1 and next(iter(copy_gbps)) > 0
    for r in results:
        assert r.copy_fraction == pytest.approx(r.gbps / r.case_copy_gbps)
