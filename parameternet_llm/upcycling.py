"""Upcycling: a dense LLaMA checkpoint becomes a ParameterNet whose experts start as copies of the dense
projections (sparse upcycling, Komatsuzaki et al. 2022).

Every tensor but the routed projections is copied unchanged; a routed projection's E experts are copies of
its dense matrix (optionally perturbed, or partly re-initialised as in Drop-Upcycling, arXiv 2502.19261) and
its router gets the from-scratch init. With `expert_scale="straight_through"` (the default here) a routed
projection multiplies its chosen copy's output by exactly 1, so the upcycled model computes the dense model's
function at step 0 while its routers receive Switch's gradient; see docs/UPCYCLING.md.

Tensors are streamed shard by shard: memory stays near one output shard plus one expert bank.
"""

import json
import os
import re
import shutil
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import LlamaConfig
from transformers.dynamic_module_utils import custom_object_save

from .configuration_parameternet_llama import MOE_PROJECTIONS, ParameterNetLlamaConfig
from .errors import InputError
from .modeling_parameternet_llama import ParameterNetLlamaForCausalLM
from .presets import ROUTING_FIELDS
from .saved_models import read_config_dict

SAFETENSORS_INDEX = "model.safetensors.index.json"
SINGLE_SAFETENSORS = "model.safetensors"
# Files of the dense directory that are not carried over: its weights and config, which upcycling rewrites.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".gguf", ".ckpt", ".h5", ".msgpack")
NOT_COPIED = {"config.json", SAFETENSORS_INDEX, "pytorch_model.bin.index.json"}
ROUTED_TENSOR = re.compile(r"model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.(weight|bias)")
# Routing defaults of an upcycled model. Straight-through: the copies reproduce the dense projection exactly.
# Dropless: the copies are identical at step 0, so routing can change the function only by dropping tokens,
# and a router that has not learnt yet loads experts unevenly (the demo's dense model: 9% of tokens dropped
# at capacity factor 1.25). Grouped dispatch has no fixed-size expert buffers, so dropless costs no FLOPs.
UPCYCLING_DEFAULTS = {"expert_scale": "straight_through", "capacity_factor": None}
# The dimension of each projection's weight that runs over the SwiGLU channels (Drop-Upcycling re-draws channels).
CHANNEL_DIM = {"gate_proj": 0, "up_proj": 0, "down_proj": 1}


class UpcycleError(InputError):
    """A dense checkpoint or an upcycling choice that cannot be used; the message names the culprit."""


@dataclass(frozen=True)
class UpcycleOptions:
    """How the experts and routers of an upcycled projection start.

    expert_noise: each expert adds Gaussian noise of this many times the dense matrix's standard deviation.
    drop_fraction: each expert re-draws this share of its SwiGLU channels (rows of gate/up, columns of down)
        from a normal distribution with the dense matrix's mean and standard deviation (Drop-Upcycling).
    router_std: standard deviation of the routers' normal init (None: the config's initializer_range).
    seed: every random draw of one projection comes from a generator seeded by this and its name.
    """

    expert_noise: float = 0.0
    drop_fraction: float = 0.0
    router_std: float | None = None
    seed: int = 0

    def __post_init__(self):
        if not self.expert_noise >= 0:
            raise UpcycleError(f"expert_noise={self.expert_noise!r} must be >= 0")
        if not 0 <= self.drop_fraction < 1:
            raise UpcycleError(f"drop_fraction={self.drop_fraction!r} must be in [0, 1)")
        if self.router_std is not None and not self.router_std > 0:
            raise UpcycleError(f"router_std={self.router_std!r} must be > 0")

    @property
    def preserves_function(self) -> bool:
        return self.expert_noise == 0 and self.drop_fraction == 0


def read_checkpoint_config(checkpoint_dir: str | Path) -> LlamaConfig:
    """The config of a dense LLaMA or a ParameterNet checkpoint directory; anything else is refused by name."""
    raw = read_config_dict(checkpoint_dir)
    model_type = raw.get("model_type")
    if model_type == ParameterNetLlamaConfig.model_type:
        return ParameterNetLlamaConfig.from_pretrained(checkpoint_dir)
    if model_type != "llama":
        architectures = ", ".join(raw.get("architectures") or []) or "none given"
        raise UpcycleError(
            f"{checkpoint_dir} is not a LLaMA checkpoint: model_type {model_type!r} (architectures: "
            f"{architectures}); upcycling reads LlamaForCausalLM checkpoints"
        )
    return LlamaConfig.from_pretrained(checkpoint_dir)


def read_dense_config(dense_dir: str | Path) -> LlamaConfig:
    """The LlamaConfig of a dense `LlamaForCausalLM` checkpoint directory; anything else is refused by name."""
    config = read_checkpoint_config(dense_dir)
    if isinstance(config, ParameterNetLlamaConfig):
        raise UpcycleError(f"{dense_dir} is already a ParameterNet checkpoint (model_type {config.model_type!r})")
    return config


def upcycled_config(dense_config: LlamaConfig, **routing) -> ParameterNetLlamaConfig:
    """The dense config plus the routing fields `routing` (num_experts, moe_projections, ...); where these are
    silent, UPCYCLING_DEFAULTS, then ParameterNetLlamaConfig's defaults."""
    unknown = sorted(set(routing) - ROUTING_FIELDS)
    if unknown:
        raise UpcycleError(f"unknown routing field(s) {unknown}: choose from {sorted(ROUTING_FIELDS)}")
    projections = routing.get("moe_projections", [])
    projections = [projections] if isinstance(projections, str) else list(projections)
    unknown = [name for name in projections if name not in MOE_PROJECTIONS]
    if unknown:
        raise UpcycleError(f"unknown projection(s) {unknown}: choose from {list(MOE_PROJECTIONS)}")
    fields = dense_config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path"):
        fields.pop(key, None)
    try:
        config = ParameterNetLlamaConfig(**fields, **{**UPCYCLING_DEFAULTS, **routing})
        config.validate_routing()
    except (ValueError, TypeError, StrictDataclassError) as error:
        raise UpcycleError(f"routing choice: {error}") from error
    if config.num_experts < 2:
        raise UpcycleError(f"num_experts={config.num_experts}: upcycling needs at least 2 experts per projection")
    config.architectures = [ParameterNetLlamaForCausalLM.__name__]
    return config


def dense_tensor_files(dense_dir: str | Path) -> dict[str, Path]:
    """Which safetensors file holds each tensor; every file is opened once, so a missing, truncated or
    corrupt shard is found before anything is written."""
    dense_dir = Path(dense_dir)
    index = dense_dir / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise UpcycleError(f"{index} is not a safetensors index (no readable weight_map): {error}") from error
        files = {name: dense_dir / file for name, file in weight_map.items()}
    elif (dense_dir / SINGLE_SAFETENSORS).is_file():
        files = None
    else:
        found = sorted(p.name for p in dense_dir.iterdir() if p.suffix in WEIGHT_SUFFIXES)
        hint = f" (found {', '.join(found)}: re-save it with save_pretrained, which writes safetensors)"
        raise UpcycleError(f"{dense_dir} has no {SINGLE_SAFETENSORS} or {SAFETENSORS_INDEX}" + (hint if found else ""))
    shards = sorted(set(files.values())) if files is not None else [dense_dir / SINGLE_SAFETENSORS]
    listed: dict[str, Path] = {}
    for shard in shards:
        if not shard.is_file():
            raise UpcycleError(f"shard {shard.name} named by {index} is missing from {dense_dir}")
        try:
            with safe_open(shard, framework="pt") as opened:
                listed.update(dict.fromkeys(opened.keys(), shard))
        except (SafetensorError, OSError) as error:
            raise UpcycleError(f"{shard} is not a readable safetensors file: {error}") from error
    if files is not None:
        for name, shard in files.items():
            if listed.get(name) != shard:
                raise UpcycleError(f"{index} puts {name} in {shard.name}, which does not hold it")
    return listed


def expected_shapes(config: ParameterNetLlamaConfig) -> dict[str, torch.Size]:
    """Name and shape of every tensor the ParameterNet checkpoint holds (the tied lm_head left out)."""
    with torch.device("meta"):
        model = ParameterNetLlamaForCausalLM(config)
    shapes = {name: tensor.shape for name, tensor in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def generator_for(name: str, seed: int) -> torch.Generator:
    """A generator for the draws of tensor `name`: the same whatever the shard layout or process."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))  # the CPU generator keeps 32 bits


def expert_bank(weight: torch.Tensor, num_experts: int, projection: str, options: UpcycleOptions, name: str):
    """[E, out, in]: E copies of the dense `weight` [out, in], perturbed or partly re-drawn as `options` say."""
    if options.preserves_function:
        return weight.unsqueeze(0).expand(num_experts, *weight.shape).clone()
    generator = generator_for(name, options.seed)
    dense = weight.float()
    mean, std = dense.mean(), dense.std()
    bank = dense.unsqueeze(0).repeat(num_experts, 1, 1)
    if options.expert_noise:
        bank += options.expert_noise * std * torch.randn(bank.shape, generator=generator)
    if options.drop_fraction:
        dim = CHANNEL_DIM[projection]
        channels = weight.shape[dim]
        redrawn = round(options.drop_fraction * channels)
        for expert in bank:
            chosen = torch.randperm(channels, generator=generator)[:redrawn]
            shape = list(weight.shape)
            shape[dim] = redrawn
            expert.index_copy_(dim, chosen, mean + std * torch.randn(shape, generator=generator))
    return bank.to(weight.dtype)


def router_init(name: str, shape: torch.Size, std: float, seed: int, dtype: torch.dtype) -> torch.Tensor:
    return (std * torch.randn(shape, generator=generator_for(name, seed))).to(dtype)


def upcycled_tensors(
    dense_dir: str | Path, config: ParameterNetLlamaConfig, options: UpcycleOptions = UpcycleOptions()
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the upcycled checkpoint, one at a time, read from the dense safetensors in their order.

    Raises UpcycleError before yielding anything if the dense tensors do not match the config."""
    files = dense_tensor_files(dense_dir)
    shapes = expected_shapes(config)
    routed = {}  # dense tensor name -> (its projection, "weight" or "bias")
    for name in files:
        match = ROUTED_TENSOR.fullmatch(name)
        if match and config.is_routed(int(match[1]), match[2]):
            routed[name] = (match[2], match[3])
    routers = {name: router_name(name) for name, (_, kind) in routed.items() if kind == "weight"}
    missing = sorted(set(shapes) - set(files) - set(routers.values()))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UpcycleError(f"{dense_dir} lacks tensor(s) of this LLaMA config: {shown}")
    router_std = config.initializer_range if options.router_std is None else options.router_std
    by_shard: dict[Path, list[str]] = {}
    for name, shard in files.items():
        by_shard.setdefault(shard, []).append(name)
    for shard, names in by_shard.items():
        with safe_open(shard, framework="pt") as opened:
            for name in names:
                if name not in shapes:
                    continue  # buffers some exporters save (rotary inv_freq), or the tied lm_head
                try:
                    tensor = opened.get_tensor(name)
                except (SafetensorError, OSError) as error:
                    raise UpcycleError(f"cannot read {name} from {shard}: {error}") from error
                if name in routers:
                    tensor = expert_bank(tensor, config.num_experts, routed[name][0], options, name)
                elif name in routed:  # a bias: one copy per expert
                    tensor = tensor.unsqueeze(0).expand(config.num_experts, *tensor.shape).clone()
                if tensor.shape != shapes[name]:
                    raise UpcycleError(
                        f"{name} in {shard.name} has shape {list(tensor.shape)}, the config expects "
                        f"{list(shapes[name])}"
                    )
                yield name, tensor
                if name in routers:
                    router = routers[name]
                    yield router, router_init(router, shapes[router], router_std, options.seed, tensor.dtype)


def router_name(weight_name: str) -> str:
    """model.layers.3.mlp.up_proj.weight -> model.layers.3.mlp.up_proj.router.weight"""
    return weight_name.removesuffix(".weight") + ".router.weight"


class ShardWriter:
    """Writes tensors into safetensors shards of at most `max_bytes` (a larger tensor gets a shard of its own)
    with transformers' names and index; only the shard being filled is held in memory."""

    def __init__(self, directory: Path, max_bytes: int):
        self.directory = directory
        self.max_bytes = max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        save_file(self.pending, self.directory / f".shard-{len(self.shards)}", metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending or not self.shards:
            self.flush()
        count = len(self.shards)
        if count == 1:
            os.replace(self.directory / ".shard-0", self.directory / SINGLE_SAFETENSORS)
            return
        weight_map = {}
        for number, names in enumerate(self.shards):
            file = f"model-{number + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.directory / f".shard-{number}", self.directory / file)
            weight_map.update(dict.fromkeys(names, file))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def parse_size(size: int | str) -> int:
    """'5GB' -> 5e9 bytes, '500MiB' -> 500 * 2**20, an int stays as it is."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B\s*", size.upper().replace("IB", "iB"))
    if not match:
        raise UpcycleError(f"max_shard_size={size!r} is not a size like 5GB or 500MiB")
    number, prefix, binary = match.groups()
    return int(float(number) * (1024 if binary else 1000) ** "_KMGT".index(prefix or "_"))


def upcycle(
    dense_dir: str | Path,
    output_dir: str | Path,
    options: UpcycleOptions = UpcycleOptions(),
    max_shard_size: int | str = "2GB",
    **routing,
) -> ParameterNetLlamaConfig:
    """Write the ParameterNet upcycled from the dense checkpoint `dense_dir` to `output_dir` (config with
    auto_map, the two model files, safetensors, the dense directory's tokenizer and other small files).

    The checkpoint is built under a hidden sibling name and renamed into place when complete, so a failure
    leaves `output_dir` untouched. `routing` holds the config's routing fields (num_experts, moe_projections,
    moe_layers, capacity_factor, ...; see `upcycled_config`)."""
    dense_dir, output_dir = Path(dense_dir), Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise UpcycleError(f"output directory {output_dir} exists and is not empty")
    config = upcycled_config(read_dense_config(dense_dir), **routing)
    tensors = upcycled_tensors(dense_dir, config, options)
    staging = output_dir.parent / f".{output_dir.name}.upcycling-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        writer = ShardWriter(staging, parse_size(max_shard_size))
        for name, tensor in tensors:
            writer.add(name, tensor)
        writer.close()
        for path in dense_dir.iterdir():  # tokenizer, generation config, chat template, licence, ...
            if path.is_file() and path.name not in NOT_COPIED and path.suffix not in WEIGHT_SUFFIXES + (".py",):
                shutil.copy2(path, staging / path.name)
        custom_object_save(ParameterNetLlamaForCausalLM, staging)  # the model file and the config file it imports
        config.save_pretrained(staging)
        if output_dir.exists():
            output_dir.rmdir()
        os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return config


def upcycled_model(
    dense_dir: str | Path, config: ParameterNetLlamaConfig, options: UpcycleOptions = UpcycleOptions()
) -> ParameterNetLlamaForCausalLM:
    """The upcycled model in memory (float32), for training straight from a dense checkpoint."""
    model = ParameterNetLlamaForCausalLM(config)
    state = model.state_dict()
    with torch.no_grad():
        for name, tensor in upcycled_tensors(dense_dir, config, options):
            state[name].copy_(tensor)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def expert_divergence(model) -> dict[str, float]:
    """Per routed linear of `model`: the mean cosine distance between its experts' weight matrices over all pairs
    (0 while they are copies of one matrix)."""
    divergence = {}
    for name, linear in model.routed_linears().items():
        experts = torch.nn.functional.normalize(linear.weight.detach().double().flatten(1), dim=1)
        similarity = experts @ experts.T
        pairs = torch.triu_indices(len(experts), len(experts), offset=1)
        divergence[name] = (1 - similarity[pairs[0], pairs[1]]).clamp(min=0).mean().item()
    return divergence
