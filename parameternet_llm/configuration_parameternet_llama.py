"""Configuration of ParameterNet-LLaMA: LLaMA whose FFN projections are top-1 routed expert banks.

Copied into every saved checkpoint, so it imports transformers and huggingface_hub only.
"""

from dataclasses import field
from typing import Literal, get_args

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

MoeProjection = Literal["gate_proj", "up_proj", "down_proj"]
# How a routed linear runs its experts: "grouped_mm" sorts the tokens by expert for one grouped product, "loop"
# multiplies expert by expert, "auto" takes grouped_mm wherever the operands allow it.
MoeBackend = Literal["auto", "grouped_mm", "loop"]
# What multiplies the chosen expert's output: "probability" is p, Switch's and the paper's choice; "straight_through"
# is 1 in the forward with p's gradient, so expert copies of a dense projection reproduce it exactly (upcycling).
ExpertScale = Literal["probability", "straight_through"]
MOE_PROJECTIONS = get_args(MoeProjection)
MOE_BACKENDS = get_args(MoeBackend)
EXPERT_SCALES = get_args(ExpertScale)

AUTO_MAP = {
    "AutoConfig": "configuration_parameternet_llama.ParameterNetLlamaConfig",
    "AutoModel": "modeling_parameternet_llama.ParameterNetLlamaModel",
    "AutoModelForCausalLM": "modeling_parameternet_llama.ParameterNetLlamaForCausalLM",
    "AutoModelForSequenceClassification": "modeling_parameternet_llama.ParameterNetLlamaForSequenceClassification",
}


@strict
class ParameterNetLlamaConfig(LlamaConfig):
    r"""LLaMA configuration plus the routing fields of ParameterNet (arXiv 2306.14525).

    Args:
        num_experts (`int`, defaults to 4): expert weight matrices per routed projection.
        moe_projections (`list[str]`, defaults to `["up_proj"]`): which of `gate_proj`, `up_proj`,
            `down_proj` are routed (a single name is accepted too).
        moe_layers (`list[int]`, *optional*): decoder layers whose projections are routed; `None` = all.
        capacity_factor (`float`, *optional*, defaults to 1.25): expert capacity factor in training;
            `None` = dropless.
        eval_capacity_factor (`float`, *optional*): the same in eval mode; `None` (default) = dropless.
        min_capacity (`int`, defaults to 4): lower bound of each expert's capacity.
        router_aux_loss_coef (`float`, defaults to 0.01): weight of the Switch load-balancing loss.
        router_z_loss_coef (`float`, defaults to 0.0): weight of the router z-loss.
        router_jitter_noise (`float`, defaults to 0.0): multiplicative U(1-eps, 1+eps) noise on the
            router input in training.
        expert_scale (`str`, defaults to `"probability"`): the factor on the chosen expert's output: its
            router probability p, or `"straight_through"`: 1 in the forward, p's gradient in the backward.
        moe_backend (`str`, defaults to `"auto"`): expert dispatch, one of `MOE_BACKENDS`.
        output_router_logits (`bool`, defaults to False): return each routed linear's router logits.
    """

    model_type = "parameternet_llama"
    # Routed projections hold [E, out, in] banks, so only attention is tensor-parallel.
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
    }

    num_experts: int = 4
    moe_projections: list[MoeProjection] | str = field(default_factory=lambda: ["up_proj"])
    moe_layers: list[int] | None = None
    capacity_factor: float | int | None = 1.25
    eval_capacity_factor: float | int | None = None
    min_capacity: int = 4
    router_aux_loss_coef: float | int = 0.01
    router_z_loss_coef: float | int = 0.0
    router_jitter_noise: float | int = 0.0
    expert_scale: ExpertScale = "probability"
    moe_backend: MoeBackend = "auto"
    output_router_logits: bool = False

    def __post_init__(self, **kwargs):
        if isinstance(self.moe_projections, str):
            self.moe_projections = [self.moe_projections]
        kwargs["auto_map"] = {**AUTO_MAP, **(kwargs.get("auto_map") or {})}
        super().__post_init__(**kwargs)

    def validate_routing(self):
        """Ranges and relations that the field types do not express; the error names the field."""
        layers = self.moe_layers
        rules = [
            ("num_experts", self.num_experts >= 1, "an int >= 1"),
            (
                "moe_projections",
                len(set(self.moe_projections)) == len(self.moe_projections) > 0,
                f"a non-empty list of distinct names from {list(MOE_PROJECTIONS)}",
            ),
            (
                "moe_layers",
                layers is None
                or len(set(layers)) == len(layers) > 0
                and all(0 <= i < self.num_hidden_layers for i in layers),
                f"None (every layer) or a non-empty list of distinct layer indices in [0, {self.num_hidden_layers})",
            ),
            ("capacity_factor", self.capacity_factor is None or self.capacity_factor > 0, "None (dropless) or > 0"),
            (
                "eval_capacity_factor",
                self.eval_capacity_factor is None or self.eval_capacity_factor > 0,
                "None (dropless) or > 0",
            ),
            ("min_capacity", self.min_capacity >= 0, "an int >= 0"),
            ("router_aux_loss_coef", self.router_aux_loss_coef >= 0, "a number >= 0"),
            ("router_z_loss_coef", self.router_z_loss_coef >= 0, "a number >= 0"),
            ("router_jitter_noise", 0 <= self.router_jitter_noise < 1, "a number in [0, 1)"),
        ]
        for name, holds, expected in rules:
            if not holds:
                raise ValueError(
                    f"ParameterNetLlamaConfig.{name}={getattr(self, name)!r} is invalid: expected {expected}."
                )

    def is_routed(self, layer_idx: int, projection: str) -> bool:
        """Whether `projection` of decoder layer `layer_idx` is a routed expert bank."""
        in_layer = self.moe_layers is None or layer_idx in self.moe_layers
        return in_layer and projection in self.moe_projections


ParameterNetLlamaConfig.register_for_auto_class()

__all__ = ["ParameterNetLlamaConfig"]
