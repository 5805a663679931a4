"""A quick look at the fused op: a ResNet-50 stage-1 sized tensor, checked against the eager
reference and timed against it (forward, and forward + backward)."""
import statistics
import time

import torch

import fusednorm
from fusednorm import reference


def median_ms(fn, repeats=5):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main():
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape, groups = (8, 256, 56, 56), 8
    x = torch.randn(shape, device=device, requires_grad=True)
    module = fusednorm.GroupNormProxyAct(groups, shape[1], activation="relu").to(device)
    backend = fusednorm.select_backend(None, x)
    print(f"fusednorm {fusednorm.__version__} | torch {torch.__version__} | device {device} | "
          f"input {tuple(shape)} fp32, G={groups}, ReLU + Proxy Norm | backend '{backend}'")

    fused_out = module(x)
    ref_args = (x, groups, module.weight, module.bias, module.proxy_bias, module.proxy_weight)
    ref_out = reference.group_norm_proxy_act(*ref_args)
    grad = torch.randn_like(fused_out)
    fused_dx = torch.autograd.grad(fused_out, x, grad)[0]
    ref_dx = torch.autograd.grad(ref_out, x, grad)[0]
    print(f"max |fused - reference|: output {(fused_out - ref_out).abs().max().item():.2e}, "
          f"dx {(fused_dx - ref_dx).abs().max().item():.2e}")

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def forward(fn):
        def run():
            with torch.no_grad():
                fn()
            sync()
        return run

    def forward_backward(fn):
        def run():
            torch.autograd.grad(fn(), x, grad)
            sync()
        return run

    rows = [("fusednorm (" + backend + ")", lambda: module(x)),
            ("eager reference", lambda: reference.group_norm_proxy_act(*ref_args))]
    print(f"{'provider':<24}{'forward ms':>12}{'fwd+bwd ms':>12}")
    results = {}
    for name, fn in rows:
        results[name] = (median_ms(forward(fn)), median_ms(forward_backward(fn)))
        print(f"{name:<24}{results[name][0]:>12.1f}{results[name][1]:>12.1f}")
    fused, eager = results[rows[0][0]], results[rows[1][0]]
    print(f"speedup over eager: forward {eager[0] / fused[0]:.2f}x, fwd+bwd {eager[1] / fused[1]:.2f}x")


if __name__ == "__main__":
    main()
