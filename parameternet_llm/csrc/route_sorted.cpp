// Top-1 routing for the grouped dispatch in one call: from the router logits, each token's
// probabilities, top-1 expert and scale, Switch capacity, and the order that groups the kept tokens
// by expert. The model's tensor ops for this are about twenty, each costing microseconds of dispatch
// against a few of work on a CPU. Follows the model's `route` with `sort=True`, to the bit: the softmax
// by ATen's own op, the rest in two passes over the tokens.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace {

using Result = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// logits [E, T] float32, valid [T] bool. Returns the probabilities [E, T]; the scale [T] (float32: the
// top-1 probability of the kept tokens, 0 for the rest); the top-1 expert [T]; the kept tokens [T]
// (valid, and within capacity C = max(min_capacity, ceil(factor * T_valid / E)) in token order unless
// the factor is None); the dispatch order [T] (kept tokens grouped by expert, then the rest, each part
// in token order) and its inverse [T]; and where each expert's group ends [E] (int32).
Result route_sorted(const at::Tensor& logits, const at::Tensor& valid, std::optional<double> capacity_factor,
                    int64_t min_capacity) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.device().is_cpu(),
              "route_sorted: logits must be a [E, T] float32 CPU tensor, got ", logits.scalar_type(), " ",
              logits.sizes(), " on ", logits.device());
  const int64_t experts = logits.size(0), tokens = logits.size(1);
  TORCH_CHECK(valid.dim() == 1 && valid.size(0) == tokens && valid.scalar_type() == at::kBool &&
                  valid.device().is_cpu(),
              "route_sorted: valid must be a [", tokens, "] bool CPU tensor, got ", valid.scalar_type(), " ",
              valid.sizes(), " on ", valid.device());
  const auto probs = logits.softmax(0).contiguous();
  const auto is_valid = valid.contiguous();
  const float* prob = probs.data_ptr<float>();
  const bool* valid_of = is_valid.data_ptr<bool>();

  double capacity = std::numeric_limits<double>::infinity();
  if (capacity_factor) {
    const double num_valid = static_cast<double>(std::count(valid_of, valid_of + tokens, true));
    capacity = std::max(static_cast<double>(min_capacity), std::ceil(*capacity_factor * num_valid / experts));
  }
  auto scale = at::empty({tokens}, logits.options());
  auto expert = at::empty({tokens}, logits.options().dtype(at::kLong));
  auto keep = at::empty({tokens}, is_valid.options());
  float* scale_of = scale.data_ptr<float>();
  int64_t* expert_of = expert.data_ptr<int64_t>();
  bool* kept = keep.data_ptr<bool>();
  std::vector<int64_t> claimed(experts, 0), group_size(experts + 1, 0);  // key E: dropped and padding
  for (int64_t t = 0; t < tokens; ++t) {
    // The top-1 as torch.max over the experts: the first of equal maxima, or the first NaN.
    int64_t top = 0;
    float top_prob = prob[t];
    for (int64_t e = 1; e < experts && !std::isnan(top_prob); ++e) {
      const float value = prob[e * tokens + t];
      if (value > top_prob || std::isnan(value)) {
        top = e;
        top_prob = value;
      }
    }
    expert_of[t] = top;
    kept[t] = valid_of[t] && static_cast<double>(++claimed[top]) <= capacity;  // padding claims no slot
    scale_of[t] = kept[t] ? top_prob : 0.f;
    ++group_size[kept[t] ? top : experts];
  }

  auto group_ends = at::empty({experts}, logits.options().dtype(at::kInt));
  int32_t* end_of = group_ends.data_ptr<int32_t>();
  std::vector<int64_t> next_row(experts + 1, 0);
  for (int64_t e = 0; e < experts; ++e) {
    next_row[e + 1] = next_row[e] + group_size[e];
    end_of[e] = static_cast<int32_t>(next_row[e + 1]);
  }
  auto order = at::empty({tokens}, expert.options()), inverse = at::empty({tokens}, expert.options());
  int64_t* token_of_row = order.data_ptr<int64_t>();
  int64_t* row_of_token = inverse.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t row = next_row[kept[t] ? expert_of[t] : experts]++;
    token_of_row[row] = t;
    row_of_token[t] = row;
  }
  return {probs, scale, expert, keep, order, inverse, group_ends};
}

// The results' shapes alone, for tracing (fake tensors, torch.compile).
Result route_sorted_meta(const at::Tensor& logits, const at::Tensor& valid, std::optional<double> capacity_factor,
                         int64_t min_capacity) {
  const int64_t experts = logits.size(0), tokens = logits.size(1);
  auto index = at::empty({tokens}, logits.options().dtype(at::kLong));
  return {at::empty_like(logits), at::empty({tokens}, logits.options()), index, at::empty({tokens}, valid.options()),
          at::empty_like(index), at::empty_like(index), at::empty({experts}, logits.options().dtype(at::kInt))};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(parameternet_llm, m) {
  m.def("route_sorted(Tensor logits, Tensor valid, float? capacity_factor, int min_capacity) -> (Tensor probs, "
        "Tensor scale, Tensor expert, Tensor keep, Tensor order, Tensor inverse, Tensor group_ends)");
}

TORCH_LIBRARY_IMPL(parameternet_llm, CPU, m) {
  m.impl("route_sorted", route_sorted);
}

TORCH_LIBRARY_IMPL(parameternet_llm, Meta, m) {
  m.impl("route_sorted", route_sorted_meta);
}
