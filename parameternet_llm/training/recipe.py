"""Training recipes: YAML files with the sections model, data, tokenizer, train, eval and output_dir.

A recipe may name another as `base: FILE` (relative to itself) and give only what differs.

Every key has a default below; an unknown key, a value of the wrong type or a malformed override is
an error that names the key before anything runs.
"""

import copy
import difflib
import logging
import math
from dataclasses import fields as fields_of
from pathlib import Path
from typing import Any

import yaml
from accelerate.utils import LoggerType
from huggingface_hub.errors import StrictDataclassError
from transformers import LlamaConfig

from ..configuration_parameternet_llama import ParameterNetLlamaConfig
from ..errors import InputError
from ..presets import ROUTING_FIELDS, is_parameternet
from ..upcycling import UpcycleOptions, read_checkpoint_config, upcycled_config

logger = logging.getLogger(__name__)
# Routing fields that fix the shapes of the expert banks.
STRUCTURE_FIELDS = ("num_experts", "moe_projections", "moe_layers")

# Values that may be null are marked by None defaults; their type is not checked.
DEFAULTS: dict[str, Any] = {
    "output_dir": "runs/run",
    # Config fields of ParameterNetLlamaConfig (or LlamaConfig when dense). vocab_size defaults to the
    # tokenizer's size; bos/eos ids come from the tokenizer. `init_from: DIR` starts from a checkpoint: a
    # dense LLaMA (continued with dense: true, else upcycled with the routing fields and the options in
    # `upcycling`) or a ParameterNet; the shape is then the checkpoint's.
    "model": {},
    "data": {
        "seq_len": 256,
        "seed": 0,
        # Documents held out from the start of every source for validation.
        "validation_documents": 200,
        # Training blocks passed over at the start (all processes together): data a run this one continues saw.
        "skip_blocks": 0,
        # Generate the embedded corpus here before training (null: none).
        "corpus": None,
        "sources": [],
    },
    "tokenizer": {
        # A directory with a transformers tokenizer, or a hub id (null: model.init_from's tokenizer).
        "path": None,
        # If set and `path` holds no tokenizer yet: train one there from the training documents.
        "train": None,
    },
    "train": {
        "seed": 0,
        "max_steps": 1000,
        "micro_batch_size": 8,
        "gradient_accumulation_steps": 1,
        "lr": 3.0e-4,
        "min_lr_ratio": 0.1,
        "warmup_steps": 100,
        "weight_decay": 0.1,
        "adam_beta1": 0.9,
        "adam_beta2": 0.95,
        "adam_eps": 1.0e-8,
        "grad_clip": 1.0,
        "mixed_precision": "auto",
        "gradient_checkpointing": False,
        "log_every": 10,
        # Switch load balancing on each micro-batch's statistics ("micro") or on the global batch's, all processes and
        # accumulation steps ("global"; one extra forward without gradients per micro-batch).
        "router_aux_loss_scope": "micro",
        # Warn when an expert gets under a tenth of its balanced share of tokens, or a routed linear drops over half
        # its tokens, for this many steps.
        "starved_expert_steps": 200,
        "save_every": 500,
        "keep_checkpoints": 2,
        # Steps after which the model is also written as an HF checkpoint to output_dir/export/step-N/.
        "export_steps": [],
        # The step this run starts at, on weights another run of the same schedule trained that far (model.init_from).
        "start_step": 0,
        "resume": None,
        "trackers": [],
        "progress_bar": True,
    },
    "eval": {
        "every": 500,
        "batches": 10,
    },
}

NULLABLE = {"train.resume", "data.corpus", "tokenizer.path", "tokenizer.train"}
SOURCE_KEYS = {"name", "weight", "files", "hub", "text_field"}
HUB_KEYS = {"path", "name", "split", "revision", "data_files"}
CORPUS_KEYS = {"path", "num_tokens", "seed", "world_scale"}
TOKENIZER_TRAIN_KEYS = {"vocab_size", "max_documents"}
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
TRACKERS = sorted(tracker.value for tracker in LoggerType)


class RecipeError(InputError):
    """A recipe or override that cannot be used; the message names the key or file."""


def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _merge(defaults: dict, given: dict, prefix: str = "") -> dict:
    merged = copy.deepcopy(defaults)
    for key, value in given.items():
        dotted = f"{prefix}{key}"
        if key not in defaults:
            raise RecipeError(f"unknown recipe key {dotted!r}{_suggest(key, defaults)}")
        default = defaults[key]
        if isinstance(default, dict) and default:
            if not isinstance(value, dict):
                raise RecipeError(f"recipe key {dotted!r} must be a mapping, got {value!r}")
            merged[key] = _merge(default, value, dotted + ".")
        else:
            merged[key] = _check_type(dotted, default, value)
    return merged


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_type(dotted: str, default, value):
    if default is None or value is None and dotted in NULLABLE:
        return value
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, expected) or isinstance(value, bool) and expected is not bool:
        hint = " (YAML reads unquoted no/yes/off/on as booleans: quote the word)" if expected is str else ""
        if expected is float and isinstance(value, str) and _is_number(value):
            hint = f" (YAML reads {value} as text: write it with a dot, like {float(value):.1e})"
        raise RecipeError(f"recipe key {dotted!r} must be {expected.__name__}, got {value!r}{hint}")
    return value


def parse_override(pair: str) -> tuple[list[str], Any]:
    """`train.max_steps=20` -> (["train", "max_steps"], 20); values are read as YAML."""
    key, sep, value = pair.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError(f"override {pair!r} is not of the form dotted.key=value")
    try:
        return key.split("."), yaml.safe_load(value)
    except yaml.YAMLError as error:
        raise RecipeError(f"override {pair!r}: value is not valid YAML ({error})") from error


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """A copy of `raw` with every `dotted.key=value` override set in it."""
    raw = copy.deepcopy(raw)
    for pair in overrides:
        keys, value = parse_override(pair)
        node = raw
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override {pair!r}: {key!r} is not a section")
        node[keys[-1]] = value
    return raw


def read_recipe_file(path: str | Path, seen: tuple[Path, ...] = ()) -> dict:
    """The raw mapping of a recipe file, with the file named by its `base` key merged underneath
    (mappings merge key by key, anything else is replaced)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {str(path)!r} does not exist")
    if path.resolve() in seen:
        raise RecipeError(f"recipe file {str(path)!r} is its own base")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as error:
        raise RecipeError(f"recipe file {str(path)!r} is not UTF-8 text ({error})") from error
    except yaml.YAMLError as error:
        raise RecipeError(f"recipe file {str(path)!r} is not valid YAML: {error}") from error
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe file {str(path)!r} must hold a mapping of sections")
    base = raw.pop("base", None)
    if base is None:
        return raw
    return _deep_merge(read_recipe_file(path.parent / base, seen + (path.resolve(),)), raw)


def _deep_merge(base: dict, child: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_recipe(path: str | Path, overrides: list[str] = ()) -> dict:
    """Read a recipe file (and its bases), apply `key=value` overrides, fill defaults and validate."""
    return validate_recipe(apply_overrides(read_recipe_file(path), list(overrides)))


def validate_recipe(raw: dict) -> dict:
    recipe = _merge(DEFAULTS, raw)
    if not isinstance(recipe["model"], dict):
        raise RecipeError("recipe key 'model' must be a mapping of config fields")
    for index, source in enumerate(recipe["data"]["sources"]):
        _check_source(index, source)
    names = [source["name"] for source in recipe["data"]["sources"]]
    if len(set(names)) != len(names):
        raise RecipeError(f"recipe key 'data.sources' names a source twice: {names}")
    if not recipe["data"]["sources"]:
        raise RecipeError("recipe key 'data.sources' lists no data source")
    corpus = recipe["data"]["corpus"]
    if corpus is not None:
        _check_keys("data.corpus", corpus, CORPUS_KEYS, required={"path"})
    if recipe["tokenizer"]["path"] is None and recipe["model"].get("init_from") is None:
        raise RecipeError("recipe key 'tokenizer.path' is not set: name a tokenizer directory or hub id")
    if recipe["tokenizer"]["train"] is not None:
        _check_keys("tokenizer.train", recipe["tokenizer"]["train"], TOKENIZER_TRAIN_KEYS)
    train = recipe["train"]
    for key in (
        "max_steps",
        "micro_batch_size",
        "gradient_accumulation_steps",
        "log_every",
        "starved_expert_steps",
        "save_every",
        "keep_checkpoints",
    ):
        if train[key] < 1:
            raise RecipeError(f"recipe key 'train.{key}' must be >= 1, got {train[key]}")
    ranges = [
        ("train.lr", train["lr"] > 0, "> 0"),
        ("train.grad_clip", train["grad_clip"] > 0, "> 0"),
        ("train.weight_decay", train["weight_decay"] >= 0, ">= 0"),
        ("train.warmup_steps", train["warmup_steps"] >= 0, ">= 0"),
        ("train.min_lr_ratio", 0 <= train["min_lr_ratio"] <= 1, "in [0, 1]"),
        ("train.adam_beta1", 0 <= train["adam_beta1"] < 1, "in [0, 1)"),
        ("train.adam_beta2", 0 <= train["adam_beta2"] < 1, "in [0, 1)"),
        ("train.adam_eps", train["adam_eps"] > 0, "> 0"),
        ("eval.every", recipe["eval"]["every"] >= 1, ">= 1"),
        ("eval.batches", recipe["eval"]["batches"] >= 0, ">= 0"),
        ("data.seq_len", recipe["data"]["seq_len"] >= 2, ">= 2"),
        ("data.skip_blocks", recipe["data"]["skip_blocks"] >= 0, ">= 0"),
        ("data.validation_documents", recipe["data"]["validation_documents"] >= 0, ">= 0"),
    ]
    for key, holds, expected in ranges:
        section, name = key.split(".")
        if not holds or not math.isfinite(recipe[section][name]):
            raise RecipeError(f"recipe key {key!r} must be {expected}, got {recipe[section][name]!r}")
    unknown = [name for name in train["trackers"] if name not in TRACKERS]
    if unknown:
        raise RecipeError(f"recipe key 'train.trackers' names unknown trackers {unknown}: choose from {TRACKERS}")
    if train["router_aux_loss_scope"] not in ("micro", "global"):
        raise RecipeError(
            f"recipe key 'train.router_aux_loss_scope' must be micro or global, got {train['router_aux_loss_scope']!r}"
        )
    if not 0 <= train["start_step"] < train["max_steps"]:
        raise RecipeError(f"recipe key 'train.start_step' must be in [0, max_steps), got {train['start_step']}")
    if not all(isinstance(step, int) and 0 < step <= train["max_steps"] for step in train["export_steps"]):
        raise RecipeError(
            f"recipe key 'train.export_steps' must list steps in [1, max_steps], got {train['export_steps']}"
        )
    if train["mixed_precision"] not in MIXED_PRECISION:
        raise RecipeError(
            f"recipe key 'train.mixed_precision' must be one of {list(MIXED_PRECISION)}, got "
            f"{train['mixed_precision']!r}"
        )
    model_config(recipe["model"], recipe["data"]["seq_len"])  # model keys and values, before any work
    return recipe


def _check_keys(where: str, mapping, known: set, required: set = frozenset()):
    if not isinstance(mapping, dict):
        raise RecipeError(f"recipe key {where!r} must be a mapping, got {mapping!r}")
    for key in mapping:
        if key not in known:
            raise RecipeError(f"unknown recipe key '{where}.{key}'{_suggest(key, known)}")
    for key in required - set(mapping):
        raise RecipeError(f"recipe key '{where}.{key}' is required")


def _check_source(index: int, source):
    where = f"data.sources[{index}]"
    _check_keys(where, source, SOURCE_KEYS, required={"name", "weight"})
    if ("files" in source) == ("hub" in source):
        raise RecipeError(f"{where} ({source['name']!r}) must give exactly one of 'files' or 'hub'")
    weight = source["weight"]
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        raise RecipeError(f"{where}.weight ({source['name']!r}) must be a number > 0, got {source['weight']!r}")
    if "hub" in source:
        _check_keys(f"{where}.hub", source["hub"], HUB_KEYS, required={"path"})


def model_config(model_section: dict, seq_len: int, defaults: dict | None = None) -> LlamaConfig:
    """The recipe's model section as a config (LlamaConfig when `dense: true`, else ParameterNet's),
    with `defaults` (vocab_size, special token ids) filled in where the section is silent. With
    `init_from: DIR` the shape comes from that checkpoint (see `init_from_config`)."""
    fields = dict(model_section)
    dense = fields.pop("dense", False)
    init_from = fields.pop("init_from", None)
    upcycling = fields.pop("upcycling", None)
    known = set(LlamaConfig().to_dict()) | (set() if dense else ROUTING_FIELDS)
    for key in fields:
        if key not in known:
            hint = " (routing fields need dense: false)" if key in ROUTING_FIELDS else _suggest(key, known)
            raise RecipeError(f"unknown recipe key 'model.{key}'{hint}")
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size"):
        if key in fields and (isinstance(fields[key], bool) or not isinstance(fields[key], int) or fields[key] < 1):
            raise RecipeError(f"recipe key 'model.{key}' must be an int >= 1, got {fields[key]!r}")
    if init_from is not None:
        config = init_from_config(str(init_from), dense, fields, upcycling)
    elif upcycling is not None:
        raise RecipeError("recipe key 'model.upcycling' needs model.init_from (a dense checkpoint directory)")
    else:
        for key, value in (defaults or {}).items():
            fields.setdefault(key, value)
        try:
            config = (LlamaConfig if dense else ParameterNetLlamaConfig)(**fields)
        except (ValueError, TypeError, StrictDataclassError) as error:
            raise RecipeError(f"model section: {error.__cause__ or error}") from error
    if seq_len > config.max_position_embeddings:
        raise RecipeError(
            f"data.seq_len={seq_len} exceeds model.max_position_embeddings={config.max_position_embeddings}"
        )
    return config


def init_from_config(init_from: str, dense: bool, fields: dict, upcycling: dict | None) -> LlamaConfig:
    """The config of training that starts from checkpoint `init_from`: a dense LLaMA continued as it is
    (`dense: true`) or upcycled with the section's routing fields, or a ParameterNet continued with its own
    expert banks (other routing fields, such as capacity_factor, may change). The checkpoint's shape (and a
    ParameterNet's banks) win over the section's keys, with a warning where they differ."""
    where = f"model.init_from={init_from!r}"
    try:
        base = read_checkpoint_config(init_from)
    except InputError as error:
        raise RecipeError(f"{where}: {error}") from error
    # The shape is the checkpoint's, and a ParameterNet checkpoint's expert banks are too. A recipe may restate them,
    # or inherit others from its base recipe (recipes/tiny-upcycled.yaml serves a dense and an upcycled checkpoint
    # alike): what differs is ignored, and said.
    fixed = set(fields) - ROUTING_FIELDS
    if is_parameternet(base) and not dense:
        fixed |= set(fields) & set(STRUCTURE_FIELDS)
    ignored = [
        f"{key}={fields[key]!r} (checkpoint: {getattr(base, key, None)!r})"
        for key in sorted(fixed)
        if normalized(key, fields[key]) != getattr(base, key, None)
    ]
    for key in fixed:
        del fields[key]
    if is_parameternet(base) and not dense and upcycling is not None:
        ignored.append("upcycling (the checkpoint is upcycled already)")
    if ignored:
        logger.warning(f"{where}: the checkpoint fixes these; ignoring model keys {', '.join(ignored)}")
    if dense or not is_parameternet(base):
        if dense and is_parameternet(base):
            raise RecipeError(f"{where} is a ParameterNet checkpoint: remove model.dense to continue training it")
        if dense:
            return base
        upcycle_options({"upcycling": upcycling})
        try:
            return upcycled_config(base, **fields)
        except InputError as error:
            raise RecipeError(f"upcycling {where}: {error}") from error
    try:
        config = ParameterNetLlamaConfig(**{**base.to_dict(), **fields})
        config.validate_routing()
    except (ValueError, TypeError, StrictDataclassError) as error:
        raise RecipeError(f"model section: {error.__cause__ or error}") from error
    return config


def normalized(key: str, value):
    """A model key's value as the config stores it (a single projection name becomes a list)."""
    return [value] if key == "moe_projections" and isinstance(value, str) else value


def upcycle_options(model_section: dict) -> UpcycleOptions:
    """The section's `upcycling` mapping (expert_noise, drop_fraction, router_std, seed) as options."""
    given = model_section.get("upcycling") or {}
    _check_keys("model.upcycling", given, {field.name for field in fields_of(UpcycleOptions)})
    try:
        return UpcycleOptions(**given)
    except (InputError, TypeError) as error:
        raise RecipeError(f"recipe key 'model.upcycling': {error}") from error


# What makes a run the run a checkpoint belongs to: a resume with any of these changed is refused.
RUN_IDENTITY = (
    "data.seq_len",
    "data.seed",
    "data.validation_documents",
    "data.sources",
    "data.corpus",
    "tokenizer",
    "train.seed",
    "train.start_step",
    "train.micro_batch_size",
    "train.gradient_accumulation_steps",
)
# Keys read only when a run starts afresh (the model section is compared as the config it resolves to).
FRESH_START_ONLY = ("model", "data.skip_blocks", "train.resume", "output_dir")
# Config entries that do not describe the model.
CONFIG_BOOKKEEPING = {"transformers_version", "_name_or_path"}
UNSET = object()


def flat_items(prefix: str, value) -> dict:
    """A nested mapping as {dotted key: value}; lists, scalars and empty mappings are leaves."""
    if isinstance(value, dict) and value:
        return {k: v for key, item in value.items() for k, v in flat_items(f"{prefix}{key}.", item).items()}
    return {prefix.rstrip("."): value}


def differences(before: dict, after: dict, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, 'old -> new') for every leaf that differs between two nested mappings."""
    old, new = flat_items(prefix, before), flat_items(prefix, after)

    def shown(value) -> str:
        return "(unset)" if value is UNSET else repr(value)

    return [
        (key, f"{shown(old.get(key, UNSET))} -> {shown(new.get(key, UNSET))}")
        for key in sorted(old.keys() | new.keys())
        if old.get(key, UNSET) != new.get(key, UNSET)
    ]


def resume_changes(saved: dict, recipe: dict, saved_config: dict, config: dict) -> tuple[list[str], list[str]]:
    """How a recipe resuming a checkpoint differs from the one the checkpoint was saved with, as
    (refused, applied) lines: a changed model config or run identity is refused; anything else applies
    from the resumed step on, or has no effect on a resumed run (said so)."""
    refused, applied = [], []
    for key, change in differences(saved, recipe):
        if key.startswith(RUN_IDENTITY):
            refused.append(f"{key}: {change}")
        elif key.startswith(FRESH_START_ONLY):
            applied.append(f"{key}: {change} (no effect on a resumed run)")
        else:
            applied.append(f"{key}: {change}")
    model = [{k: v for k, v in c.items() if k not in CONFIG_BOOKKEEPING} for c in (saved_config, config)]
    refused += [f"{key}: {change}" for key, change in differences(*model, prefix="model config.")]
    return refused, applied
