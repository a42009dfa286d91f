// The expert products of a routed linear on the CPU, given its routing: out[t] = scale[t] * (W_e x[t]) for every
// token t in group e, the groups being runs of `order` (the tokens sorted by expert) that end at `group_ends`,
// and their gradients. Arithmetic only: the model decides the order, the groups and the scale.
//
// Each thread of the intra-op pool takes whole groups and runs their products single-threaded, a chunk of rows at
// a time: the rows are gathered into a small buffer, multiplied, scaled and written back in token order. On few
// cores this beats one multi-threaded product per group (a few hundred rows split poorly between threads), and
// the sorted copies of the input and output that tensor ops make (and their gradients) never exist in full.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <vector>

namespace {

constexpr int64_t kChunkRows = 256;

// Row where each group starts, then where the last ends: [0, ends[0], ..., ends[E-1]]; the groups cover all rows.
std::vector<int64_t> group_bounds(const at::Tensor& group_ends, int64_t rows) {
  TORCH_CHECK(group_ends.dim() == 1 && group_ends.scalar_type() == at::kInt && group_ends.device().is_cpu(),
              "expert_products: group_ends must be a 1-D int32 CPU tensor, got ", group_ends.scalar_type(),
              " of shape ", group_ends.sizes(), " on ", group_ends.device());
  auto ends = group_ends.contiguous();
  const int32_t* end = ends.data_ptr<int32_t>();
  std::vector<int64_t> bounds(ends.size(0) + 1, 0);
  for (int64_t e = 0; e < ends.size(0); ++e) {
    TORCH_CHECK(end[e] >= bounds[e] && end[e] <= rows, "expert_products: group_ends must be non-decreasing within [0, ",
                rows, "], got ", end[e], " at ", e);
    bounds[e + 1] = end[e];
  }
  TORCH_CHECK(bounds.back() == rows, "expert_products: the groups must cover all ", rows, " rows, they end at ",
              bounds.back());
  return bounds;
}

void check_operands(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& order, const at::Tensor& scale) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu() && order.device().is_cpu() && scale.device().is_cpu(),
              "expert_products: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 3 && weight.size(2) == x.size(1), "expert_products: x ", x.sizes(),
              " and weight ", weight.sizes(), " do not match");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() && scale.scalar_type() == x.scalar_type(),
              "expert_products: x, weight and scale differ in dtype");
  TORCH_CHECK(order.dim() == 1 && order.scalar_type() == at::kLong && order.size(0) == x.size(0) &&
                  scale.dim() == 1 && scale.size(0) == x.size(0),
              "expert_products: order (int64) and scale need one entry per row of x");
}

// dst[index[r]] = src[r] * scale[r] for each row r of `src` [n, width]; all contiguous, `dst` rows of that width.
void scatter_scaled(at::Tensor& dst, const at::Tensor& src, const at::Tensor& index, const at::Tensor& scale) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "scatter_scaled", [&] {
    const int64_t width = src.size(1);
    const scalar_t* from = src.data_ptr<scalar_t>();
    const scalar_t* factor = scale.data_ptr<scalar_t>();
    const int64_t* row = index.data_ptr<int64_t>();
    scalar_t* to = dst.data_ptr<scalar_t>();
    for (int64_t r = 0; r < src.size(0); ++r) {
      const scalar_t* __restrict__ in = from + r * width;
      scalar_t* __restrict__ out = to + row[r] * width;
      const scalar_t f = factor[r];
      for (int64_t c = 0; c < width; ++c) out[c] = in[c] * f;
    }
  });
}

// Runs group(e) for every group on the intra-op threads, each thread taking whole groups (the group goes to the
// thread whose even share of the rows holds its middle), below autograd: the worker threads do not inherit the
// caller's dispatch state.
template <typename Group>
void for_each_group(const std::vector<int64_t>& bounds, const Group& group) {
  const int64_t groups = static_cast<int64_t>(bounds.size()) - 1, total = bounds.back();
  const int64_t parts = std::clamp<int64_t>(std::min(groups, total / 64), 1, at::get_num_threads());
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t e = 0; e < groups; ++e) {
      const int64_t owner = total ? std::min(parts - 1, (bounds[e] + bounds[e + 1]) * parts / (2 * total)) : 0;
      if (owner >= begin && owner < end) group(e);
    }
  });
}

at::Tensor expert_products(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& order,
                           const at::Tensor& group_ends, const at::Tensor& scale) {
  check_operands(x, weight, order, scale);
  const auto bounds = group_bounds(group_ends, x.size(0));
  auto out = at::empty({x.size(0), weight.size(1)}, x.options());
  const auto order_ = order.contiguous();
  const auto scale_sorted = scale.index_select(0, order_);
  for_each_group(bounds, [&](int64_t e) {
    const auto expert = weight[e].t();
    for (int64_t start = bounds[e]; start < bounds[e + 1]; start += kChunkRows) {
      const int64_t stop = std::min(start + kChunkRows, bounds[e + 1]);
      const auto rows = order_.slice(0, start, stop);
      scatter_scaled(out, at::mm(x.index_select(0, rows), expert), rows, scale_sorted.slice(0, start, stop));
    }
  });
  return out;
}

// Gradients of x, weight and scale for the output gradient `grad`.
std::vector<at::Tensor> expert_products_backward(const at::Tensor& grad, const at::Tensor& x,
                                                 const at::Tensor& weight, const at::Tensor& order,
                                                 const at::Tensor& group_ends, const at::Tensor& scale) {
  check_operands(x, weight, order, scale);
  const auto bounds = group_bounds(group_ends, x.size(0));
  auto grad_x = at::empty_like(x, at::MemoryFormat::Contiguous);
  auto grad_weight = at::empty_like(weight, at::MemoryFormat::Contiguous);
  auto grad_scale = at::empty_like(scale, at::MemoryFormat::Contiguous);
  const auto order_ = order.contiguous();
  const auto scale_sorted = scale.index_select(0, order_);
  for_each_group(bounds, [&](int64_t e) {
    auto grad_expert = grad_weight[e];
    if (bounds[e + 1] == bounds[e]) grad_expert.zero_();
    for (int64_t start = bounds[e]; start < bounds[e + 1]; start += kChunkRows) {
      const int64_t stop = std::min(start + kChunkRows, bounds[e + 1]);
      const auto rows = order_.slice(0, start, stop);
      const auto chunk_scale = scale_sorted.slice(0, start, stop);
      const auto inputs = x.index_select(0, rows);
      auto grads = grad.index_select(0, rows);
      const auto input_grads = at::mm(grads, weight[e]);  // W_e^T g; <W_e^T g, x> = <g, W_e x> is the scale's gradient
      grad_scale.index_copy_(0, rows, (input_grads * inputs).sum(1));
      scatter_scaled(grad_x, input_grads, rows, chunk_scale);
      grads.mul_(chunk_scale.unsqueeze(1));
      if (start == bounds[e]) {
        at::mm_out(grad_expert, grads.t(), inputs);
      } else {
        grad_expert.addmm_(grads.t(), inputs);
      }
    }
  });
  return {grad_x, grad_weight, grad_scale};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("expert_products", &expert_products, "scale[t] * (W_e x[t]) for the tokens of each group, in token order");
  m.def("expert_products_backward", &expert_products_backward, "gradients of x, weight and scale");
}
