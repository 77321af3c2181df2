// torch.ops.uio_cpu.gemv: x @ weight.T for a few rows of x (see cpu_kernels.h).
#include <torch/library.h>

#include "cpu_kernels.h"

namespace {

using namespace uio_cpu;

at::Tensor gemv(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "gemv: x (rows, in), weight (out, in)");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "gemv: float32 or bfloat16 only, x and weight alike");
  TORCH_CHECK(x.size(0) <= kMaxRows, "gemv: at most ", kMaxRows, " rows");
  TORCH_CHECK(weight.stride(0) == 1 || weight.stride(1) == 1, "gemv: weight rows or columns must be contiguous");
  at::Tensor x32 = x.to(at::kFloat).contiguous();  // a few rows: widened once
  at::Tensor y = at::empty({x.size(0), weight.size(0)}, x32.options());
  product(x32.data_ptr<float>(), x32.stride(0), x32.size(0), weight, y.data_ptr<float>());
  return weight.scalar_type() == at::kFloat ? y : y.to(at::kBFloat16);
}

}  // namespace

TORCH_LIBRARY(uio_cpu, m) {
  m.def("gemv(Tensor x, Tensor weight) -> Tensor");
  m.impl("gemv", c10::DispatchKey::CPU, &gemv);
}
