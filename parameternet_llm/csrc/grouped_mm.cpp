// Grouped matrix products for the CPU with the semantics of torch's grouped_mm (2D x 3D and 2D x 2D
// with group end offsets), run expert-parallel: each thread of the intra-op pool takes its share of
// the groups and runs their products single-threaded. On few cores this beats one multi-threaded
// product per group, whose few hundred rows split poorly between threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace {

// Row where each group starts, then where the last ends: [0, offs[0], ..., offs[E-1]].
std::vector<int64_t> group_bounds(const at::Tensor& offs, int64_t rows) {
  TORCH_CHECK(offs.dim() == 1 && offs.scalar_type() == at::kInt && offs.device().is_cpu(),
              "grouped_mm: offs must be a 1-D int32 CPU tensor, got ", offs.scalar_type(), " of shape ",
              offs.sizes(), " on ", offs.device());
  auto ends = offs.contiguous();
  const int32_t* end = ends.data_ptr<int32_t>();
  std::vector<int64_t> bounds(offs.size(0) + 1, 0);
  for (int64_t e = 0; e < offs.size(0); ++e) {
    TORCH_CHECK(end[e] >= bounds[e] && end[e] <= rows, "grouped_mm: offs must be non-decreasing within [0, ",
                rows, "], got ", end[e], " at ", e);
    bounds[e + 1] = end[e];
  }
  return bounds;
}

// Runs part(i) for i in [0, parts) on the intra-op threads, below autograd: the worker threads do
// not inherit the caller's dispatch state.
template <typename Part>
void run_parts(int64_t parts, const Part& part) {
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t i = begin; i < end; ++i) part(i);
  });
}

// out[rows of e] = a[rows of e] @ b[e]. The grouped rows are cut into one even share per thread,
// across group boundaries; rows past the last group are left uninitialised.
at::Tensor grouped_rows(const at::Tensor& a, const at::Tensor& b, const std::vector<int64_t>& bounds) {
  auto out = at::empty({a.size(0), b.size(2)}, a.options());
  const int64_t groups = b.size(0), total = bounds.back();
  const int64_t parts = std::clamp<int64_t>(total / 64, 1, at::get_num_threads());
  run_parts(parts, [&](int64_t part) {
    const int64_t first = total * part / parts, last = total * (part + 1) / parts;
    for (int64_t e = 0; e < groups; ++e) {
      const int64_t start = std::max(first, bounds[e]), stop = std::min(last, bounds[e + 1]);
      if (stop > start) {
        auto rows = out.slice(0, start, stop);
        at::mm_out(rows, a.slice(0, start, stop), b[e]);
      }
    }
  });
  return out;
}

// out[e] = a[:, rows of e] @ b[rows of e] (the rows are the reduced dimension), zero for an empty
// group. Whole groups per thread: a group goes to the thread whose even share of rows holds its middle.
at::Tensor grouped_reduction(const at::Tensor& a, const at::Tensor& b, const std::vector<int64_t>& bounds) {
  const int64_t groups = static_cast<int64_t>(bounds.size()) - 1, total = bounds.back();
  auto out = at::empty({groups, a.size(0), b.size(1)}, a.options());
  const int64_t parts = std::clamp<int64_t>(groups, 1, at::get_num_threads());
  run_parts(parts, [&](int64_t part) {
    for (int64_t e = 0; e < groups; ++e) {
      const int64_t owner = total ? std::min(parts - 1, (bounds[e] + bounds[e + 1]) * parts / (2 * total)) : 0;
      if (owner != part) continue;
      auto group = out[e];
      if (bounds[e + 1] > bounds[e]) {
        at::mm_out(group, a.slice(1, bounds[e], bounds[e + 1]), b.slice(0, bounds[e], bounds[e + 1]));
      } else {
        group.zero_();
      }
    }
  });
  return out;
}

at::Tensor grouped_mm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offs) {
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), "grouped_mm: CPU tensors only, got ", a.device(),
              " and ", b.device());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "grouped_mm: a and b differ in dtype: ", a.scalar_type(),
              " and ", b.scalar_type());
  TORCH_CHECK(a.dim() == 2 && (b.dim() == 2 || b.dim() == 3), "grouped_mm: expected a 2-D and b 2-D or 3-D, got ",
              a.dim(), "-D and ", b.dim(), "-D");
  if (b.dim() == 3) {
    TORCH_CHECK(b.size(0) == offs.size(0) && a.size(1) == b.size(1), "grouped_mm: a ", a.sizes(), " and b ",
                b.sizes(), " do not match, or b's groups differ from the ", offs.size(0), " offsets");
    return grouped_rows(a, b, group_bounds(offs, a.size(0)));
  }
  TORCH_CHECK(a.size(1) == b.size(0), "grouped_mm: a ", a.sizes(), " and b ", b.sizes(), " do not match");
  return grouped_reduction(a, b, group_bounds(offs, a.size(1)));
}

// The result's shape alone, for tracing (fake tensors, torch.compile).
at::Tensor grouped_mm_meta(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offs) {
  if (b.dim() == 3) return at::empty({a.size(0), b.size(2)}, a.options());
  return at::empty({offs.size(0), a.size(0), b.size(1)}, a.options());
}

}  // namespace

TORCH_LIBRARY(parameternet_llm, m) {
  m.def("grouped_mm(Tensor a, Tensor b, Tensor offs) -> Tensor");
}

TORCH_LIBRARY_IMPL(parameternet_llm, CPU, m) {
  m.impl("grouped_mm", grouped_mm);
}

TORCH_LIBRARY_IMPL(parameternet_llm, Meta, m) {
  m.impl("grouped_mm", grouped_mm_meta);
}
