// The fusednorm operator library: schemas of fusednorm::forward/backward (the contract of
// fusednorm/ops.py, shared with the Triton ops) and the Python module fusednorm._C.
// Kernels register themselves from cpu/ and, when built with CUDA, cuda/; fake tensors and
// autograd are registered from Python when fusednorm._C is imported.
#include <torch/extension.h>
#include <torch/library.h>

#include "activations.h"
#include "cpu/kernels.h"

TORCH_LIBRARY(fusednorm, m) {
  // proxy_stats: the (2, C) m_c, s_c of proxy_statistics for these parameters, computed once per
  // training step by the autograd kernel and passed to both directions; None: computed inside.
  m.def(
      "forward(Tensor x, Tensor weight, Tensor bias, Tensor? proxy_bias, Tensor? proxy_weight, "
      "int num_groups, int activation, float slope, float eps, float proxy_eps, "
      "int num_proxy_samples, bool proxy, Tensor? proxy_stats=None) -> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "backward(Tensor grad_out, Tensor x, Tensor weight, Tensor bias, Tensor? proxy_bias, "
      "Tensor? proxy_weight, Tensor mean, Tensor rstd, int num_groups, int activation, "
      "float slope, float proxy_eps, int num_proxy_samples, bool proxy, "
      "Tensor? proxy_stats=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // Per-channel proxy mean m_c and scale s_c = 1/sqrt(v_c + proxy_eps) as a (2, C) tensor in the
  // accumulation dtype of x (x gives only its dtype and device).
  m.def(
      "proxy_statistics(Tensor x, Tensor weight, Tensor bias, Tensor? proxy_bias, "
      "Tensor? proxy_weight, int activation, float slope, float proxy_eps, "
      "int num_proxy_samples) -> Tensor",
      {at::Tag::pt2_compliant_tag});
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fusednorm C++/CUDA kernels; the ops are torch.ops.fusednorm.forward/backward";
  m.def("cpu_capability", &fusednorm::cpu::kernel_capability,
        "Instruction set of the CPU kernels in use: DEFAULT, AVX2, AVX512 or AVX512_BF16");
  m.def("built_cpu_capabilities", &fusednorm::cpu::built_capabilities,
        "The instruction sets this build has a copy of the CPU kernels for");
  // The ids compiled into the kernels; tests/test_activations.py checks them against the table
  // of fusednorm/activations.py.
  pybind11::dict ids;
  ids["identity"] = static_cast<int64_t>(fusednorm::kIdentity);
  ids["relu"] = static_cast<int64_t>(fusednorm::kRelu);
  ids["silu"] = static_cast<int64_t>(fusednorm::kSilu);
  ids["gelu"] = static_cast<int64_t>(fusednorm::kGelu);
  ids["gelu_tanh"] = static_cast<int64_t>(fusednorm::kGeluTanh);
  ids["leaky_relu"] = static_cast<int64_t>(fusednorm::kLeakyRelu);
  m.attr("activation_ids") = ids;
}
