// A routed linear on a few tokens (decoding) in one call: the float32 router, each token's top-1
// expert and probability, its product with that expert's matrix alone, read in place, and the routing's
// losses and load. In eager decoding each tensor op costs microseconds of dispatch against a product of
// a few; this is one call where the model's tensor ops are about eight. Follows the model's routing
// rules for dropless routing (every valid token kept): logits = router_weight x (summed in another
// order than the model's router product), probabilities their softmax, y = p (W_e x + b_e), 0 for
// padding; over the valid tokens, the Switch load-balancing loss E sum_e f_e P_e, the z-loss
// mean(logsumexp(logits)^2), the load f_e and the dropped share (0).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>

namespace {

using Result = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                           at::Tensor>;

void check_operands(const at::Tensor& x, const at::Tensor& router_input, const at::Tensor& router_weight,
                    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& valid) {
  TORCH_CHECK(x.dim() == 2 && router_input.sizes() == x.sizes(), "routed_few_tokens: x and router_input must be [T, in]"
              " alike, got ", x.sizes(), " and ", router_input.sizes());
  TORCH_CHECK(weight.dim() == 3 && weight.size(2) == x.size(1), "routed_few_tokens: weight must be [E, out, ",
              x.size(1), "], got ", weight.sizes());
  TORCH_CHECK(router_weight.dim() == 2 && router_weight.size(0) == weight.size(0) && router_weight.size(1) == x.size(1),
              "routed_few_tokens: router_weight must be [", weight.size(0), ", ", x.size(1), "], got ",
              router_weight.sizes());
  TORCH_CHECK(!bias || (bias->dim() == 2 && bias->size(0) == weight.size(0) && bias->size(1) == weight.size(1)),
              "routed_few_tokens: bias must be [", weight.size(0), ", ", weight.size(1), "], got ",
              bias ? bias->sizes() : at::IntArrayRef{});
  TORCH_CHECK(valid.dim() == 1 && valid.size(0) == x.size(0) && valid.scalar_type() == at::kBool,
              "routed_few_tokens: valid must be a [", x.size(0), "] bool tensor, got ", valid.scalar_type(), " ",
              valid.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && (!bias || bias->scalar_type() == x.scalar_type()),
              "routed_few_tokens: weight and bias must have x's dtype ", x.scalar_type(), ", got ",
              weight.scalar_type());
  for (const at::Tensor* tensor : {&x, &router_input, &router_weight, &weight, &valid}) {
    TORCH_CHECK(tensor->device().is_cpu(), "routed_few_tokens: CPU tensors only, got one on ", tensor->device());
  }
  TORCH_CHECK(!bias || bias->device().is_cpu(), "routed_few_tokens: CPU tensors only, got a bias on ", bias->device());
}

// sum_i a[i] b[i] over eight interleaved partial sums, which the compiler can keep in one vector register.
float dot(const float* a, const float* b, int64_t length) {
  constexpr int64_t lanes = 8;
  float partial[lanes] = {};
  int64_t i = 0;
  for (; i + lanes <= length; i += lanes) {
    for (int64_t lane = 0; lane < lanes; ++lane) partial[lane] += a[i + lane] * b[i + lane];
  }
  float sum = 0.f;
  for (int64_t lane = 0; lane < lanes; ++lane) sum += partial[lane];
  for (; i < length; ++i) sum += a[i] * b[i];
  return sum;
}

// out[t] *= scale, the float32 scale first rounded to out's dtype, as the model's router hands it over.
void scale_row(const at::Tensor& out, int64_t t, float scale) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "routed_few_tokens", [&] {
    const auto factor = static_cast<scalar_t>(scale);
    scalar_t* row = out.data_ptr<scalar_t>() + t * out.size(1);
    for (int64_t j = 0; j < out.size(1); ++j) row[j] = row[j] * factor;
  });
}

at::Tensor float_scalar(float value, const at::TensorOptions& options) {
  auto scalar = at::empty({}, options);
  *scalar.data_ptr<float>() = value;
  return scalar;
}

Result routed_few_tokens(const at::Tensor& x, const at::Tensor& router_input, const at::Tensor& router_weight,
                         const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& valid) {
  check_operands(x, router_input, router_weight, weight, bias, valid);
  const int64_t tokens = x.size(0), experts = weight.size(0), width = x.size(1);
  const auto inputs = router_input.to(at::kFloat).contiguous(), router = router_weight.to(at::kFloat).contiguous();
  const float* input_row = inputs.data_ptr<float>();
  const float* router_row = router.data_ptr<float>();
  const auto float_options = inputs.options();
  auto logits = at::empty({experts, tokens}, float_options), probs = at::empty({experts, tokens}, float_options);
  auto expert = at::empty({tokens}, float_options.dtype(at::kLong));
  auto out = at::empty({tokens, weight.size(1)}, x.options());
  auto logit = logits.accessor<float, 2>(), prob = probs.accessor<float, 2>();
  auto chosen = expert.accessor<int64_t, 1>();
  const auto is_valid = valid.accessor<bool, 1>();
  auto load = at::empty({experts}, float_options);
  float* tokens_of = load.data_ptr<float>();
  std::fill(tokens_of, tokens_of + experts, 0.f);
  std::vector<float> prob_sum(experts, 0.f);
  float num_valid = 0.f, z_sum = 0.f;
  for (int64_t t = 0; t < tokens; ++t) {
    int64_t top = 0;
    for (int64_t e = 0; e < experts; ++e) {
      logit[e][t] = dot(router_row + e * width, input_row + t * width, width);
      top = logit[e][t] > logit[top][t] ? e : top;
    }
    float total = 0.f;
    for (int64_t e = 0; e < experts; ++e) total += prob[e][t] = std::exp(logit[e][t] - logit[top][t]);
    for (int64_t e = 0; e < experts; ++e) prob[e][t] /= total;
    chosen[t] = top;
    auto row = out.slice(0, t, t + 1);
    const auto expert_bias = bias ? std::optional<at::Tensor>((*bias)[top]) : std::nullopt;
    at::linear_out(row, x.slice(0, t, t + 1), weight[top], expert_bias);
    scale_row(out, t, is_valid[t] ? prob[top][t] : 0.f);
    if (is_valid[t]) {
      num_valid += 1.f;
      tokens_of[top] += 1.f;
      for (int64_t e = 0; e < experts; ++e) prob_sum[e] += prob[e][t];
      const float logsumexp = logit[top][t] + std::log(total);
      z_sum += logsumexp * logsumexp;
    }
  }
  num_valid = std::max(num_valid, 1.f);
  float aux = 0.f;
  for (int64_t e = 0; e < experts; ++e) {
    tokens_of[e] /= num_valid;
    aux += tokens_of[e] * prob_sum[e] / num_valid;
  }
  return {out, logits, probs, expert, float_scalar(experts * aux, float_options),
          float_scalar(z_sum / num_valid, float_options), load, float_scalar(0.f, float_options)};
}

// The results' shapes alone, for tracing (fake tensors, torch.compile).
Result routed_few_tokens_meta(const at::Tensor& x, const at::Tensor& router_input,
                              const at::Tensor& router_weight, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, const at::Tensor& valid) {
  auto logits = at::empty({weight.size(0), x.size(0)}, x.options().dtype(at::kFloat));
  auto loss = at::empty({}, logits.options());
  return {at::empty({x.size(0), weight.size(1)}, x.options()), logits, at::empty_like(logits),
          at::empty({x.size(0)}, x.options().dtype(at::kLong)), loss, at::empty_like(loss),
          at::empty({weight.size(0)}, logits.options()), at::empty_like(loss)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(parameternet_llm, m) {
  m.def("routed_few_tokens(Tensor x, Tensor router_input, Tensor router_weight, Tensor weight, Tensor? bias, "
        "Tensor valid) -> (Tensor out, Tensor logits, Tensor probs, Tensor expert, Tensor aux_loss, Tensor z_loss, "
        "Tensor expert_load, Tensor dropped_fraction)");
}

TORCH_LIBRARY_IMPL(parameternet_llm, CPU, m) {
  m.impl("routed_few_tokens", routed_few_tokens);
}

TORCH_LIBRARY_IMPL(parameternet_llm, Meta, m) {
  m.impl("routed_few_tokens", routed_few_tokens_meta);
}
