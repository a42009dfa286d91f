"""The `parameternet-llm` command line.

A module of its own beside the package: importing `parameternet_llm` registers the model with transformers,
which imports torch (seconds), so the commands import what they need only once the arguments are parsed
and `--help` answers at once.
"""

import argparse
import itertools
import json
import sys
from pathlib import Path


def load_config(target: str, overrides: list[str]):
    """A config from a model-shape name, a checkpoint directory, a config.json or a recipe."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    from parameternet_llm.configuration_parameternet_llama import ParameterNetLlamaConfig
    from parameternet_llm.presets import MODEL_SHAPES
    from parameternet_llm.saved_models import CheckpointError, brief, read_config_dict
    from parameternet_llm.training.recipe import RecipeError, apply_overrides, load_recipe, model_config

    if target in MODEL_SHAPES:
        try:
            return ParameterNetLlamaConfig(**apply_overrides(MODEL_SHAPES[target], overrides))
        except (ValueError, StrictDataclassError) as error:
            raise RecipeError(str(error)) from error
    path = Path(target)
    if not path.exists():
        raise SystemExit(f"error: {target!r} is neither a model shape ({', '.join(MODEL_SHAPES)}) nor an existing path")
    if path.suffix in (".yaml", ".yml"):
        from parameternet_llm.training.tokenizer import has_tokenizer, load_tokenizer

        recipe = load_recipe(path, overrides)
        tokenizer = recipe["tokenizer"]["path"]
        # The trained tokenizer's real size (a small corpus may yield fewer pieces than asked for), else the request.
        vocab = (recipe["tokenizer"]["train"] or {}).get("vocab_size")
        if tokenizer is not None and has_tokenizer(tokenizer):
            vocab = len(load_tokenizer(tokenizer))
        return model_config(recipe["model"], recipe["data"]["seq_len"], {"vocab_size": vocab} if vocab else None)
    config_dict = apply_overrides(read_config_dict(path), overrides)
    try:
        if config_dict.get("model_type") == ParameterNetLlamaConfig.model_type:
            return ParameterNetLlamaConfig.from_dict(config_dict)
        return AutoConfig.for_model(**config_dict)
    except (ValueError, KeyError, TypeError, StrictDataclassError) as error:
        raise CheckpointError(f"{target}: not a config transformers can build ({brief(error)})") from error


def info(args: argparse.Namespace) -> None:
    from parameternet_llm.accounting import count_parameters, flops_per_token, short_count
    from parameternet_llm.presets import MODEL_SHAPES, table7_configs

    if args.target in MODEL_SHAPES and not args.overrides:
        rows = table7_configs(MODEL_SHAPES[args.target])
    else:
        rows = {args.target: load_config(args.target, args.overrides)}
    print(f"| model | params | active params | forward GFLOPs/token (seq {args.seq_len}) |")
    print("|---|---|---|---|")
    for name, config in rows.items():
        params = count_parameters(config)
        flops = flops_per_token(config, args.seq_len)
        print(f"| {name} | {short_count(params['total'])} | {short_count(params['active'])} | {flops / 1e9:.4g} |")


def pretrain(args: argparse.Namespace) -> None:
    from parameternet_llm.training.recipe import load_recipe
    from parameternet_llm.training.train import finished_message, run

    output_dir = Path(load_recipe(args.recipe, args.overrides)["output_dir"])
    print(finished_message(output_dir, run(args.recipe, args.overrides)))


def make_corpus(args: argparse.Namespace) -> None:
    from parameternet_llm.demo.corpus import generate_corpus

    path = generate_corpus(args.output, args.num_tokens, args.seed)
    print(json.loads((path / "manifest.json").read_text()))


def train_tokenizer_command(args: argparse.Namespace) -> None:
    from parameternet_llm.training.data import Source, open_source
    from parameternet_llm.training.tokenizer import train_tokenizer

    stream = open_source(Source("tokenizer-data", 1.0, files=args.files, text_field=args.text_field))
    texts = (example["text"] for example in itertools.islice(stream, args.max_documents))
    tokenizer = train_tokenizer(texts, args.output, args.vocab_size)
    print(f"saved a {len(tokenizer)}-token tokenizer to {args.output}")


def evaluate_command(args: argparse.Namespace) -> None:
    from parameternet_llm.evaluation.harness import evaluate, format_table

    tasks = [task for task in args.tasks.split(",") if task]
    rows = evaluate(args.checkpoints, tasks, args.output, args.include_path, args.batch_size, args.limit, args.seq_len)
    print(format_table(rows, tasks), end="")
    print(f"wrote {Path(args.output) / 'results.json'} and {Path(args.output) / 'table.md'}")


def finetune_sst2_command(args: argparse.Namespace) -> None:
    from parameternet_llm.evaluation.sst2 import finetune_sst2

    result = finetune_sst2(
        args.checkpoint,
        args.output,
        args.train_file,
        args.validation_file,
        args.epochs,
        args.max_steps,
        args.lr,
        args.batch_size,
        args.max_length,
        args.seed,
    )
    print(
        f"SST-2 validation accuracy {100 * result['validation_accuracy']:.2f}% "
        f"({result['validation_examples']} sentences, {result['steps']} steps); saved to {args.output}"
    )


def demo_command(args: argparse.Namespace) -> None:
    from parameternet_llm.demo.run import run_demo

    run_demo(args.output, args.preset, args.seeds)


def at_least(minimum: int):
    """An argparse type: an integer no smaller than `minimum`."""

    def integer(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return integer


def seed_list(text: str) -> tuple[int, ...]:
    """`0,1,2` -> (0, 1, 2)."""
    try:
        return tuple(int(seed) for seed in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def router_init_std(text: str) -> float | None:
    """`normal` -> None (the config's initializer_range), `normal:0.05` or `0.05` -> 0.05."""
    scheme, _, std = text.partition(":")
    if scheme == "normal" and not std:
        return None
    try:
        value = float(std if scheme == "normal" else text)
    except ValueError:
        value = 0.0
    if value > 0:
        return value
    raise argparse.ArgumentTypeError(f"{text!r} is not normal or normal:STD with STD > 0")


def inspect_command(args: argparse.Namespace) -> None:
    from parameternet_llm.inspection import inspect_checkpoint

    print(inspect_checkpoint(args.checkpoint, args.text, args.seq_len, args.max_tokens))


def upcycle_command(args: argparse.Namespace) -> None:
    from parameternet_llm.accounting import count_parameters, short_count
    from parameternet_llm.training.recipe import parse_override
    from parameternet_llm.upcycling import UpcycleOptions, upcycle

    routing = {".".join(keys): value for keys, value in map(parse_override, args.overrides)}
    routing.update(num_experts=args.experts, moe_projections=args.projections.split(","))
    if args.layers is not None:
        routing["moe_layers"] = [int(layer) for layer in args.layers.split(",")]
    options = UpcycleOptions(args.expert_noise, args.drop_fraction, args.router_init, args.seed)
    config = upcycle(args.dense_dir, args.output_dir, options, args.max_shard_size, **routing)
    params = count_parameters(config)
    tokenizer = any((Path(args.output_dir) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    print(
        f"wrote {args.output_dir}: {short_count(params['total'])} parameters, "
        f"{short_count(params['active'])} active per token; "
        f"{config.num_experts} experts on {', '.join(config.moe_projections)}; expert_scale {config.expert_scale}, "
        f"capacity_factor {config.capacity_factor}; "
        + ("the dense function is kept at step 0" if options.preserves_function else "experts perturbed")
        + ("" if tokenizer else "; no tokenizer in the dense directory, none copied")
    )


def bench_command(args: argparse.Namespace) -> None:
    import datetime
    import shlex

    from parameternet_llm import bench

    projections = tuple(args.projections.split(","))
    gpu = bench.device_and_dtype()[0].type == "cuda"
    args.shape = args.shape or ("llama-1b" if gpu else "cpu-small")
    args.seq_len = args.seq_len or (2048 if gpu else 256)
    if args.what == "layer":
        result = bench.bench_layer(
            args.tokens,
            args.in_features,
            args.out_features,
            args.experts,
            tuple(args.backends.split(",")),
            args.capacity_factor,
            repeats=args.repeats or 20,
        )
    elif args.what == "train":
        result = bench.bench_train(
            args.shape,
            args.batch_size,
            args.seq_len,
            args.experts,
            projections,
            args.backend,
            repeats=args.repeats or 6,
        )
    else:
        result = bench.bench_decode(
            args.shape,
            args.prompt_len,
            args.new_tokens,
            args.experts,
            projections,
            args.backend,
            repeats=args.repeats or 3,
        )
    if args.save:
        record = {**result, "date": datetime.date.today().isoformat(), "command": shlex.join(args.command_line)}
        with open(args.save, "a") as stream:
            stream.write(json.dumps(record) + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parameternet-llm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    command = commands.add_parser(
        "demo",
        help="the paper's Table 7 in miniature: corpus, tokenizer, dense and "
        "ParameterNet pretraining, lm-eval scores, report and plots",
    )
    command.add_argument("--output", default="runs/demo", help="directory for everything the demo writes")
    command.add_argument("--preset", help="cpu (default without a GPU), cpu-table7 or gpu (default with one)")
    command.add_argument(
        "--seeds", type=seed_list, help="comma-separated training seeds (default: the preset's, 0,1,2)"
    )
    command.set_defaults(handler=demo_command)

    command = commands.add_parser(
        "info", help="parameters and FLOPs per token of a model shape, checkpoint, config.json or recipe"
    )
    command.add_argument(
        "target",
        nargs="?",
        default="llama-1b",
        help="model shape name, checkpoint directory, config.json or recipe YAML",
    )
    command.add_argument("overrides", nargs="*", help="config fields as key=value (recipe keys as dotted.key=value)")
    command.add_argument("--seq-len", type=at_least(1), default=2048, help="context length for attention FLOPs")
    command.set_defaults(handler=info)

    command = commands.add_parser(
        "pretrain",
        help="pretrain from a recipe in this process (accelerate launch -m parameternet_llm.training for several)",
    )
    command.add_argument("recipe", help="recipe YAML file, e.g. recipes/tiny.yaml")
    command.add_argument("overrides", nargs="*", help="recipe overrides as dotted.key=value")
    command.set_defaults(handler=pretrain)

    command = commands.add_parser("eval", help="zero-shot scores with lm-evaluation-harness, Table 7 style")
    command.add_argument("checkpoints", nargs="+", help="HF checkpoint directories (e.g. runs/tiny/final)")
    command.add_argument(
        "--tasks",
        default="arc_easy,boolq,hellaswag",
        help="comma-separated lm-eval tasks (default: the paper's; offline: pnet_arc,pnet_boolq,pnet_hellaswag)",
    )
    command.add_argument("--include-path", help="extra lm-eval task folder (the offline tasks are always included)")
    command.add_argument("--batch-size", type=at_least(1), default=8)
    command.add_argument("--limit", type=at_least(1), help="score only the first N documents of each task")
    command.add_argument("--seq-len", type=at_least(1), help="context length for FLOPs (default: the model's maximum)")
    command.add_argument("--output", required=True, help="directory for results.json and table.md")
    command.set_defaults(handler=evaluate_command)

    command = commands.add_parser("finetune-sst2", help="fine-tune a classifier on SST-2, report validation accuracy")
    command.add_argument("checkpoint", help="HF checkpoint directory")
    command.add_argument("--output", required=True, help="directory for the fine-tuned classifier")
    command.add_argument("--train-file", help="local SST-2 training split (GLUE train.tsv, csv, jsonl, parquet)")
    command.add_argument("--validation-file", help="local SST-2 validation split (GLUE dev.tsv, ...)")
    command.add_argument("--epochs", type=at_least(1), default=1)
    command.add_argument("--max-steps", type=at_least(1), help="stop after this many steps (overrides --epochs)")
    command.add_argument("--lr", type=positive_float, default=2e-5)
    command.add_argument("--batch-size", type=at_least(1), default=16)
    command.add_argument("--max-length", type=at_least(2), default=128)
    command.add_argument("--seed", type=int, default=0)
    command.set_defaults(handler=finetune_sst2_command)

    command = commands.add_parser(
        "bench", help="speed against the dense twin: one routed linear, a training step, or batch-1 decoding"
    )
    command.add_argument("what", choices=["layer", "train", "decode"])
    command.add_argument("--experts", type=at_least(1), default=8)
    command.add_argument("--repeats", type=at_least(1), help="timed repeats (median reported)")
    command.add_argument("--save", help="append the JSON result (with date and command) to this file")
    command.add_argument("--tokens", type=at_least(1), default=16384, help="layer: tokens")
    command.add_argument("--in-features", type=at_least(1), default=2048, help="layer: input width")
    command.add_argument("--out-features", type=at_least(1), default=8192, help="layer: output width")
    command.add_argument("--backends", default="auto", help="layer: comma-separated expert backends to time")
    command.add_argument("--capacity-factor", type=positive_float, help="layer: capacity factor (default dropless)")
    command.add_argument(
        "--shape",
        default=None,
        choices=["cpu-small", "llama-1b"],
        help="train/decode: model shape (default llama-1b on a GPU, cpu-small on a CPU)",
    )
    command.add_argument("--batch-size", type=at_least(1), default=8, help="train: sequences per step")
    command.add_argument(
        "--seq-len", type=at_least(2), default=None, help="train: tokens per sequence (256 CPU, 2048 GPU)"
    )
    command.add_argument(
        "--projections", default="gate_proj,up_proj,down_proj", help="train/decode: routed projections"
    )
    command.add_argument("--backend", default="auto", help="train/decode: expert backend")
    command.add_argument("--prompt-len", type=at_least(1), default=32, help="decode: prompt tokens")
    command.add_argument("--new-tokens", type=at_least(1), default=128, help="decode: generated tokens")
    command.set_defaults(handler=bench_command)

    command = commands.add_parser(
        "inspect", help="a checkpoint's parameters and routing, and its expert loads on a text file"
    )
    command.add_argument("checkpoint", help="HF checkpoint directory")
    command.add_argument("--text", help="a text file: report each routed linear's expert loads and drops on it")
    command.add_argument("--seq-len", type=at_least(2), default=256, help="tokens per block of the text")
    command.add_argument(
        "--max-tokens", type=at_least(2), default=32768, help="read at most this many tokens of the text"
    )
    command.set_defaults(handler=inspect_command)

    command = commands.add_parser(
        "upcycle", help="turn a dense LLaMA checkpoint into a ParameterNet whose experts start as its projections"
    )
    command.add_argument("dense_dir", help="LlamaForCausalLM checkpoint directory (safetensors, with its tokenizer)")
    command.add_argument("output_dir", help="directory for the ParameterNet checkpoint (must not exist or be empty)")
    command.add_argument("--experts", type=at_least(2), default=8, help="experts per routed projection")
    command.add_argument("--projections", default="up_proj", help="comma-separated: gate_proj, up_proj, down_proj")
    command.add_argument("--layers", help="comma-separated decoder layers to route (default: all)")
    command.add_argument(
        "--router-init",
        type=router_init_std,
        default="normal",
        metavar="normal[:STD]",
        help="the routers' init: normal, with the config's initializer_range as std unless STD is given",
    )
    command.add_argument("--expert-noise", type=float, default=0.0, help="Gaussian noise on each copy, x its std")
    command.add_argument(
        "--drop-fraction", type=float, default=0.0, help="share of each copy's channels re-drawn (Drop-Upcycling)"
    )
    command.add_argument("--seed", type=int, default=0, help="seed of the router init, noise and re-drawn channels")
    command.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard written")
    command.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="another routing field of the config, e.g. --set capacity_factor=1.25 (repeatable)",
    )
    command.set_defaults(handler=upcycle_command)

    command = commands.add_parser("make-corpus", help="generate the embedded corpus (JSONL) and its world")
    command.add_argument("--output", required=True, help="directory to write")
    command.add_argument("--num-tokens", type=at_least(1000), default=3_000_000, help="approximate size in tokens")
    command.add_argument("--seed", type=int, default=0)
    command.set_defaults(handler=make_corpus)

    command = commands.add_parser("train-tokenizer", help="train a LLaMA-style SentencePiece BPE tokenizer")
    command.add_argument("--files", nargs="+", required=True, help="jsonl / json / parquet / txt files or globs")
    command.add_argument("--output", required=True, help="directory for the transformers tokenizer")
    command.add_argument("--vocab-size", type=at_least(1), default=8000)
    command.add_argument("--max-documents", type=at_least(1), default=50_000)
    command.add_argument("--text-field", default="text")
    command.set_defaults(handler=train_tokenizer_command)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.command_line = ["parameternet-llm", *(sys.argv[1:] if argv is None else argv)]
    from parameternet_llm.errors import user_message

    try:
        args.handler(args)
    except (ValueError, OSError) as error:  # InputError is a ValueError
        message = user_message(error)
        if message is None:
            raise
        sys.exit(message)


if __name__ == "__main__":
    main()
