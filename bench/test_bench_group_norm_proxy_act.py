"""pytest-benchmark suite of the CPU providers: small shapes, a few short rounds, for CI (< 30 s).

    pytest bench/test_bench_group_norm_proxy_act.py                       # times each case
    pytest bench/test_bench_group_norm_proxy_act.py --benchmark-disable   # runs each once

The torch.compile providers are left out (compiling takes longer than the whole suite may);
fusednorm-cpu is skipped, with the reason, when the C++ CPU kernel is not built.
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ holds scripts, not a package
import group_norm_proxy_act as bench  # noqa: E402

CPU = torch.device("cpu")
PROVIDERS = ["fusednorm-cpu", "reference", "native-gn", "batchnorm"]
CASES = [
    bench.Case("resnet", (2, 64, 16, 16), 8, "relu", True),
    bench.Case("diffusion", (1, 64, 16, 16), 32, "silu", False),
]

# Each case: 3 rounds at least, and no more than 0.05 s of rounds once there are 3.
pytestmark = pytest.mark.benchmark(min_rounds=3, max_time=0.05, warmup=True, warmup_iterations=2)


@pytest.mark.parametrize("mode", bench.MODES)
@pytest.mark.parametrize("layout", bench.LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=lambda case: f"{case.shape_text}-{case.op_text}")
@pytest.mark.parametrize("provider_name", PROVIDERS)
def test_group_norm_proxy_act(benchmark, provider_name, case, layout, mode):
    provider = bench.PROVIDERS[provider_name]
    reason = provider.unavailable(CPU)
    if reason is not None:
        pytest.skip(f"{provider_name}: {reason}")
    inputs = bench.make_inputs(case, torch.float32, layout, CPU)
    forward, params = provider.build(case, inputs)
    grad_y = torch.randn_like(inputs.x)
    benchmark.group = f"{case.shape_text} {case.op_text} {layout} {mode}"
    benchmark(bench.timed_call(mode, forward, inputs.x, params, grad_y))
