#include "common.h"

#include <cmath>
#include <map>
#include <mutex>
#include <tuple>

namespace fusednorm {

const at::Tensor& proxy_samples(int64_t num_samples, const at::TensorOptions& options) {
  using Key = std::tuple<int64_t, at::ScalarType, at::DeviceType, c10::DeviceIndex>;
  static std::mutex mutex;
  // Never destroyed: device tensors must not be freed after the CUDA runtime has shut down.
  static auto* cache = new std::map<Key, at::Tensor>();
  const Key key{num_samples, options.dtype().toScalarType(), options.device().type(),
                options.device().index()};
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache->find(key);
  if (it == cache->end()) {
    // The expression of fusednorm/proxy.py, with the same fp64 erfinv: bitwise the same samples.
    const at::Tensor k = at::arange(num_samples, at::TensorOptions().dtype(at::kDouble));
    const at::Tensor u =
        std::sqrt(2.0) * at::erfinv(2.0 * (k + 0.5) / static_cast<double>(num_samples) - 1.0);
    it = cache->emplace(key, u.to(options)).first;
  }
  // std::map never moves its elements: the reference stays valid after the lock is released.
  return it->second;
}

}  // namespace fusednorm
