"""ParameterNet-LLaMA: LLaMA whose FFN projections are Switch-routed (top-1) expert banks.

Each routed projection holds E expert matrices and a float32 router; every token uses one expert, so
the FLOPs stay those of the dense LLaMA while the projection's parameters grow E-fold
(Han et al., "ParameterNet: Parameters Are All You Need", arXiv 2306.14525). Capacity and the
auxiliary losses follow Switch Transformer (Fedus et al. 2021).

This file is the reference: it is copied into every saved checkpoint and imports only torch,
transformers and its configuration. Faster arithmetic for the expert products is a plug-in that a package
may register as a torch custom op (see `plugin`); without one this file runs on its own.
"""

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaForCausalLM,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)
from transformers.utils import can_return_tuple, logging

try:  # transformers installs the hooks that record outputs on first use, which torch.compile cannot trace
    from transformers.utils.output_capturing import maybe_install_capturing_hooks
except ImportError:  # older layouts install them the same way, on first use
    maybe_install_capturing_hooks = None

from .configuration_parameternet_llama import MOE_PROJECTIONS, ParameterNetLlamaConfig

logger = logging.get_logger(__name__)

# Plug-ins are torch custom ops named `PLUGIN_NAMESPACE::<name>_v<PLUGIN_VERSION>_<device type>`, for example
# `parameternet_llm::expert_products_v1_cpu`, that compute what the code they replace here computes. The version
# names the contract: a package that changes it registers a new name, which this file does not look up.
PLUGIN_NAMESPACE = "parameternet_llm"
PLUGIN_VERSION = 1


def plugin(name: str, device: torch.device):
    """The custom op registered for `name` on `device`'s type, or None (always under torch.compile, which traces
    this file's own operations)."""
    if torch.compiler.is_compiling():
        return None
    return getattr(getattr(torch.ops, PLUGIN_NAMESPACE), f"{name}_v{PLUGIN_VERSION}_{device.type}", None)


@dataclass
class RouterOutput:
    """What a router decided for T tokens; the losses and load statistics follow from it."""

    logits: torch.Tensor  # [T, E] float32, every token (padding included)
    probs: torch.Tensor  # [T, E] softmax of the logits
    expert: torch.Tensor  # [T] top-1 expert of every token
    valid: torch.Tensor  # [T] real tokens (attention_mask = 1)
    keep: torch.Tensor  # [T] valid tokens within their expert's capacity
    scale: torch.Tensor  # [T] factor on each token's expert output (see expert_scale), 0 for padding and dropped


def one_hot(expert: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[..., E] bool, True at each token's expert (`F.one_hot` would read the ids back to check them)."""
    return expert.unsqueeze(-1) == torch.arange(num_experts, device=expert.device)


def expert_capacity(capacity_factor: float, num_valid: torch.Tensor, num_experts: int, min_capacity: int):
    """Switch's capacity per expert, C = max(min_capacity, ceil(factor * T_valid / E)), for a float64 count."""
    return torch.clamp(torch.ceil(capacity_factor * num_valid / num_experts), min=min_capacity)


def capacity_keep(expert, valid, capacity_factor: float, min_capacity: int, num_experts: int) -> torch.Tensor:
    """Valid tokens within their expert's capacity (`expert_capacity`). Slots are claimed in token order and
    padding claims none; C stays a tensor, so no value is read back to the host."""
    claims = (one_hot(expert, num_experts) & valid.unsqueeze(1)).int()
    slot = claims.cumsum(0).gather(1, expert.unsqueeze(1)).squeeze(1)  # 1-based place in the expert's queue
    capacity = expert_capacity(capacity_factor, valid.sum(dtype=torch.float64), num_experts, min_capacity)
    return valid & (slot <= capacity)


def routing_summary(routings: list[RouterOutput]):
    """Per routed linear of one forward (same tokens): the Switch load-balancing loss E * sum_e f_e * P_e, the
    router z-loss, the load f [E] (share of valid tokens whose top-1 is each expert) and the dropped share,
    all over valid tokens. Returns tensors [R], [R], [R, E], [R] for R routings; element-wise products and sums
    only, so autocast leaves them in float32."""
    logits = torch.stack([routing.logits for routing in routings])
    probs = torch.stack([routing.probs for routing in routings])
    expert = torch.stack([routing.expert for routing in routings])
    keep = torch.stack([routing.keep for routing in routings])
    valid = routings[0].valid
    weight = valid.to(logits.dtype).unsqueeze(1)  # [T, 1]
    num_valid = weight.sum().clamp(min=1)
    num_experts = logits.shape[-1]
    load = (one_hot(expert, num_experts) * weight).sum(1) / num_valid
    mean_probs = (probs * weight).sum(1) / num_valid
    aux_loss = num_experts * (load * mean_probs).sum(-1)
    z_loss = (torch.logsumexp(logits, dim=-1).square() * weight.squeeze(1)).sum(-1) / num_valid
    dropped = (valid & ~keep).sum(-1) / num_valid
    return aux_loss, z_loss, load.detach(), dropped.detach()


class ParameterNetRouter(nn.Module):
    """Top-1 router with Switch capacity: float32 logits, softmax, the most probable expert, and the valid
    tokens that fit within capacity (the training factor in train mode, the eval factor in eval mode). The
    scale is the expert's probability p, or with `expert_scale="straight_through"` p - p.detach() + 1: exactly
    1 in the forward, p's gradient in the backward."""

    def __init__(self, config: ParameterNetLlamaConfig, in_features: int):
        super().__init__()
        self.num_experts = config.num_experts
        self.capacity_factor = config.capacity_factor
        self.eval_capacity_factor = config.eval_capacity_factor
        self.min_capacity = config.min_capacity
        self.jitter_noise = config.router_jitter_noise
        self.straight_through = config.expert_scale == "straight_through"
        self.weight = nn.Parameter(torch.empty(config.num_experts, in_features))
        nn.init.normal_(self.weight, std=config.initializer_range)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> RouterOutput:
        """`x` [T, in] token rows, `valid` [T] bool."""
        if self.training and self.jitter_noise > 0:  # the router's input only: the experts see x unchanged
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        probs = logits.softmax(dim=-1)
        top_prob, expert = probs.max(dim=-1)  # the first of equal maxima
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        keep = valid if factor is None else capacity_keep(expert, valid, factor, self.min_capacity, self.num_experts)
        scale = top_prob - top_prob.detach() + 1 if self.straight_through else top_prob
        return RouterOutput(logits, probs, expert, valid, keep, scale * keep)


def loop_experts(x, weight, bias, expert, scale):
    """Reference dispatch: expert by expert, every token through the expert's matrix, each token keeping the
    result of its own expert times its scale. E times the FLOPs, but no shape depends on the routing."""
    out = x.new_zeros(x.shape[0], weight.shape[1])
    for e in range(weight.shape[0]):
        product = F.linear(x, weight[e], None if bias is None else bias[e])
        out = out + torch.where((expert == e).unsqueeze(1), product * scale.unsqueeze(1), 0)
    return out


def grouped_experts(x, weight, bias, expert, keep, scale):
    """One grouped product over the tokens sorted by expert, the results put back in token order. Kept tokens
    are grouped by expert; dropped tokens and padding (scale 0) follow them in the last group, so every row
    is in a group (`grouped_mm` leaves rows outside the groups undefined, in its output and in the gradient
    of its input). Nothing is read back to the host. A plug-in may do the arithmetic after the sort."""
    num_experts = weight.shape[0]
    sorted_key, order = torch.sort(torch.where(keep, expert, num_experts), stable=True)
    group_ends = torch.searchsorted(sorted_key, torch.arange(1, num_experts + 1, device=x.device), out_int32=True)
    group_ends[-1] = x.shape[0]
    if bias is None and (kernel := plugin("expert_products", x.device)) is not None:
        return kernel(x, weight, order, group_ends, scale)
    product = F.grouped_mm(x.index_select(0, order), weight.transpose(1, 2), offs=group_ends)
    if bias is not None:
        product = product + bias.index_select(0, sorted_key.clamp(max=num_experts - 1))
    sorted_out = product * scale.index_select(0, order).unsqueeze(1)
    return torch.empty_like(sorted_out).index_copy_(0, order, sorted_out)


def grouped_mm_runs(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `F.grouped_mm` takes these operands: rows 16-byte aligned; on CUDA bf16 from sm80 and any float
    dtype from sm90; under torch.compile bf16 only (its shape function rejects other dtypes)."""
    if (weight.shape[1] * x.element_size()) % 16 or (weight.shape[2] * x.element_size()) % 16:
        return False
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return False
    if x.device.type == "cuda":
        capability = torch.cuda.get_device_capability(x.device)
        return capability >= (9, 0) or (capability >= (8, 0) and x.dtype == torch.bfloat16)
    return x.device.type == "cpu"


class RoutedLinear(nn.Module):
    """A linear layer made of `config.num_experts` matrices, each token using the top-1 of a float32 router.

    Parameters: `router.weight` [E, in] and `weight` [E, out, in] (and `bias` [E, out] with `config.mlp_bias`).
    The output for a token is p * (W_e x + b_e), p the router probability of its expert e (or 1 in the forward
    with `expert_scale="straight_through"`); padding and tokens past their expert's capacity get 0.
    """

    def __init__(self, config: ParameterNetLlamaConfig, in_features: int, out_features: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.num_experts = config.num_experts
        self.backend = config.moe_backend
        self.router = ParameterNetRouter(config, in_features)
        self.weight = nn.Parameter(torch.empty(config.num_experts, out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(config.num_experts, out_features)) if config.mlp_bias else None
        nn.init.normal_(self.weight, std=config.initializer_range)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, num_experts={self.num_experts}, "
            f"bias={self.bias is not None}, backend={self.backend}"
        )

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """`x` [..., in]; `attention_mask` [...] with 1 for real tokens, 0 for padding (None: all real).
        Returns the output [..., out] and the `RouterOutput` of the T = x[..., 0].numel() token rows."""
        rows = x.reshape(-1, self.in_features)
        valid = token_mask(attention_mask, rows)
        routing = self.router(rows, valid)
        # Under autocast the experts multiply in its half precision, as linear layers do there.
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        rows, weight = rows.to(dtype), self.weight.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        scale = routing.scale.to(dtype)
        backend = self.backend
        if backend == "auto":
            backend = "grouped_mm" if grouped_mm_runs(rows, weight) else "loop"
        if backend == "grouped_mm":
            out = grouped_experts(rows, weight, bias, routing.expert, routing.keep, scale)
        else:
            out = loop_experts(rows, weight, bias, routing.expert, scale)
        return out.reshape(*x.shape[:-1], self.out_features), routing


def token_mask(attention_mask: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    """[T] bool: the real tokens among the T rows (all of them without a mask)."""
    if attention_mask is None:
        return torch.ones(rows.shape[0], dtype=torch.bool, device=rows.device)
    return attention_mask.reshape(-1).to(device=rows.device, dtype=torch.bool)


class ParameterNetLlamaMLP(nn.Module):
    """LLaMA's SwiGLU MLP whose configured projections are RoutedLinear expert banks."""

    def __init__(self, config: ParameterNetLlamaConfig, layer_idx: int):
        super().__init__()
        shapes = {
            "gate_proj": (config.hidden_size, config.intermediate_size),
            "up_proj": (config.hidden_size, config.intermediate_size),
            "down_proj": (config.intermediate_size, config.hidden_size),
        }
        for name in MOE_PROJECTIONS:  # in the order of the forward, which is the order routings are recorded in
            in_features, out_features = shapes[name]
            if config.is_routed(layer_idx, name):
                setattr(self, name, RoutedLinear(config, in_features, out_features))
            else:
                setattr(self, name, nn.Linear(in_features, out_features, bias=config.mlp_bias))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor, routing_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`routing_mask` [batch, seq]: 1 for tokens to route, 0 for padding."""
        valid = token_mask(routing_mask, x.reshape(-1, x.shape[-1]))  # once for every routed projection

        def project(name: str, inputs: torch.Tensor) -> torch.Tensor:
            projection = getattr(self, name)
            return projection(inputs, valid)[0] if isinstance(projection, RoutedLinear) else projection(inputs)

        return project("down_proj", self.act_fn(project("gate_proj", x)) * project("up_proj", x))


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
    """LLaMA's base output plus the routing: the router losses (means over routed linears), every routed
    linear's `RouterOutput` in the order of the forward, and, if asked, its router logits [T, E]."""

    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    routing: tuple[RouterOutput, ...] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None


@dataclass
class ParameterNetCausalLMOutputWithPast(CausalLMOutputWithPast):
    """LLaMA's causal-LM output plus the language-model loss alone and the routing of the base output."""

    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    routing: tuple[RouterOutput, ...] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None


@dataclass
class ParameterNetSequenceClassifierOutputWithPast(SequenceClassifierOutputWithPast):
    """LLaMA's classifier output plus the routing of the base output."""

    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    routing: tuple[RouterOutput, ...] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None


class ParameterNetLlamaPreTrainedModel(LlamaPreTrainedModel):
    config_class = ParameterNetLlamaConfig
    config: ParameterNetLlamaConfig
    _no_split_modules = ["ParameterNetLlamaDecoderLayer"]
    _can_record_outputs = {
        "routing": ParameterNetRouter,
        "hidden_states": ParameterNetLlamaDecoderLayer,
        "attentions": LlamaAttention,
    }

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, (RoutedLinear, ParameterNetRouter)):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)

    def routed_linears(self) -> dict[str, RoutedLinear]:
        """Every routed linear by its module name, in the order of the forward."""
        return {name: module for name, module in self.named_modules() if isinstance(module, RoutedLinear)}

    def routing_stats(self, outputs) -> dict[str, dict[str, torch.Tensor]]:
        """Per routed linear, from the `routing` of a forward's `outputs`: `load` [E] (share of valid tokens per
        expert, 1/E each when balanced) and `dropped` (share of valid tokens dropped by capacity)."""
        _, _, loads, dropped = routing_summary(list(outputs.routing))
        return {name: {"load": loads[i], "dropped": dropped[i]} for i, name in enumerate(self.routed_linears())}

    def with_router_losses(self, loss: torch.Tensor | None, outputs) -> torch.Tensor | None:
        """`loss` plus the router losses of `outputs`, weighted by the config's coefficients."""
        if loss is None:
            return None
        return (
            loss + self.config.router_aux_loss_coef * outputs.aux_loss + self.config.router_z_loss_coef * outputs.z_loss
        )

    def _set_gradient_checkpointing(self, enable=True, gradient_checkpointing_func=checkpoint, **kwargs):
        """Checkpoint non-reentrantly: a reentrant checkpoint runs the forward without gradients, which would cut
        the router losses (recorded during the forward) off from the router weights."""
        keywords = getattr(gradient_checkpointing_func, "keywords", None) or {}
        if enable and keywords.get("use_reentrant") is not False:
            if keywords.get("use_reentrant"):
                logger.warning_once(
                    "ParameterNet-LLaMA ignores use_reentrant=True: its router losses need non-reentrant checkpointing."
                )
            function = getattr(gradient_checkpointing_func, "func", gradient_checkpointing_func)
            gradient_checkpointing_func = partial(function, **{**keywords, "use_reentrant": False})
        super()._set_gradient_checkpointing(enable, gradient_checkpointing_func, **kwargs)

    @classmethod
    def from_pretrained(cls, *args, output_loading_info=False, **kwargs):
        """`PreTrainedModel.from_pretrained` that refuses checkpoints lacking expert or router tensors, or holding
        them in other shapes (which `ignore_mismatched_sizes=True` would initialise at random)."""
        model, loading_info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        routed_names = model.routed_linears()
        mismatched = {
            key: f"{key} {tuple(saved)} in the checkpoint" for key, saved, _ in loading_info["mismatched_keys"]
        }
        not_loaded = sorted(
            mismatched.get(key, key)
            for key in set(loading_info["missing_keys"]) | set(mismatched)
            if key.rsplit(".", 1)[0] in routed_names or key.rsplit(".", 2)[0] in routed_names
        )
        if not_loaded:
            source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            shown = ", ".join(not_loaded[:6]) + (f" and {len(not_loaded) - 6} more" if len(not_loaded) > 6 else "")
            raise ValueError(
                f"Checkpoint {source} lacks {len(not_loaded)} expert/router tensor(s) of {cls.__name__} in the "
                f"config's shapes: {shown}. Refusing to initialise them at random; check num_experts, "
                "moe_projections and moe_layers against the checkpoint."
            )
        return (model, loading_info) if output_loading_info else model


class ParameterNetLlamaModel(ParameterNetLlamaPreTrainedModel, LlamaModel):
    """LLaMA decoder stack with routed FFN projections; returns the routing as well."""

    # A causal-LM checkpoint loaded as the base model brings its head along: expected, not worth a report.
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]

    def __init__(self, config: ParameterNetLlamaConfig):
        LlamaPreTrainedModel.__init__(self, config)
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
        if maybe_install_capturing_hooks is not None:  # every forward records the routing
            maybe_install_capturing_hooks(self)

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
        # `output_routing` asks transformers' output capture to record every router's decision (`routing`).
        outputs = super().forward(
            input_ids,
            attention_mask,
            position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            routing_mask=routing_mask,
            output_routing=True,
            **kwargs,
        )
        routing = tuple(outputs["routing"])
        aux_loss, z_loss, _, _ = routing_summary(list(routing))
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        router_logits = tuple(decision.logits for decision in routing) if output_router_logits else None
        return ParameterNetModelOutputWithPast(
            **outputs, aux_loss=aux_loss.mean(), z_loss=z_loss.mean(), router_logits=router_logits
        )


def routing_fields(outputs: ParameterNetModelOutputWithPast) -> dict:
    """The base output's fields that a head's output carries on (all but the last hidden state)."""
    return {key: value for key, value in outputs.items() if key != "last_hidden_state"}


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
            input_ids, attention_mask, position_ids, inputs_embeds, use_cache, output_router_logits, **kwargs
        )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(outputs.last_hidden_state[:, keep, :])
        lm_loss = None
        if labels is not None:
            lm_loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return ParameterNetCausalLMOutputWithPast(
            loss=self.with_router_losses(lm_loss, outputs), lm_loss=lm_loss, logits=logits, **routing_fields(outputs)
        )


class ParameterNetLlamaForSequenceClassification(ParameterNetLlamaPreTrainedModel):
    """Classifier on the last real token (as LlamaForSequenceClassification); with labels, the loss adds the
    weighted router losses as the causal LM's does."""

    def __init__(self, config: ParameterNetLlamaConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = ParameterNetLlamaModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
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
        **kwargs,
    ) -> ParameterNetSequenceClassifierOutputWithPast:
        outputs = self.model(input_ids, attention_mask, position_ids, inputs_embeds, use_cache, **kwargs)
        logits = self.score(outputs.last_hidden_state)
        batch = logits.shape[0]
        pad_token_id = self.config.pad_token_id
        if pad_token_id is None and batch != 1:
            raise ValueError("Cannot classify a batch of several sequences without config.pad_token_id.")
        last = -1
        if pad_token_id is not None and input_ids is not None:  # the rightmost token that is not padding
            real = (input_ids != pad_token_id).to(logits.device, torch.int32)
            last = (torch.arange(input_ids.shape[-1], device=logits.device, dtype=torch.int32) * real).argmax(-1)
        elif pad_token_id is not None:
            logger.warning_once("Padding cannot be detected in inputs_embeds: the last position is classified.")
        pooled_logits = logits[torch.arange(batch, device=logits.device), last]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=pooled_logits, config=self.config)
        return ParameterNetSequenceClassifierOutputWithPast(
            loss=self.with_router_losses(loss, outputs), logits=pooled_logits, **routing_fields(outputs)
        )


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
