"""Triton kernels for CUDA: the few-token routed linear of decoding in one launch.

Batch-1 decoding on a GPU is bound by kernel launches, and the model's tensor ops run a routed linear
on a few tokens as about nine (router product, softmax, top-1, scale, the chosen matrices' gather,
their product, ...) where its dense twin runs one. `routed_few_tokens` is one launch with the results
of the compiled CPU kernel (`csrc/routed_few_tokens.cpp`): the float32 router logits and
probabilities, each token's top-1 expert, y = p (W_e x + b_e) with the chosen matrix read in place
(0 for padding), and the routing's Switch losses and load for dropless routing.

Needs triton (CUDA builds of torch install it); `PARAMETERNET_LLM_TRITON=0` switches the kernel off.
With `TRITON_INTERPRET=1` set before this module is imported, Triton's interpreter runs the kernel on
CPU tensors: that is how the tests check it on machines without a GPU.
"""

import os
import warnings
from functools import cache

import torch
import triton
import triton.language as tl

SWITCH = "PARAMETERNET_LLM_TRITON"
# Output rows and input columns per program: few rows per program spread one token's product over
# many of the GPU's cores, as a memory-bound matrix-vector product wants.
BLOCK_OUT = 32
BLOCK_IN = 128


@triton.jit
def _rows_times_token(matrix, rows, num_rows, inputs, token, IN_FEATURES: tl.constexpr, BLOCK_IN: tl.constexpr):
    """float32 products of a [num_rows, in] matrix's `rows` with input row `token`, 0 for rows past num_rows."""
    partial = tl.zeros([rows.shape[0], BLOCK_IN], dtype=tl.float32)
    for start in range(0, IN_FEATURES, BLOCK_IN):
        columns = start + tl.arange(0, BLOCK_IN)
        inside = columns < IN_FEATURES
        x = tl.load(inputs + token * IN_FEATURES + columns, mask=inside, other=0.0).to(tl.float32)
        w = tl.load(matrix + rows[:, None] * IN_FEATURES + columns[None, :],
                    mask=(rows[:, None] < num_rows) & inside[None, :], other=0.0).to(tl.float32)
        partial += w * x[None, :]
    return tl.sum(partial, axis=1)


@triton.jit
def _router_logits(router_input, router_weight, token, IN_FEATURES: tl.constexpr, NUM_EXPERTS: tl.constexpr,
                   EXPERTS: tl.constexpr, BLOCK_IN: tl.constexpr):
    """One token's float32 router logits, [EXPERTS] (a power of two), -inf past NUM_EXPERTS."""
    experts = tl.arange(0, EXPERTS)
    logits = _rows_times_token(router_weight, experts, NUM_EXPERTS, router_input, token, IN_FEATURES, BLOCK_IN)
    return tl.where(experts < NUM_EXPERTS, logits, float("-inf"))


@triton.jit
def _routed_few_tokens_kernel(x, router_input, router_weight, weight, bias, valid, out, routing, expert, summary,
                              out_features, NUM_TOKENS: tl.constexpr, IN_FEATURES: tl.constexpr,
                              NUM_EXPERTS: tl.constexpr, EXPERTS: tl.constexpr, HAS_BIAS: tl.constexpr,
                              BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr):
    """Program (t, b): token t's output rows [b * BLOCK_OUT, (b + 1) * BLOCK_OUT). Every program routes its
    token itself (a product of E x in, against the block's BLOCK_OUT x in), so no launch waits on
    another; the programs of block 0 write their token's routing, program (0, 0) the losses and load.
    `routing` holds the logits [E, T] and then the probabilities [E, T]; `summary`: aux loss, z-loss,
    dropped share, load [E]. The token count and input width are compile-time constants, so the loops
    over them have fixed bounds (a model has few shapes; batch-1 decoding one token count)."""
    token = tl.program_id(0)
    block = tl.program_id(1)
    experts = tl.arange(0, EXPERTS)
    logits = _router_logits(router_input, router_weight, token, IN_FEATURES, NUM_EXPERTS, EXPERTS, BLOCK_IN)
    exps = tl.exp(logits - tl.max(logits, axis=0))
    probs = exps / tl.sum(exps, axis=0)
    top = tl.argmax(logits, axis=0, tie_break_left=True)
    scale = tl.where(tl.load(valid + token) != 0, tl.sum(tl.where(experts == top, probs, 0.0), axis=0), 0.0)

    rows = block * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    matrix = weight + top.to(tl.int64) * out_features * IN_FEATURES
    y = _rows_times_token(matrix, rows, out_features, x, token, IN_FEATURES, BLOCK_IN)
    if HAS_BIAS:
        y += tl.load(bias + top * out_features + rows, mask=rows < out_features, other=0.0).to(tl.float32)
    dtype = out.dtype.element_ty
    # As the model: the product in the model's dtype, times the probability rounded to that dtype.
    y = y.to(dtype).to(tl.float32) * scale.to(dtype).to(tl.float32)
    tl.store(out + token * out_features + rows, y.to(dtype), mask=rows < out_features)

    if block == 0:
        real = experts < NUM_EXPERTS
        tl.store(routing + experts * NUM_TOKENS + token, logits, mask=real)
        tl.store(routing + (NUM_EXPERTS + experts) * NUM_TOKENS + token, probs, mask=real)
        tl.store(expert + token, top.to(tl.int64))
    if (token == 0) & (block == 0):
        tokens_of = tl.zeros([EXPERTS], dtype=tl.float32)
        prob_sum = tl.zeros([EXPERTS], dtype=tl.float32)
        z_sum = tl.zeros([], dtype=tl.float32)
        num_valid = tl.zeros([], dtype=tl.float32)
        for t in range(0, NUM_TOKENS):
            token_logits = _router_logits(router_input, router_weight, t, IN_FEATURES, NUM_EXPERTS, EXPERTS,
                                          BLOCK_IN)
            peak = tl.max(token_logits, axis=0)
            token_exps = tl.exp(token_logits - peak)
            total = tl.sum(token_exps, axis=0)
            is_valid = (tl.load(valid + t) != 0).to(tl.float32)
            chosen = experts == tl.argmax(token_logits, axis=0, tie_break_left=True)
            tokens_of += tl.where(chosen, is_valid, 0.0)
            prob_sum += is_valid * token_exps / total
            logsumexp = peak + tl.log(total)
            z_sum += is_valid * logsumexp * logsumexp
            num_valid += is_valid
        num_valid = tl.maximum(num_valid, 1.0)
        load = tokens_of / num_valid
        tl.store(summary, NUM_EXPERTS * tl.sum(load * prob_sum, axis=0) / num_valid)
        tl.store(summary + 1, z_sum / num_valid)
        tl.store(summary + 2, 0.0)
        tl.store(summary + 3 + experts, load, mask=experts < NUM_EXPERTS)


def check_operands(x, router_input, router_weight, weight, bias, valid) -> None:
    """Refuses operands the kernel cannot take, naming the culprit."""
    if x.dim() != 2 or router_input.shape != x.shape:
        raise ValueError(f"routed_few_tokens: x and router_input must be [T, in] alike, got {tuple(x.shape)} "
                         f"and {tuple(router_input.shape)}")
    if weight.dim() != 3 or weight.shape[2] != x.shape[1]:
        raise ValueError(f"routed_few_tokens: weight must be [E, out, {x.shape[1]}], got {tuple(weight.shape)}")
    if router_weight.shape != (weight.shape[0], x.shape[1]):
        raise ValueError(f"routed_few_tokens: router_weight must be [{weight.shape[0]}, {x.shape[1]}], got "
                         f"{tuple(router_weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:2]:
        raise ValueError(f"routed_few_tokens: bias must be [{weight.shape[0]}, {weight.shape[1]}], got "
                         f"{tuple(bias.shape)}")
    if valid.shape != x.shape[:1] or valid.dtype != torch.bool:
        raise ValueError(f"routed_few_tokens: valid must be a [{x.shape[0]}] bool tensor, got {valid.dtype} "
                         f"{tuple(valid.shape)}")
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(f"routed_few_tokens: weight and bias must have x's dtype {x.dtype}, got {weight.dtype}")
    devices = {t.device for t in (x, router_input, router_weight, weight, valid, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"routed_few_tokens: operands on several devices: {sorted(map(str, devices))}")


def routed_few_tokens(x, router_input, router_weight, weight, bias, valid):
    """A dropless routed linear on a few token rows `x` [T, in] (`valid` [T] bool) in one launch, with the
    results of `cpu_kernels.routed_few_tokens`: the output [T, out], router logits and probabilities [E, T]
    (float32), each token's top-1 expert [T], and the routing's aux loss, z-loss, expert load [E] and
    dropped share (0)."""
    check_operands(x, router_input, router_weight, weight, bias, valid)
    if x.is_cuda and x.device.index != torch.cuda.current_device():  # Triton launches on the current device
        with torch.cuda.device(x.device):
            return routed_few_tokens(x, router_input, router_weight, weight, bias, valid)
    tokens, in_features = x.shape
    num_experts, out_features, _ = weight.shape
    out = x.new_empty(tokens, out_features)
    routing = torch.empty(2, num_experts, tokens, dtype=torch.float32, device=x.device)
    summary = torch.empty(3 + num_experts, dtype=torch.float32, device=x.device)
    expert = torch.empty(tokens, dtype=torch.int64, device=x.device)
    weight = weight.contiguous()
    grid = (tokens, triton.cdiv(out_features, BLOCK_OUT))
    _routed_few_tokens_kernel[grid](
        x.contiguous(), router_input.contiguous(), router_weight.contiguous(), weight,
        weight if bias is None else bias.contiguous(), valid.contiguous(), out, routing, expert, summary, out_features,
        NUM_TOKENS=tokens, IN_FEATURES=in_features, NUM_EXPERTS=num_experts,
        EXPERTS=triton.next_power_of_2(num_experts), HAS_BIAS=bias is not None, BLOCK_OUT=BLOCK_OUT,
        BLOCK_IN=BLOCK_IN,
    )
    logits, probs = routing.unbind()
    return out, logits, probs, expert, summary[0], summary[1], summary[3:], summary[2]


@cache
def load() -> bool:
    """Whether the kernel is switched on and runs here: it is compiled and run once on small operands on
    the GPU (on the CPU where there is none, as under the interpreter); False, with a warning, where
    that fails."""
    if os.environ.get(SWITCH, "1") == "0":
        return False
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        x = torch.zeros(1, 16, device=device)
        routed_few_tokens(x, x, torch.zeros(2, 16, device=device), torch.zeros(2, 16, 16, device=device), None,
                          torch.ones(1, dtype=torch.bool, device=device))
    except Exception as error:  # an old GPU, a triton that cannot compile it: all mean the tensor-op path
        warnings.warn(f"The Triton few-token kernel does not run on {device} ({type(error).__name__}: {error}); "
                      f"decoding uses tensor ops instead. Set {SWITCH}=0 to skip the attempt.", stacklevel=2)
        return False
    return True
