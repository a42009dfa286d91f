"""The `parameternet-llm` command line."""

import argparse
import json
import sys
from pathlib import Path

import yaml
from transformers import AutoConfig, LlamaConfig

from .accounting import count_parameters, flops_per_token
from .configuration_parameternet_llama import ParameterNetLlamaConfig
from .presets import MODEL_SHAPES, table7_configs


def parse_overrides(pairs: list[str]) -> dict:
    """`key=value` pairs, each value read as YAML (`8`, `null`, `[gate_proj, up_proj]`)."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: override {pair!r} is not of the form key=value")
        overrides[key] = yaml.safe_load(value)
    return overrides


def load_config(target: str, overrides: dict) -> LlamaConfig:
    """A config from a model-shape name, a checkpoint directory or a config.json, with overrides."""
    if target in MODEL_SHAPES:
        return ParameterNetLlamaConfig(**{**MODEL_SHAPES[target], **overrides})
    path = Path(target)
    if not path.exists():
        raise SystemExit(f"error: {target!r} is neither a model shape ({', '.join(MODEL_SHAPES)}) nor an existing path")
    config_dict = json.loads((path / "config.json" if path.is_dir() else path).read_text())
    config_dict.update(overrides)
    if config_dict.get("model_type") == ParameterNetLlamaConfig.model_type:
        return ParameterNetLlamaConfig.from_dict(config_dict)
    return AutoConfig.for_model(**config_dict)


def format_row(name: str, config: LlamaConfig, seq_len: int) -> str:
    params = count_parameters(config)
    flops = flops_per_token(config, seq_len)
    return f"| {name} | {params['total'] / 1e9:.2f}B | {params['active'] / 1e9:.3f}B | {flops / 1e9:.3f} |"


def info(args: argparse.Namespace) -> None:
    overrides = parse_overrides(args.overrides)
    if args.target in MODEL_SHAPES and not overrides:
        rows = table7_configs(MODEL_SHAPES[args.target])
    else:
        rows = {args.target: load_config(args.target, overrides)}
    print(f"| model | params | active params | forward GFLOPs/token (seq {args.seq_len}) |")
    print("|---|---|---|---|")
    for name, config in rows.items():
        print(format_row(name, config, args.seq_len))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parameternet-llm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    info_parser = commands.add_parser(
        "info", help="parameters and FLOPs per token of a model shape, checkpoint or config.json"
    )
    info_parser.add_argument(
        "target", nargs="?", default="llama-1b", help="model shape name, checkpoint directory or config.json"
    )
    info_parser.add_argument("overrides", nargs="*", help="config overrides as key=value, e.g. num_experts=8")
    info_parser.add_argument("--seq-len", type=int, default=2048, help="context length for attention FLOPs")
    info_parser.set_defaults(handler=info)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except ValueError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
