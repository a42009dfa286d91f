"""`parameternet-llm demo`: the paper's Table 7 in miniature, from nothing to a scored comparison.

Generates the embedded corpus, trains a tokenizer, pretrains a dense LLaMA and ParameterNet twins with
the same FLOPs on the same data, then continues the dense model for as many steps again, dense and
upcycled, beside a ParameterNet trained from scratch on the same tokens. Scores all of them zero-shot with
lm-eval on the offline tasks and writes the comparison (markdown, JSON, PNG plots). Every stage is skipped
when its output exists, so a rerun after an interruption continues where it stopped (training resumes from
its newest checkpoint).
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
from ..training.recipe import model_config, upcycle_options, validate_recipe
from ..training.tokenizer import load_tokenizer
from ..training.train import Trainer, lm_loss_of
from ..upcycling import expert_divergence, upcycled_model
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
    # Routing of the upcycled model of the continued-training comparison (None: no comparison).
    upcycling: dict | None = None


TABLE7_VARIANTS = {name: routing or {"dense": True} for name, routing in TABLE7_ROUTING.items()}
UP_PROJ_VARIANTS = {name: TABLE7_VARIANTS[name] for name in ("dense", "up_proj x4", "up_proj x8")}
DENSE_CONTINUED = "dense, continued"
UPCYCLED = "upcycled"
# Upcycled models train dropless; the share of tokens Switch's training factor would drop shows their balance.
DIAGNOSTIC_CAPACITY = 1.25

PRESETS = {
    "cpu": Preset(
        description="2-core CPU, about 15 minutes: dense vs 4 and 8 experts on up_proj",
        model=dict(hidden_size=128, intermediate_size=344, num_attention_heads=4, num_hidden_layers=4),
        corpus_tokens=3_000_000,
        vocab_size=4096,
        seq_len=256,
        train=dict(max_steps=300, micro_batch_size=8, lr=2.0e-3, warmup_steps=30, log_every=10, save_every=100),
        variants=UP_PROJ_VARIANTS,
        upcycling=TABLE7_ROUTING["up_proj x8"],
    ),
    "gpu": Preset(
        description="one GPU: a 30M-token corpus, a 512-wide 8-layer LLaMA, all seven Table 7 rows",
        model=dict(hidden_size=512, intermediate_size=1376, num_attention_heads=8, num_hidden_layers=8),
        corpus_tokens=30_000_000,
        vocab_size=8192,
        seq_len=512,
        train=dict(max_steps=2000, micro_batch_size=32, lr=1.0e-3, warmup_steps=100, log_every=20, save_every=500),
        variants=TABLE7_VARIANTS,
        upcycling=TABLE7_ROUTING["up_proj x8"],
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
    if not dense:
        routing.update(capacity_factor=1.25, eval_capacity_factor=None, router_aux_loss_coef=0.01)
    return demo_recipe(preset, output, run_name(variant), {"dense": dense, **routing})


def continued_recipes(preset: Preset, output: Path) -> dict[str, dict]:
    """The upcycling comparison: the dense model continued for as many steps again, dense and upcycled (on the
    data that follows what it saw), beside the upcycled routing trained from scratch on all those tokens."""
    if preset.upcycling is None:
        return {}
    steps = preset.train["max_steps"]
    seen = blocks_per_run(preset)
    dense_final = str(output / "runs" / run_name("dense") / "final")
    name = next(variant for variant, routing in TABLE7_ROUTING.items() if routing == preset.upcycling)
    return {
        DENSE_CONTINUED: demo_recipe(
            preset, output, "dense-continued", {"dense": True, "init_from": dense_final}, skip_blocks=seen
        ),
        f"{name}, {UPCYCLED}": demo_recipe(
            preset,
            output,
            f"{run_name(name)}-upcycled",
            {**preset.upcycling, "init_from": dense_final, "router_aux_loss_coef": 0.01},
            skip_blocks=seen,
        ),
        f"{name}, from scratch": demo_recipe(
            preset,
            output,
            f"{run_name(name)}-2x-steps",
            {**preset.upcycling, "capacity_factor": 1.25, "router_aux_loss_coef": 0.01},
            max_steps=2 * steps,
        ),
    }


def blocks_per_run(preset: Preset) -> int:
    """Training blocks (of seq_len tokens) one pretraining run of the preset reads."""
    return (
        preset.train["max_steps"]
        * preset.train["micro_batch_size"]
        * preset.train.get("gradient_accumulation_steps", 1)
    )


def demo_recipe(
    preset: Preset, output: Path, name: str, model: dict, skip_blocks: int = 0, max_steps: int | None = None
) -> dict:
    """The recipe of run `name`: the preset's shape with the `model` fields, its corpus, tokenizer and schedule."""
    corpus = output / "corpus"
    return validate_recipe(
        {
            "output_dir": str(output / "runs" / name),
            "model": {**preset.model, "max_position_embeddings": preset.seq_len, "tie_word_embeddings": False, **model},
            "data": {
                "seq_len": preset.seq_len,
                "skip_blocks": skip_blocks,
                "corpus": {"path": str(corpus), "num_tokens": preset.corpus_tokens, "seed": 0},
                "sources": [
                    {"name": source, "weight": weight, "files": str(corpus / source / "*.jsonl")}
                    for source, weight in (("web", 0.682), ("wiki", 0.205), ("arxiv", 0.114))
                ],
            },
            "tokenizer": {"path": str(output / "tokenizer"), "train": {"vocab_size": preset.vocab_size}},
            "train": {**preset.train, "resume": "auto", **({"max_steps": max_steps} if max_steps else {})},
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


def routing_diagnostics(model, validation: list[torch.Tensor], batch_size: int, capacity_factor: float) -> dict:
    """Symmetry and balance of a ParameterNet's routed linears on the validation blocks (in batches of
    `batch_size`, as in training): the experts' mean pairwise cosine distance, the Switch load-balancing loss
    (1 when balanced), the largest expert's share of tokens and the share of tokens that `capacity_factor` would
    drop, each averaged over the routed linears."""
    routers = [linear.router for linear in model.routed_linears().values()]
    factors = [router.capacity_factor for router in routers]
    for router in routers:
        router.capacity_factor = capacity_factor
    model.train()
    load_max, dropped, aux_losses = [], [], []
    with torch.no_grad():
        for start in range(0, len(validation), batch_size):
            outputs = model(torch.stack(validation[start : start + batch_size]))
            aux_losses.append(outputs.aux_loss.item())
            stats = model.routing_stats(outputs)
            load_max += [linear["load"].max().item() for linear in stats.values()]
            dropped += [linear["dropped"].item() for linear in stats.values()]
    for router, factor in zip(routers, factors, strict=True):
        router.capacity_factor = factor
    model.eval()
    divergence = list(expert_divergence(model).values())
    return {
        "expert_divergence": sum(divergence) / len(divergence),
        "aux_loss": sum(aux_losses) / len(aux_losses),
        "expert_load_max": sum(load_max) / len(load_max),
        "dropped_at_capacity": sum(dropped) / len(dropped),
        "capacity_factor": capacity_factor,
        "num_experts": model.config.num_experts,
    }


def upcycling_diagnostics(recipe: dict, validation: list[torch.Tensor]) -> dict:
    """`routing_diagnostics` of the upcycled model at step 0 (rebuilt from the dense checkpoint) and at the end."""
    from transformers import AutoModelForCausalLM

    section = recipe["model"]
    config = model_config(section, recipe["data"]["seq_len"])
    batch = recipe["train"]["micro_batch_size"]
    dense = AutoModelForCausalLM.from_pretrained(section["init_from"])
    start = upcycled_model(section["init_from"], config, upcycle_options(section))
    end = AutoModelForCausalLM.from_pretrained(Path(recipe["output_dir"]) / "final")
    return {
        "dense_val_loss": validation_loss(dense, validation, batch),
        "step_0_val_loss": validation_loss(start, validation, batch),
        "step_0": routing_diagnostics(start, validation, batch, DIAGNOSTIC_CAPACITY),
        "end": routing_diagnostics(end, validation, batch, DIAGNOSTIC_CAPACITY),
    }


def validation_loss(model, validation: list[torch.Tensor], batch_size: int) -> float:
    """Mean language-model loss over the validation blocks in eval mode, batched as the trainer does."""
    model.eval()
    losses = []
    with torch.no_grad():
        for start in range(0, len(validation), batch_size):
            batch = torch.stack(validation[start : start + batch_size])
            losses.append(lm_loss_of(model(input_ids=batch, labels=batch)).item())
    return sum(losses) / len(losses)


def train_all(recipes: dict[str, dict], stage: str) -> None:
    for index, (variant, recipe) in enumerate(recipes.items(), 1):
        print(f"[demo] {index}/{len(recipes)} {stage} {variant}")
        pretrain_variant(recipe)


def score_all(recipes: dict[str, dict], output: Path, seq_len: int, validation) -> tuple[list[dict], dict]:
    """lm-eval rows of every run's final model, and the expert loads of the routed ones."""
    rows, loads = [], {}
    for index, (variant, recipe) in enumerate(recipes.items(), 1):
        run_dir = Path(recipe["output_dir"])
        print(f"[demo] {index}/{len(recipes)} scoring {variant} with lm-eval")
        row = score_variant(run_dir / "final", output / "scores" / f"{run_dir.name}.json", seq_len)
        rows.append({**row, "name": run_dir.name, "variant": variant})
        variant_loads = expert_loads(run_dir / "final", validation)
        if variant_loads is not None:
            loads[variant] = variant_loads
    return rows, loads


def run_demo(output: str | Path = "runs/demo", preset_name: str | None = None) -> str:
    preset_name = preset_name or default_preset()
    if preset_name not in PRESETS:
        raise InputError(f"unknown preset {preset_name!r}: choose one of {sorted(PRESETS)}")
    preset = PRESETS[preset_name]
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    print(f"[demo] preset {preset_name}: {preset.description}; writing to {output}")
    recipes = {variant: variant_recipe(preset, variant, output) for variant in preset.variants}
    train_all(recipes, "pretraining")
    continued = continued_recipes(preset, output)  # read the dense checkpoint, so built after pretraining
    train_all(continued, "continued training")

    validation = validation_blocks(next(iter(recipes.values())))
    rows, loads = score_all(recipes, output, preset.seq_len, validation)
    plot_losses(
        {variant: Path(recipe["output_dir"]) for variant, recipe in recipes.items()}, output / "loss_curves.png"
    )
    if loads:
        plot_expert_loads(loads, output / "expert_load.png")
        (output / "expert_load.json").write_text(json.dumps(loads, indent=1))
    upcycling = None
    if continued:
        continued_rows, _ = score_all(continued, output, preset.seq_len, validation)
        upcycled = next(recipe for variant, recipe in continued.items() if variant.endswith(UPCYCLED))
        tokens = blocks_per_run(preset) * preset.seq_len
        runs = {"dense": recipes["dense"], **continued}
        plot_losses(
            {variant: Path(recipe["output_dir"]) for variant, recipe in runs.items()},
            output / "upcycling.png",
            offsets={variant: tokens for variant, recipe in runs.items() if "init_from" in recipe["model"]},
            title="Continued training of the dense model: dense vs upcycled, and ParameterNet from scratch",
        )
        upcycling = {
            "steps": preset.train["max_steps"],
            "tokens": tokens,
            "rows": [row for row in rows if row["variant"] in ("dense", *continued)] + continued_rows,
            "diagnostics": upcycling_diagnostics(upcycled, validation),
        }
    report = write_report(output, preset_name, preset.description, rows, upcycling)
    print(report)
    print(f"[demo] wrote {output / 'report.md'}, results.json and the plots")
    return report
