"""ParameterNet-LLaMA: LLaMA whose FFN projections are Switch-routed (top-1) expert banks.

Each routed projection holds E expert matrices and a float32 router; every token uses one expert, so
the FLOPs stay those of the dense LLaMA while the projection's parameters grow E-fold
(Han et al., "ParameterNet: Parameters Are All You Need", arXiv 2306.14525). Capacity and the
auxiliary losses follow Switch Transformer (Fedus et al. 2021).

Self-contained (imports only torch, transformers and the configuration file) because it is copied
into every saved checkpoint and loaded with `trust_remote_code=True`; where the parameternet_llm package
is installed, it also uses the package's kernels: compiled ones on the CPU, a Triton one on CUDA.
"""

import importlib
from dataclasses import dataclass
from functools import cache, cached_property, partial, wraps
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GenericForSequenceClassification, GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaForCausalLM,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)
from transformers.utils import can_return_tuple, logging

from .configuration_parameternet_llama import MOE_PROJECTIONS, ParameterNetLlamaConfig

logger = logging.get_logger(__name__)


def without_autocast(function):
    """`function` run with autocast off for its first argument's device: under mixed precision the router's
    products and losses stay float32 (Switch Transformer's selective precision), as autocast would run its
    matrix products in half precision."""
    @wraps(function)
    def float32_function(first: torch.Tensor, *args, **kwargs):
        if torch.is_autocast_enabled(first.device.type):
            with torch.autocast(first.device.type, enabled=False):
                return function(first, *args, **kwargs)
        return function(first, *args, **kwargs)
    return float32_function


@without_autocast
def routing_summary(logits, probs, expert, valid, keep):
    """Switch load-balancing loss, router z-loss, expert load and dropped share over the valid tokens.

    Works on one routed linear ([E, T] logits) or on several stacked ([L, E, T]) at once; `valid` [T]
    marks real tokens, `keep` [..., T] the tokens within capacity. Returns tensors shaped like the
    leading dimensions: aux_loss, z_loss, expert_load [..., E], dropped_fraction.
    """
    num_experts = logits.shape[-2]
    weight = valid.to(logits.dtype)
    num_valid = weight.sum().clamp(min=1)
    chosen = (expert.unsqueeze(-2) == torch.arange(num_experts, device=expert.device).unsqueeze(1)).to(logits.dtype)
    tokens_per_expert = (chosen @ weight) / num_valid
    mean_probs = (probs @ weight) / num_valid
    aux_loss = num_experts * (tokens_per_expert * mean_probs).sum(-1)
    z_loss = (torch.logsumexp(logits, dim=-2).square() @ weight) / num_valid
    dropped = (valid & ~keep).sum(-1) / num_valid
    return aux_loss, z_loss, tokens_per_expert.detach(), dropped.detach()


@dataclass
class Routing:
    """What one routed linear's last forward decided; the losses and statistics follow from it.

    Router logits and probabilities are kept experts-first, [E, T]: the per-token softmax and the
    losses then reduce over rows of contiguous tokens, several times faster on a CPU than over E
    columns.
    """

    logits: torch.Tensor  # [E, T] float32, every token (padding included)
    probs: torch.Tensor  # [E, T] softmax of the logits over experts
    expert: torch.Tensor  # [T] top-1 expert of every token
    valid: torch.Tensor  # [T] real tokens (attention_mask = 1)
    keep: torch.Tensor  # [T] valid tokens within their expert's capacity

    @property
    def router_logits(self) -> torch.Tensor:
        """[T, E] router logits (a view)."""
        return self.logits.t()

    @cached_property
    def summary(self):
        """`routing_summary`, computed once on first use (or given with the routing by the few-token CPU
        kernel)."""
        return routing_summary(self.logits, self.probs, self.expert, self.valid, self.keep)

    @property
    def aux_loss(self) -> torch.Tensor:
        return self.summary[0]

    @property
    def z_loss(self) -> torch.Tensor:
        return self.summary[1]

    @property
    def expert_load(self) -> torch.Tensor:
        """[E] share of valid tokens whose top-1 is each expert (before dropping)."""
        return self.summary[2]

    @property
    def dropped_fraction(self) -> torch.Tensor:
        return self.summary[3]


def stacked_summary(routings: list[Routing]):
    """`routing_summary` of several routed linears of one forward (same tokens) in one pass, or stacked from
    their own summaries where each has one already (the few-token CPU kernel gives it with the routing)."""
    if all("summary" in vars(routing) for routing in routings):
        return tuple(torch.stack(parts) for parts in zip(*(routing.summary for routing in routings)))
    return routing_summary(
        torch.stack([r.logits for r in routings]),
        torch.stack([r.probs for r in routings]),
        torch.stack([r.expert for r in routings]),
        routings[0].valid,
        torch.stack([r.keep for r in routings]),
    )


class RowOrder(NamedTuple):
    """An order of the T token rows of a tensor: the token in each row and the row of each token."""

    row_token: torch.Tensor  # [T]
    token_row: torch.Tensor  # [T]


def capacity_keep(expert, valid, capacity_factor, min_capacity, num_experts: int):
    """Valid tokens within their expert's capacity C = max(min_capacity, ceil(factor * T_valid / E)).

    Valid tokens claim slots in token order and padding claims none: a token is kept while the running
    count of its expert's valid tokens, over an experts-first [E, T] mask, is at most C. Sync-free: C
    stays a tensor.
    """
    chosen = (expert == torch.arange(num_experts, device=expert.device).unsqueeze(1)) & valid
    count = chosen.cumsum(1, dtype=torch.int32).gather(0, expert.unsqueeze(0)).squeeze(0)
    num_valid = valid.sum(dtype=torch.float64)
    capacity = torch.clamp((capacity_factor * num_valid / num_experts).ceil(), min=min_capacity)
    return valid & (count <= capacity)


def dispatch_order(expert: torch.Tensor, keep: torch.Tensor, num_experts: int) -> tuple[RowOrder, torch.Tensor]:
    """Rows for the grouped dispatch: the kept tokens grouped by expert, then the rest (dropped tokens
    and padding), each part in token order; and where each expert's group ends [E] (int32)."""
    sorted_key, row_token = torch.sort(torch.where(keep, expert, num_experts), stable=True)
    rows = torch.arange(row_token.numel(), device=row_token.device)
    token_row = torch.empty_like(row_token).scatter_(0, row_token, rows)
    experts = torch.arange(1, num_experts + 1, device=expert.device)
    group_ends = torch.searchsorted(sorted_key, experts, out_int32=True)  # keys below e + 1
    return RowOrder(row_token, token_row), group_ends


def loop_experts(x, weight, bias, expert, scale):
    """Reference dispatch: one matmul per expert over the tokens it keeps (scale != 0), each scaled."""
    out = x.new_zeros(x.shape[0], weight.shape[1])
    for e in range(weight.shape[0]):
        index = torch.nonzero((expert == e) & (scale != 0)).squeeze(1)
        if index.numel():
            expert_out = F.linear(x[index], weight[e], None if bias is None else bias[e])
            out.index_copy_(0, index, expert_out * scale[index].unsqueeze(1))
    return out


@cache
def package_kernels(name: str):
    """The parameternet_llm package's kernel module `name` ("cpu_kernels": compiled C++ for the CPU;
    "triton_kernels": Triton for CUDA), or None: the package or what the module needs (a compiler, triton)
    is not there (a checkpoint's copy of this file runs without the package), or the kernels are switched
    off or do not run."""
    try:
        kernels = importlib.import_module(f"parameternet_llm.{name}")
    except ImportError:
        return None
    return kernels if kernels.load() else None


def compiled_cpu_kernels():
    """The package's compiled CPU kernels (grouped product, sorted routing, few-token routed linear), or None."""
    return package_kernels("cpu_kernels")


def few_token_kernels(device: torch.device):
    """The package's kernels whose `routed_few_tokens` runs a routed linear on a few tokens in one call on
    `device`: the compiled CPU kernels, or the Triton kernels on CUDA; None where there are none."""
    if device.type == "cpu":
        return compiled_cpu_kernels()
    return package_kernels("triton_kernels") if device.type == "cuda" else None


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """`F.grouped_mm`, or on the CPU its compiled expert-parallel twin where there is one."""
    if a.device.type == "cpu" and (kernels := compiled_cpu_kernels()) is not None:
        return kernels.grouped_mm(a, b, offs)
    return F.grouped_mm(a, b, offs=offs)


def host_reads_are_free(device: torch.device) -> bool:
    """Whether the host may read a tensor's values (expert ids, group sizes) at no cost: on a CPU it waits
    for no device; on an accelerator it would stall the queue of launched kernels, and under torch.compile
    it would break the graph."""
    return device.type == "cpu" and not torch.compiler.is_compiling()


HALF_PRECISION = (torch.bfloat16, torch.float16)


@without_autocast
def router_logits(router_weight: torch.Tensor, router_input: torch.Tensor) -> torch.Tensor:
    """The router's float32 logits [E, T] for `router_input` [T, in]. On CUDA, half-precision weights and
    inputs of one dtype multiply as they are into float32 where no gradient is taken through the product:
    products of half-precision numbers are exact in float32 and cuBLAS sums them in float32, so the logits
    are the float32 product's, without a float32 copy of the input. Elsewhere both are copied to float32."""
    if (router_input.device.type == "cuda" and router_weight.dtype == router_input.dtype in HALF_PRECISION
            and not (torch.is_grad_enabled() and (router_weight.requires_grad or router_input.requires_grad))):
        return torch.mm(router_weight, router_input.t(), torch.float32)
    return router_weight.float() @ router_input.float().t()


def route(router_weight, router_input, valid, capacity_factor, min_capacity, dtype: torch.dtype, sort: bool,
          rows: RowOrder | None = None):
    """The router's decisions for every token: logits and probabilities [E, T] (float32); the scale [T]
    in `dtype` (the top-1 probability, 0 for padding and dropped tokens); the top-1 expert and the
    tokens kept within capacity [T]; and, if sorted, `dispatch_order`'s rows and group ends (else None).
    Results are in token order; `rows` gives the order of `router_input`'s rows when it is not. Sorted, on the
    CPU, the package's compiled `route_sorted` takes over from the router's logits: the same results in one
    call where the tensor ops are about twenty (not under torch.compile, which fuses them itself)."""
    num_experts = router_weight.shape[0]
    logits = router_logits(router_weight, router_input)
    if rows is not None:
        logits = logits.index_select(1, rows.token_row)
    if sort and host_reads_are_free(logits.device) and (kernels := compiled_cpu_kernels()) is not None:
        probs, scale, expert, keep, order, inverse, group_ends = kernels.route_sorted(
            logits, valid, capacity_factor, min_capacity
        )
        return logits, probs, scale.to(dtype), expert, keep, RowOrder(order, inverse), group_ends
    probs = logits.softmax(dim=0)
    top_prob, expert = probs.max(dim=0)
    keep = valid
    if capacity_factor is not None:
        keep = capacity_keep(expert, valid, capacity_factor, min_capacity, num_experts)
    sorted_rows, group_ends = dispatch_order(expert, keep, num_experts) if sort else (None, None)
    return logits, probs, (top_prob * keep).to(dtype), expert, keep, sorted_rows, group_ends


def product_in(dtype: torch.dtype, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in `dtype`: multiplied in it where both operands have it, else in float32 copies and rounded."""
    if a.dtype == b.dtype == dtype:
        return a @ b
    return (a.float() @ b.float()).to(dtype)


class PermuteRows(torch.autograd.Function):
    """`x[index]` for a permutation `index` whose inverse is known: the gradient is then a gather by the
    inverse, one pass, where autograd's general index backward zero-fills and scatter-adds."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


SORTED = "sorted"  # output rows of `RoutedExperts` left in the expert-sorted order


class RoutedExperts(torch.autograd.Function):
    """Router, capacity and the sorted `grouped_mm` dispatch as one autograd node, without host sync
    on an accelerator.

    y = p * (W_e x + b_e) for every token with its top-1 expert e and probability p (0 when dropped or
    padding). Kept tokens are sorted by expert, dropped tokens and padding after them, outside the
    groups (grouped_mm leaves such rows uninitialised). Forward: gather in, one grouped_mm, gather out;
    backward: gather the gradient, two grouped_mms, gather out. Without a bias
    p (W x) = W (p x), so p and its gradient (<W_e^T g, x> on the input side, <g, W_e x + b_e> on the
    output side) are taken on the narrower of input and output. The router's gradient (through p, and
    through the logits and probabilities that the losses read) joins the input's gradient in the
    matrix product that computes it.

    Rows need not be in token order: `rows` gives the order of x's rows, and `output` the order of the
    result's rows (None: token order; `SORTED`: this linear's own sorted order, with no gather at all;
    or a `RowOrder`), so chained routed linears pass activations along in whichever order saves a
    gather. Routing results (logits, probabilities, expert, kept) are always in token order.
    """

    @staticmethod
    def forward(ctx, x, router_input, router_weight, weight, bias, valid, capacity_factor, min_capacity, rows, output):
        logits, probs, scale, expert, keep, (order, inverse), offsets = route(
            router_weight, router_input, valid, capacity_factor, min_capacity, x.dtype, sort=True, rows=rows
        )
        # Sorted rows past the kept tokens (dropped and padding, output 0) are not multiplied but for
        # one, `spare`, computed with scale 0: every such token reads its output and input gradient
        # there. A `SORTED` output hands on every row: where `host_reads_are_free`, the rows past the
        # spare are zeroed; elsewhere they are multiplied with scale 0, as reading where they start
        # would wait for the device.
        multiply_all = output is SORTED and not host_reads_are_free(x.device)
        offsets[-1] = x.shape[0] if multiply_all else (offsets[-1] + 1).clamp(max=x.shape[0])
        spare = offsets[-1] - 1
        # order / inverse: token of each sorted row / sorted row of each token; read: the sorted row each
        # token's result and input gradient come from. gather_in: input row of each sorted row,
        # scatter_in: sorted row of each input row; likewise gather_out / scatter_out for the output rows.
        read = torch.where(keep, inverse, spare)
        gather_in = order if rows is None else rows.token_row.index_select(0, order)
        scatter_in = read if rows is None else read.index_select(0, rows.row_token)
        if output is None:
            gather_out, scatter_out = read, order
        elif output is SORTED:
            gather_out = scatter_out = None
        else:
            gather_out = read.index_select(0, output.row_token)
            scatter_out = output.token_row.index_select(0, order)
        scale_sorted = scale.index_select(0, order).unsqueeze(1)
        ctx.scale_input = bias is None and weight.shape[2] <= weight.shape[1]
        ctx.router_input_is_x = router_input is x
        if ctx.scale_input:
            sorted_input = x.index_select(0, gather_in).mul_(scale_sorted)
            out_sorted = grouped_mm(sorted_input, weight.transpose(1, 2), offsets)
            product = None
        else:
            sorted_input = x.index_select(0, gather_in)
            product = grouped_mm(sorted_input, weight.transpose(1, 2), offsets)
            if bias is not None:
                product += bias.index_select(0, expert.index_select(0, order))
            out_sorted = product * scale_sorted
        if output is SORTED and not multiply_all:
            out_sorted[int(offsets[-1]):] = 0  # the rows past the spare, left uninitialised by grouped_mm
        ctx.rows = rows
        # x is kept for the probability's gradient on the input side only, and the router's input for its
        # weight gradient unless it is x, whose rows sorted_input holds then: a down projection would
        # otherwise keep its input, the MLP's widest activation, twice.
        x_rows_sorted = ctx.router_input_is_x and not ctx.scale_input
        ctx.save_for_backward(x if ctx.scale_input else None, None if x_rows_sorted else router_input, router_weight,
                              weight, bias, sorted_input, product, scale, scale_sorted, probs, expert, keep, order,
                              offsets, gather_in if x_rows_sorted else None, scatter_in, scatter_out)
        ctx.mark_non_differentiable(expert, keep, order, inverse)
        ctx.set_materialize_grads(False)  # unused outputs bring None, not zeros
        out = out_sorted if gather_out is None else out_sorted.index_select(0, gather_out)
        return out, logits, probs, expert, keep, order, inverse

    @staticmethod
    def backward(ctx, grad_out, grad_logits, grad_probs, *_not_differentiable):
        (x, router_input, router_weight, weight, bias, sorted_input, product, scale, scale_sorted, probs, expert, keep,
         order, offsets, gather_in, scatter_in, scatter_out) = ctx.saved_tensors
        rows = ctx.rows
        needs_x, needs_router_input, needs_router_weight, needs_weight, needs_bias = ctx.needs_input_grad[:5]
        grad_x = grad_weight = grad_bias = None
        if grad_out is None:
            grad_out = torch.zeros_like(sorted_input[:, :1]).expand(-1, weight.shape[1])
        grad_sorted = grad_out if scatter_out is None else grad_out.index_select(0, scatter_out)
        if ctx.scale_input:  # sorted_input = p x, sorted; the input is the narrow side
            input_side = grouped_mm(grad_sorted, weight, offsets).index_select(0, scatter_in)  # W_e^T g
            grad_scale = torch.linalg.vecdot(input_side, x)  # in x's row order
            if rows is not None:
                grad_scale = grad_scale.index_select(0, rows.token_row)
            if needs_weight:
                grad_weight = grouped_mm(grad_sorted.t(), sorted_input, offsets)
            if needs_x:
                grad_x = input_side.mul_((scale if rows is None else scale.index_select(0, rows.row_token)).unsqueeze(1))
        else:  # sorted_input = x, sorted; product = W_e x + b_e before scaling
            grad_scale = torch.empty_like(scale).index_copy_(0, order, torch.linalg.vecdot(grad_sorted, product))
            grad_sorted = grad_sorted * scale_sorted
            if needs_x:
                grad_x = grouped_mm(grad_sorted, weight, offsets).index_select(0, scatter_in)
            if needs_weight:
                grad_weight = grouped_mm(grad_sorted.t(), sorted_input, offsets)
            if needs_bias:
                grad_bias = torch.zeros_like(bias).index_add_(0, expert.index_select(0, order), grad_sorted)

        # Softmax backward, for p = probs[e] of the kept tokens and for what the losses read.
        grad_top = torch.where(keep, grad_scale.float(), 0).unsqueeze(0)
        grad_probs = torch.zeros_like(probs) if grad_probs is None else grad_probs.float()
        grad_probs = grad_probs.scatter_add(0, expert.unsqueeze(0), grad_top)
        grad_router_logits = probs * (grad_probs - torch.linalg.vecdot(grad_probs, probs, dim=0))
        if grad_logits is not None:
            grad_router_logits += grad_logits
        if rows is not None:
            grad_router_logits = grad_router_logits.index_select(1, rows.row_token)
        # Where the router's weight has its input's dtype, float32 or bfloat16 (as in bf16 training, where its
        # gradient is rounded to bfloat16 anyway), the router's gradients are products in that dtype: no float32
        # copies of the input or of its gradient. float16's narrow range would lose small logit gradients.
        if router_weight.dtype == sorted_input.dtype in (torch.float32, torch.bfloat16):
            grad_router_logits = grad_router_logits.to(router_weight.dtype)
        grad_router_weight = grad_router_input = None
        if needs_router_weight:
            if router_input is None:  # the router read x, kept as its sorted rows (x's row of each: gather_in)
                grad_router_weight = product_in(router_weight.dtype, grad_router_logits.index_select(1, gather_in),
                                                sorted_input)
            else:
                grad_router_weight = product_in(router_weight.dtype, grad_router_logits, router_input)
        through_router = ctx.router_input_is_x and needs_x
        if through_router and grad_router_logits.dtype == router_weight.dtype == grad_x.dtype:
            grad_x.addmm_(grad_router_logits.t(), router_weight)
        elif needs_router_input or through_router:
            grad_router_input = product_in(sorted_input.dtype, grad_router_logits.t(), router_weight)
            if through_router:
                grad_x, grad_router_input = grad_x + grad_router_input, None
        return grad_x, grad_router_input, grad_router_weight, grad_weight, grad_bias, None, None, None, None, None


def gathered_experts(x, weight, bias, expert, scale, on_views: bool | None = None):
    """Few tokens (decoding): each token through its expert's matrix alone, as dense reads one matrix.

    By default where reading the expert ids is free (`host_reads_are_free`), each token's product runs
    on a view of its matrix (`on_views`); elsewhere the chosen matrices are gathered for one batched
    matrix-vector product, without a host sync.
    """
    if on_views is None:
        on_views = host_reads_are_free(x.device)
    if on_views:
        ids = expert.tolist()
        if len(set(ids)) == 1:  # one expert for all tokens, as always in batch-1 decoding
            out = F.linear(x, weight[ids[0]], None if bias is None else bias[ids[0]])
        else:
            out = torch.stack([F.linear(row, weight[e], None if bias is None else bias[e]) for row, e in zip(x, ids)])
    else:
        out = torch.bmm(weight.index_select(0, expert), x.unsqueeze(-1)).squeeze(-1)
        if bias is not None:
            out = out + bias.index_select(0, expert)
    return out * scale.unsqueeze(1)


# Dispatches given the routing: the per-expert loop (reference) and the few-token gather + bmm. The
# default for gradients and larger batches, "grouped_mm", routes inside `RoutedExperts`.
EXPERT_BACKENDS = {"loop": loop_experts, "gathered": gathered_experts}
BACKENDS = ("loop", "grouped_mm", "gathered")
# Without gradients, up to this many tokens (batch-1 or small-batch decoding) take `gathered_experts`.
FEW_TOKENS = 4


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer multiplies `x` in: autocast's where it is on for x's device (mixed-precision
    training), else x's own."""
    if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def grouped_mm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `grouped_mm` runs these operands, in their `compute_dtype`: 16-byte aligned rows; on CUDA,
    bf16 from sm80 and any float dtype from sm90 (Hopper)."""
    if not hasattr(F, "grouped_mm"):
        return False
    dtype = compute_dtype(x)
    element_bytes = dtype.itemsize
    if (weight.shape[1] * element_bytes) % 16 or (weight.shape[2] * element_bytes) % 16:
        return False
    if x.device.type == "cuda":
        capability = torch.cuda.get_device_capability(x.device)
        return capability >= (9, 0) or (capability >= (8, 0) and dtype == torch.bfloat16)
    return x.device.type == "cpu"


class RoutedLinear(nn.Module):
    """A linear layer made of `num_experts` matrices, each token using the top-1 of a float32 router.

    Parameters: `router.weight` [E, in] and `weight` [E, out, in] (and `bias` [E, out] if asked).
    The output for a token is p * (W_e x + b_e), p the router probability of its expert e; padding
    and tokens past their expert's capacity get 0. After each forward, `routing` holds the router
    logits, the losses and the load statistics.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_experts: int,
        bias: bool = False,
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None = None,
        min_capacity: int = 4,
        router_jitter_noise: float = 0.0,
        backend: str = "auto",
    ):
        super().__init__()
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"Unknown expert backend {backend!r}: expected 'auto' or one of {list(BACKENDS)}.")
        self.in_features = in_features
        self.out_features = out_features
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.min_capacity = min_capacity
        self.router_jitter_noise = router_jitter_noise
        self.backend = backend
        self.router = nn.Linear(in_features, num_experts, bias=False)
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(num_experts, out_features)) if bias else None
        self.routing: Routing | None = None
        nn.init.normal_(self.weight, std=0.02)
        nn.init.normal_(self.router.weight, std=0.02)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, num_experts={self.num_experts}, "
            f"bias={self.bias is not None}, backend={self.backend}"
        )

    def expert_backend(self, x: torch.Tensor) -> str:
        if self.backend != "auto":
            return self.backend
        if x.shape[0] <= FEW_TOKENS and not torch.is_grad_enabled():
            return "gathered"
        return "grouped_mm" if grouped_mm_supported(x, self.weight) else "loop"

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`x` [..., in]; `attention_mask` [...] with 1 for real tokens and 0 for padding (None = all real)."""
        leading_shape = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        valid = token_mask(attention_mask, x)
        backend = self.expert_backend(x)
        if backend == "grouped_mm":
            out, _ = self.sorted_forward(x, valid)
            return out.reshape(*leading_shape, self.out_features)
        x, weight, bias = self.autocast_operands(x)
        if backend == "gathered" and (kernels := self.whole_forward_kernels(x)) is not None:
            out, logits, probs, expert, *summary = kernels.routed_few_tokens(
                x, self.router_input(x), self.router.weight, weight, bias, valid
            )
            self.routing = Routing(logits, probs, expert, valid, valid)
            self.routing.summary = tuple(summary)
        else:
            logits, probs, scale, expert, keep, _, _ = route(
                self.router.weight, self.router_input(x), valid, self.active_capacity_factor(), self.min_capacity,
                x.dtype, sort=False,
            )
            out = EXPERT_BACKENDS[backend](x, weight, bias, expert, scale)
            self.routing = Routing(logits, probs, expert, valid, keep)
        return out.reshape(*leading_shape, self.out_features)

    def sorted_forward(self, x: torch.Tensor, valid: torch.Tensor, rows: RowOrder | None = None, output=None):
        """The grouped_mm path on [T, in] rows in order `rows` (None: token order), returning [T, out] rows
        in order `output` (None: token order, `SORTED`: this linear's sorted order, or a `RowOrder`) and
        the sorted order as a `RowOrder`."""
        x, weight, bias = self.autocast_operands(x)
        out, logits, probs, expert, keep, order, inverse = RoutedExperts.apply(
            x, self.router_input(x), self.router.weight, weight, bias, valid, self.active_capacity_factor(),
            self.min_capacity, rows, output,
        )
        self.routing = Routing(logits, probs, expert, valid, keep)
        return out, RowOrder(order, inverse)

    def autocast_operands(self, x: torch.Tensor):
        """x and the expert weight and bias in x's `compute_dtype`: under autocast the experts multiply in its
        half precision, as its linear layers do (the parameters stay float32 and get float32 gradients)."""
        if not torch.is_autocast_enabled(x.device.type):
            return x, self.weight, self.bias
        dtype = compute_dtype(x)
        return x.to(dtype), self.weight.to(dtype), None if self.bias is None else self.bias.to(dtype)

    def whole_forward_kernels(self, x: torch.Tensor):
        """The `few_token_kernels` where they may run this forward whole (router and experts in one call):
        without gradients, and where capacity drops no token (dropless, or no more tokens than
        `min_capacity`, below which the capacity never falls). Else None; also under torch.compile, which
        fuses the tensor ops itself (and would break its graph at the kernels' lookup)."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return None
        if self.active_capacity_factor() is not None and x.shape[0] > self.min_capacity:
            return None
        return few_token_kernels(x.device)

    def router_input(self, x: torch.Tensor) -> torch.Tensor:
        """x, jittered in training when `router_jitter_noise` > 0 (the experts see x unchanged)."""
        if self.training and self.router_jitter_noise > 0:
            return x * torch.empty_like(x).uniform_(1.0 - self.router_jitter_noise, 1.0 + self.router_jitter_noise)
        return x

    def active_capacity_factor(self) -> float | None:
        return self.capacity_factor if self.training else self.eval_capacity_factor


def token_mask(attention_mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """[T] bool: the real tokens of x's T rows (all of them without a mask)."""
    if attention_mask is None:
        return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    return attention_mask.reshape(-1).to(device=x.device, dtype=torch.bool)


class ParameterNetLlamaMLP(nn.Module):
    """LLaMA's SwiGLU MLP whose configured projections are RoutedLinear expert banks."""

    def __init__(self, config: ParameterNetLlamaConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size
        shapes = {
            "gate_proj": (config.hidden_size, config.intermediate_size),
            "up_proj": (config.hidden_size, config.intermediate_size),
            "down_proj": (config.intermediate_size, config.hidden_size),
        }
        self.routed_projections = [name for name in MOE_PROJECTIONS if config.is_routed(layer_idx, name)]
        for name, (in_features, out_features) in shapes.items():
            if name in self.routed_projections:
                projection = RoutedLinear(
                    in_features,
                    out_features,
                    config.num_experts,
                    bias=config.mlp_bias,
                    capacity_factor=config.capacity_factor,
                    eval_capacity_factor=config.eval_capacity_factor,
                    min_capacity=config.min_capacity,
                    router_jitter_noise=config.router_jitter_noise,
                    backend=config.moe_backend,
                )
            else:
                projection = nn.Linear(in_features, out_features, bias=config.mlp_bias)
            setattr(self, name, projection)
        self.act_fn = ACT2FN[config.hidden_act]

    def project(self, name: str, rows: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        projection = getattr(self, name)
        return projection(rows, valid) if name in self.routed_projections else projection(rows)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`attention_mask` [batch, seq]: 1 for tokens to route, 0 for padding."""
        rows = x.reshape(-1, self.hidden_size)
        valid = token_mask(attention_mask, rows)  # once for all routed projections
        lead = self.sorted_lead(rows)
        if lead is None:
            hidden = self.act_fn(self.project("gate_proj", rows, valid)) * self.project("up_proj", rows, valid)
            return self.project("down_proj", hidden, valid).reshape(x.shape)
        return self.sorted_forward(rows, valid, lead).reshape(x.shape)

    def sorted_lead(self, rows: torch.Tensor) -> str | None:
        """The routed gate or up projection whose expert-sorted row order the MLP can run in: every
        routed projection takes the grouped_mm path. None when the MLP runs in token order."""
        routed = {name: getattr(self, name) for name in self.routed_projections}
        if any(linear.expert_backend(rows) != "grouped_mm" for linear in routed.values()):
            return None
        return next((name for name in ("up_proj", "gate_proj") if name in routed), None)

    def sorted_forward(self, rows: torch.Tensor, valid: torch.Tensor, lead: str) -> torch.Tensor:
        """The MLP with its intermediate activations in `lead`'s sorted row order: the lead's wide output
        is never permuted, the other of gate/up delivers in that order, and the down projection takes
        it so (routed) or its narrow output is put back in token order (dense). This saves one wide
        gather in the forward and one in the backward over projecting in token order."""
        lead_out, order = getattr(self, lead).sorted_forward(rows, valid, output=SORTED)
        other = "gate_proj" if lead == "up_proj" else "up_proj"
        if other in self.routed_projections:
            other_out, _ = getattr(self, other).sorted_forward(rows, valid, output=order)
        else:
            other_out = getattr(self, other)(PermuteRows.apply(rows, order.row_token, order.token_row))
        gate, up = (other_out, lead_out) if lead == "up_proj" else (lead_out, other_out)
        hidden = self.act_fn(gate) * up
        if "down_proj" in self.routed_projections:
            out, _ = self.down_proj.sorted_forward(hidden, valid, rows=order)
            return out
        return PermuteRows.apply(self.down_proj(hidden), order.token_row, order.row_token)


class ParameterNetLlamaDecoderLayer(GradientCheckpointingLayer):
    """LLaMA decoder layer whose MLP receives the padding mask, so padding is never routed."""

    def __init__(self, config: ParameterNetLlamaConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = LlamaAttention(config=config, layer_idx=layer_idx)
        self.mlp = ParameterNetLlamaMLP(config, layer_idx)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, routing_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        residual = hidden_states
        hidden_states, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states), routing_mask)
        return residual + hidden_states


@dataclass
class ParameterNetModelOutputWithPast(BaseModelOutputWithPast):
    """LLaMA's base output plus the router losses (means over routed linears) and, if asked, logits."""

    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None


@dataclass
class ParameterNetCausalLMOutputWithPast(CausalLMOutputWithPast):
    """LLaMA's causal-LM output plus the language-model loss alone and the router losses."""

    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None


class ParameterNetLlamaPreTrainedModel(LlamaPreTrainedModel):
    config_class = ParameterNetLlamaConfig
    config: ParameterNetLlamaConfig
    _no_split_modules = ["ParameterNetLlamaDecoderLayer"]
    _can_record_outputs = {"hidden_states": ParameterNetLlamaDecoderLayer, "attentions": LlamaAttention}

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, RoutedLinear):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)

    def routed_linears(self) -> dict[str, RoutedLinear]:
        """Every routed linear by its module name, in module order."""
        return {name: module for name, module in self.named_modules() if isinstance(module, RoutedLinear)}

    def router_losses(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(aux_loss, z_loss) of the last forward: means over all routed linears."""
        aux_loss, z_loss, _, _ = stacked_summary(self.base_model.routings())
        return aux_loss.mean(), z_loss.mean()

    def routing_stats(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per routed linear, from the last forward: `load` [E] (share of valid tokens per expert,
        1/E each when balanced) and `dropped` (share of valid tokens dropped by capacity)."""
        routed = {name: module.routing for name, module in self.routed_linears().items() if module.routing}
        if not routed:
            return {}
        _, _, loads, dropped = stacked_summary(list(routed.values()))
        return {name: {"load": loads[i], "dropped": dropped[i]} for i, name in enumerate(routed)}

    def _set_gradient_checkpointing(self, enable=True, gradient_checkpointing_func=checkpoint, **kwargs):
        """Checkpoint non-reentrantly: a reentrant replay runs the forward without gradients, which would
        cut the router losses (read during the forward) off from the router weights."""
        keywords = getattr(gradient_checkpointing_func, "keywords", None) or {}
        if enable and keywords.get("use_reentrant") is not False:
            if keywords.get("use_reentrant"):
                logger.warning_once("ParameterNet-LLaMA ignores use_reentrant=True: router losses need non-reentrant checkpointing.")
            function = getattr(gradient_checkpointing_func, "func", gradient_checkpointing_func)
            gradient_checkpointing_func = partial(function, **{**keywords, "use_reentrant": False})
        super()._set_gradient_checkpointing(enable, gradient_checkpointing_func, **kwargs)

    @classmethod
    def from_pretrained(cls, *args, output_loading_info=False, **kwargs):
        """`PreTrainedModel.from_pretrained` that refuses checkpoints lacking expert or router tensors."""
        model, loading_info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        routed_names = model.routed_linears()
        missing = sorted(
            key
            for key in loading_info["missing_keys"]
            if key.rsplit(".", 1)[0] in routed_names or key.rsplit(".", 2)[0] in routed_names
        )
        if missing:
            source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
            raise ValueError(
                f"Checkpoint {source} lacks {len(missing)} expert/router tensor(s) of {cls.__name__}: {shown}. "
                "Refusing to initialise them at random; check num_experts, moe_projections and moe_layers "
                "against the checkpoint."
            )
        return (model, loading_info) if output_loading_info else model


class ParameterNetLlamaModel(ParameterNetLlamaPreTrainedModel, LlamaModel):
    """LLaMA decoder stack with routed FFN projections; returns the router losses as well."""

    def __init__(self, config: ParameterNetLlamaConfig):
        LlamaPreTrainedModel.__init__(self, config)
        config.validate_routing()
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [ParameterNetLlamaDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def routings(self) -> list[Routing]:
        """The last forward's `Routing` of every routed linear, layer by layer in gate, up, down order
        (read every forward, so the layers are walked directly rather than through all submodules)."""
        return [getattr(layer.mlp, name).routing for layer in self.layers for name in layer.mlp.routed_projections]

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> ParameterNetModelOutputWithPast:
        """LlamaModel.forward; a 2D `attention_mask` also marks the padding that routing skips."""
        routing_mask = None
        if attention_mask is not None and attention_mask.dim() == 2:
            new_tokens = (input_ids if input_ids is not None else inputs_embeds).shape[1]
            routing_mask = attention_mask[:, -new_tokens:].bool()
        outputs = super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            routing_mask=routing_mask,
            return_dict=True,
            **kwargs,
        )
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        aux_loss, z_loss = self.router_losses()
        router_logits = None
        if output_router_logits:
            router_logits = tuple(routing.router_logits for routing in self.routings())
        return ParameterNetModelOutputWithPast(**outputs, aux_loss=aux_loss, z_loss=z_loss, router_logits=router_logits)


class ParameterNetLlamaForCausalLM(ParameterNetLlamaPreTrainedModel, LlamaForCausalLM):
    """Causal LM; with labels, loss = CE + router_aux_loss_coef * aux_loss + router_z_loss_coef * z_loss."""

    def __init__(self, config: ParameterNetLlamaConfig):
        LlamaPreTrainedModel.__init__(self, config)
        self.model = ParameterNetLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> ParameterNetCausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])

        loss = lm_loss = None
        if labels is not None:
            lm_loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            loss = (
                lm_loss
                + self.config.router_aux_loss_coef * outputs.aux_loss
                + self.config.router_z_loss_coef * outputs.z_loss
            )
        model_fields = {key: value for key, value in outputs.items() if key != "last_hidden_state"}
        return ParameterNetCausalLMOutputWithPast(loss=loss, lm_loss=lm_loss, logits=logits, **model_fields)


class ParameterNetLlamaForSequenceClassification(GenericForSequenceClassification, ParameterNetLlamaPreTrainedModel):
    """Classifier on the last real token (as LlamaForSequenceClassification); with labels, the loss adds
    the weighted router losses as the causal LM's does."""

    def __init__(self, config: ParameterNetLlamaConfig):
        LlamaPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = ParameterNetLlamaModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(self, *args, labels: torch.LongTensor | None = None, **kwargs):
        outputs = super().forward(*args, labels=labels, return_dict=True, **kwargs)
        if labels is not None:
            aux_loss, z_loss = self.router_losses()
            outputs.loss = (outputs.loss + self.config.router_aux_loss_coef * aux_loss
                            + self.config.router_z_loss_coef * z_loss)
        return outputs


ParameterNetLlamaModel.register_for_auto_class("AutoModel")
ParameterNetLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")
ParameterNetLlamaForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

__all__ = [
    "RoutedLinear",
    "ParameterNetLlamaPreTrainedModel",
    "ParameterNetLlamaModel",
    "ParameterNetLlamaForCausalLM",
    "ParameterNetLlamaForSequenceClassification",
]
