"""`parameternet-llm demo`: the paper's Table 7 in miniature, from nothing to a scored comparison.

Generates the embedded corpus, trains a tokenizer, pretrains a dense LLaMA and ParameterNet twins with
the same FLOPs on the same data, scores all of them zero-shot with lm-eval on the offline tasks and
writes the comparison (markdown, JSON, PNG plots). Every stage is skipped when its output exists, so a
rerun after an interruption continues where it stopped (training resumes from its newest checkpoint).
"""

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..errors import InputError
from ..evaluation.harness import evaluate
from ..evaluation.offline_tasks import TASK_NAMES
from ..presets import TABLE7_ROUTING, is_parameternet
from ..training.data import build_pretraining_data, open_sources
from ..training.recipe import validate_recipe
from ..training.tokenizer import load_tokenizer
from ..training.train import Trainer
from .report import plot_expert_loads, plot_losses, write_report


@dataclass
class Preset:
    """A model shape, a data size and a schedule shared by every variant, and the variants to train."""

    description: str
    model: dict
    corpus_tokens: int
    vocab_size: int
    seq_len: int
    train: dict
    variants: dict[str, dict] = field(default_factory=dict)


TABLE7_VARIANTS = {name: routing or {"dense": True} for name, routing in TABLE7_ROUTING.items()}
UP_PROJ_VARIANTS = {name: TABLE7_VARIANTS[name] for name in ("dense", "up_proj x4", "up_proj x8")}

PRESETS = {
    "cpu": Preset(
        description="2-core CPU, about 15 minutes: dense vs 4 and 8 experts on up_proj",
        model=dict(hidden_size=128, intermediate_size=344, num_attention_heads=4, num_hidden_layers=4),
        corpus_tokens=3_000_000,
        vocab_size=4096,
        seq_len=256,
        train=dict(max_steps=300, micro_batch_size=8, lr=2.0e-3, warmup_steps=30, log_every=10, save_every=100),
        variants=UP_PROJ_VARIANTS,
    ),
    "gpu": Preset(
        description="one GPU: a 30M-token corpus, a 512-wide 8-layer LLaMA, all seven Table 7 rows",
        model=dict(hidden_size=512, intermediate_size=1376, num_attention_heads=8, num_hidden_layers=8),
        corpus_tokens=30_000_000,
        vocab_size=8192,
        seq_len=512,
        train=dict(max_steps=2000, micro_batch_size=32, lr=1.0e-3, warmup_steps=100, log_every=20, save_every=500),
        variants=TABLE7_VARIANTS,
    ),
}


PRESETS["cpu-table7"] = replace(
    PRESETS["cpu"],
    description="CPU, about 35 minutes: dense vs 4 and 8 experts on each of gate, up and down",
    variants=TABLE7_VARIANTS,
)


def default_preset() -> str:
    return "gpu" if torch.cuda.is_available() else "cpu"


def variant_recipe(preset: Preset, variant: str, output: Path) -> dict:
    """A full training recipe for one variant; all variants share corpus, tokenizer, data order and schedule."""
    routing = dict(preset.variants[variant])
    dense = routing.pop("dense", False)
    model = {**preset.model, "max_position_embeddings": preset.seq_len, "tie_word_embeddings": False, "dense": dense}
    if not dense:
        model.update(routing, capacity_factor=1.25, eval_capacity_factor=None, router_aux_loss_coef=0.01)
    corpus = output / "corpus"
    return validate_recipe(
        {
            "output_dir": str(output / "runs" / run_name(variant)),
            "model": model,
            "data": {
                "seq_len": preset.seq_len,
                "corpus": {"path": str(corpus), "num_tokens": preset.corpus_tokens, "seed": 0},
                "sources": [
                    {"name": source, "weight": weight, "files": str(corpus / source / "*.jsonl")}
                    for source, weight in (("web", 0.682), ("wiki", 0.205), ("arxiv", 0.114))
                ],
            },
            "tokenizer": {"path": str(output / "tokenizer"), "train": {"vocab_size": preset.vocab_size}},
            "train": {**preset.train, "resume": "auto"},
            "eval": {"every": preset.train["save_every"], "batches": 4},
        }
    )


def run_name(variant: str) -> str:
    return variant.replace(" ", "-")


def pretrain_variant(recipe: dict) -> None:
    output_dir = Path(recipe["output_dir"])
    summary = output_dir / "summary.json"
    if summary.is_file() and json.loads(summary.read_text())["step"] >= recipe["train"]["max_steps"]:
        print(f"[demo] {output_dir.name}: already trained, skipping")
        return
    Trainer(recipe).run()


def score_variant(checkpoint: Path, cache: Path, seq_len: int) -> dict:
    if cache.is_file():
        return json.loads(cache.read_text())
    row = evaluate([str(checkpoint)], list(TASK_NAMES), cache.parent / cache.stem, seq_len=seq_len)[0]
    cache.write_text(json.dumps(row, indent=1, default=str))
    return row


def validation_blocks(recipe: dict) -> list[torch.Tensor]:
    """The held-out blocks the runs validated on."""
    data = recipe["data"]
    tokenizer = load_tokenizer(recipe["tokenizer"]["path"])
    blocks = recipe["eval"]["batches"] * recipe["train"]["micro_batch_size"]
    return build_pretraining_data(
        open_sources(data["sources"]), tokenizer, data["seq_len"], data["seed"], data["validation_documents"], blocks
    ).validation


def expert_loads(checkpoint: Path, validation: list[torch.Tensor]) -> dict[str, list[float]] | None:
    """Mean expert shares of every routed linear over the validation blocks (None for a dense model)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    if not is_parameternet(model):
        return None
    totals: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for block in validation:
            for name, stats in model.routing_stats(model(block.unsqueeze(0))).items():
                totals[name] = totals.get(name, 0) + stats["load"]
    return {name: (total / len(validation)).tolist() for name, total in totals.items()}


def run_demo(output: str | Path = "runs/demo", preset_name: str | None = None) -> str:
    preset_name = preset_name or default_preset()
    if preset_name not in PRESETS:
        raise InputError(f"unknown preset {preset_name!r}: choose one of {sorted(PRESETS)}")
    preset = PRESETS[preset_name]
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    print(f"[demo] preset {preset_name}: {preset.description}; writing to {output}")
    recipes = {variant: variant_recipe(preset, variant, output) for variant in preset.variants}
    for index, (variant, recipe) in enumerate(recipes.items(), 1):
        print(f"[demo] {index}/{len(recipes)} pretraining {variant}")
        pretrain_variant(recipe)

    rows, loads = [], {}
    validation = None
    for index, (variant, recipe) in enumerate(recipes.items(), 1):
        run_dir = Path(recipe["output_dir"])
        print(f"[demo] {index}/{len(recipes)} scoring {variant} with lm-eval")
        row = score_variant(run_dir / "final", output / "scores" / f"{run_name(variant)}.json", preset.seq_len)
        rows.append({**row, "name": run_name(variant), "variant": variant})
        if validation is None:
            validation = validation_blocks(recipe)
        variant_loads = expert_loads(run_dir / "final", validation)
        if variant_loads is not None:
            loads[variant] = variant_loads
    plot_losses(
        {variant: Path(recipe["output_dir"]) for variant, recipe in recipes.items()}, output / "loss_curves.png"
    )
    if loads:
        plot_expert_loads(loads, output / "expert_load.png")
        (output / "expert_load.json").write_text(json.dumps(loads, indent=1))
    report = write_report(output, preset_name, preset.description, rows)
    print(report)
    print(f"[demo] wrote {output / 'report.md'}, results.json, loss_curves.png, expert_load.png")
    return report
