"""Configuration of ParameterNet-LLaMA: LLaMA whose FFN projections are top-1 routed expert banks.

Self-contained (imports only transformers) because it is copied into every saved checkpoint.
"""

from transformers import LlamaConfig

MOE_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
MOE_BACKENDS = ("auto", "grouped_mm", "loop")

AUTO_MAP = {
    "AutoConfig": "configuration_parameternet_llama.ParameterNetLlamaConfig",
    "AutoModel": "modeling_parameternet_llama.ParameterNetLlamaModel",
    "AutoModelForCausalLM": "modeling_parameternet_llama.ParameterNetLlamaForCausalLM",
    "AutoModelForSequenceClassification": "modeling_parameternet_llama.ParameterNetLlamaForSequenceClassification",
}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


class ParameterNetLlamaConfig(LlamaConfig):
    r"""LLaMA configuration plus the routing fields of ParameterNet (arXiv 2306.14525).

    Args:
        num_experts (`int`, defaults to 4): expert weight matrices per routed projection.
        moe_projections (`list[str]`, defaults to `["up_proj"]`): which of `gate_proj`, `up_proj`,
            `down_proj` are routed.
        moe_layers (`list[int]`, *optional*): decoder layers whose projections are routed; `None` = all.
        capacity_factor (`float`, *optional*, defaults to 1.25): expert capacity factor in training;
            `None` = dropless.
        eval_capacity_factor (`float`, *optional*): the same in eval mode; `None` (default) = dropless.
        min_capacity (`int`, defaults to 4): lower bound of each expert's capacity.
        router_aux_loss_coef (`float`, defaults to 0.01): weight of the Switch load-balancing loss.
        router_z_loss_coef (`float`, defaults to 0.0): weight of the router z-loss.
        router_jitter_noise (`float`, defaults to 0.0): multiplicative U(1-eps, 1+eps) noise on the
            router input in training.
        moe_backend (`str`, defaults to `"auto"`): expert dispatch, `"grouped_mm"`, `"loop"` or `"auto"`.
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

    def __init__(
        self,
        num_experts=4,
        moe_projections=("up_proj",),
        moe_layers=None,
        capacity_factor=1.25,
        eval_capacity_factor=None,
        min_capacity=4,
        router_aux_loss_coef=0.01,
        router_z_loss_coef=0.0,
        router_jitter_noise=0.0,
        moe_backend="auto",
        output_router_logits=False,
        **kwargs,
    ):
        self.num_experts = num_experts
        self.moe_projections = [moe_projections] if isinstance(moe_projections, str) else list(moe_projections)
        self.moe_layers = None if moe_layers is None else list(moe_layers)
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.min_capacity = min_capacity
        self.router_aux_loss_coef = router_aux_loss_coef
        self.router_z_loss_coef = router_z_loss_coef
        self.router_jitter_noise = router_jitter_noise
        self.moe_backend = moe_backend
        self.output_router_logits = output_router_logits
        kwargs["auto_map"] = {**AUTO_MAP, **(kwargs.get("auto_map") or {})}
        super().__init__(**kwargs)
        self.validate_routing()

    def validate_routing(self):
        """Raise ValueError naming the first routing field whose value is not allowed."""

        def fail(field, allowed):
            raise ValueError(f"ParameterNetLlamaConfig.{field}={getattr(self, field)!r} is invalid: {allowed}.")

        if not _is_int(self.num_experts) or self.num_experts < 1:
            fail("num_experts", "expected an int >= 1")
        projections = self.moe_projections
        if (
            not projections
            or any(name not in MOE_PROJECTIONS for name in projections)
            or len(set(projections)) != len(projections)
        ):
            fail("moe_projections", f"expected a non-empty list of distinct names from {list(MOE_PROJECTIONS)}")
        if self.moe_layers is not None:
            layers = self.moe_layers
            if (
                not layers
                or any(not _is_int(i) or not 0 <= i < self.num_hidden_layers for i in layers)
                or len(set(layers)) != len(layers)
            ):
                fail(
                    "moe_layers",
                    f"expected None (every layer) or a non-empty list of distinct layer indices in "
                    f"[0, {self.num_hidden_layers})",
                )
        for field in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, field)
            if value is not None and not _is_positive_number(value):
                fail(field, "expected None (dropless) or a number > 0")
        if not _is_int(self.min_capacity) or self.min_capacity < 0:
            fail("min_capacity", "expected an int >= 0")
        for field in ("router_aux_loss_coef", "router_z_loss_coef"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                fail(field, "expected a number >= 0")
        jitter = self.router_jitter_noise
        if not isinstance(jitter, (int, float)) or isinstance(jitter, bool) or not 0 <= jitter < 1:
            fail("router_jitter_noise", "expected a number in [0, 1)")
        if self.moe_backend not in MOE_BACKENDS:
            fail("moe_backend", f"expected one of {list(MOE_BACKENDS)}")

    def is_routed(self, layer_idx: int, projection: str) -> bool:
        """Whether `projection` of decoder layer `layer_idx` is a routed expert bank."""
        in_layer = self.moe_layers is None or layer_idx in self.moe_layers
        return in_layer and projection in self.moe_projections


ParameterNetLlamaConfig.register_for_auto_class()

__all__ = ["ParameterNetLlamaConfig"]
