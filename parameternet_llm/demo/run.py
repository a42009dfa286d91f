"""`parameternet-llm demo`: the paper's Table 7 in miniature, from nothing to a scored comparison with error bars.

Generates the embedded corpus (a knowledge-dense world), trains a tokenizer, pretrains a dense LLaMA and
ParameterNet twins with the same FLOPs on the same data, each with several seeds, and the dense model upcycled
halfway through; scores every model zero-shot with lm-eval on the offline tasks and writes the comparison
(markdown, JSON, PNG plots) with the mean and spread over seeds. Every stage is skipped when its output exists,
so a rerun after an interruption continues where it stopped (training resumes from its newest checkpoint). Why
the preset is shaped as it is: docs/DEMO.md.
"""

import json
import time
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
from ..training.train import CHECKPOINT_PREFIX, Trainer, mean_lm_loss
from ..upcycling import expert_divergence, upcycled_model
from .report import mean_and_sd, plot_expert_loads, plot_loss_against_flops, write_report


@dataclass
class Preset:
    """A model shape, a data size and a schedule shared by every variant, the variants, and the seeds."""

    description: str
    model: dict
    corpus_tokens: int
    vocab_size: int
    seq_len: int
    train: dict
    variants: dict[str, dict] = field(default_factory=dict)
    seeds: tuple[int, ...] = (0, 1, 2)
    # The variant whose routing the dense model takes halfway through its schedule (None: no upcycled row).
    upcycled: str | None = None


TABLE7_VARIANTS = {name: routing or {"dense": True} for name, routing in TABLE7_ROUTING.items()}
UPCYCLED_SUFFIX = ", upcycled at half"
# Upcycled models train dropless; the share of tokens Switch's training factor would drop shows their balance.
DIAGNOSTIC_CAPACITY = 1.25

PRESETS = {
    # A parameter-limited dense model on a knowledge-dense corpus: 2 layers 64 wide with a narrow FFN (x2),
    # tied 512-piece embeddings (a quarter of the parameters), 4.1M tokens, about 36 tokens per parameter.
    "cpu": Preset(
        description="2-core CPU: dense vs 8 experts on up_proj, from scratch and upcycled at half, 3 seeds",
        model=dict(
            hidden_size=64, intermediate_size=128, num_attention_heads=2, num_hidden_layers=2, tie_word_embeddings=True
        ),
        corpus_tokens=4_000_000,
        vocab_size=512,
        seq_len=128,
        train=dict(max_steps=1000, micro_batch_size=32, lr=3.0e-3, warmup_steps=50, log_every=50, save_every=250),
        variants={name: TABLE7_VARIANTS[name] for name in ("dense", "up_proj x8")},
        upcycled="up_proj x8",
    ),
    "gpu": Preset(
        description="one GPU: a 512-wide 8-layer LLaMA, all seven Table 7 rows and the upcycled row, 3 seeds",
        model=dict(
            hidden_size=512,
            intermediate_size=1376,
            num_attention_heads=8,
            num_hidden_layers=8,
            tie_word_embeddings=False,
        ),
        corpus_tokens=30_000_000,
        vocab_size=8192,
        seq_len=512,
        train=dict(max_steps=2000, micro_batch_size=32, lr=1.0e-3, warmup_steps=100, log_every=20, save_every=500),
        variants=TABLE7_VARIANTS,
        upcycled="up_proj x8",
    ),
}
PRESETS["cpu-table7"] = replace(
    PRESETS["cpu"],
    description="2-core CPU: dense vs 4 and 8 experts on each of gate, up and down, 3 seeds",
    variants=TABLE7_VARIANTS,
    upcycled=None,
)


def default_preset() -> str:
    return "gpu" if torch.cuda.is_available() else "cpu"


def run_name(variant: str) -> str:
    return variant.replace(", ", "-").replace(" ", "-")


def half_step(preset: Preset) -> int:
    return preset.train["max_steps"] // 2


def run_dir(output: Path, variant: str, seed: int) -> Path:
    return output / "runs" / run_name(variant) / f"seed-{seed}"


def variant_recipes(preset: Preset, output: Path, seed: int) -> dict[str, dict]:
    """Every variant's training recipe for one seed: same corpus, tokenizer, data order and schedule. The upcycled
    variant starts from the dense run's weights at half the steps, on the blocks that run had not read yet."""
    recipes = {}
    for variant, routing in preset.variants.items():
        model = dict(routing)
        train = {}
        if model.get("dense"):
            train["export_steps"] = [half_step(preset)] if preset.upcycled else []
        else:
            model.update(capacity_factor=1.25, eval_capacity_factor=None, router_aux_loss_coef=0.01)
        recipes[variant] = demo_recipe(preset, output, run_dir(output, variant, seed), seed, model, train)
    if preset.upcycled:
        half = half_step(preset)
        train = preset.train
        model = {
            **preset.variants[preset.upcycled],
            "init_from": str(run_dir(output, "dense", seed) / "export" / f"{CHECKPOINT_PREFIX}{half:08d}"),
            "router_aux_loss_coef": 0.01,
        }
        name = preset.upcycled + UPCYCLED_SUFFIX
        skip = half * train["micro_batch_size"] * train.get("gradient_accumulation_steps", 1)
        recipes[name] = demo_recipe(
            preset, output, run_dir(output, name, seed), seed, model, {"start_step": half}, skip_blocks=skip
        )
    return recipes


def demo_recipe(
    preset: Preset, output: Path, run: Path, seed: int, model: dict, train: dict, skip_blocks: int = 0
) -> dict:
    """The recipe of one run: the preset's shape with the `model` fields, its corpus, tokenizer and schedule."""
    corpus = output / "corpus"
    return {
        "output_dir": str(run),
        "model": {**preset.model, "max_position_embeddings": preset.seq_len, **model},
        "data": {
            "seq_len": preset.seq_len,
            "seed": seed,
            "skip_blocks": skip_blocks,
            "validation_documents": 100,
            "corpus": {"path": str(corpus), "num_tokens": preset.corpus_tokens, "seed": 0},
            "sources": [
                {"name": source, "weight": weight, "files": str(corpus / source / "*.jsonl")}
                for source, weight in (("web", 0.682), ("wiki", 0.205), ("arxiv", 0.114))
            ],
        },
        "tokenizer": {"path": str(output / "tokenizer"), "train": {"vocab_size": preset.vocab_size}},
        "train": {**preset.train, "seed": seed, "resume": "auto", **train},
        "eval": {"every": preset.train["save_every"], "batches": 8},
    }


def pretrain_variant(recipe: dict, timing: Path) -> None:
    """Train one run unless it finished before, and record its wall time in `timing` (JSON, by run directory).
    Validated here: an upcycled run's recipe reads the dense run's export."""
    recipe = validate_recipe(recipe)
    output_dir = Path(recipe["output_dir"])
    summary = output_dir / "summary.json"
    if summary.is_file() and json.loads(summary.read_text())["step"] >= recipe["train"]["max_steps"]:
        print(f"[demo] {output_dir.parent.name}/{output_dir.name}: already trained, skipping")
        return
    started = time.perf_counter()
    Trainer(recipe).run()
    seconds = json.loads(timing.read_text()) if timing.is_file() else {}
    seconds[str(output_dir)] = seconds.get(str(output_dir), 0.0) + time.perf_counter() - started
    timing.write_text(json.dumps(seconds, indent=1))


def score_run(checkpoint: Path, cache: Path, seq_len: int) -> dict:
    if cache.is_file():
        return json.loads(cache.read_text())
    row = evaluate([str(checkpoint)], list(TASK_NAMES), cache.parent / cache.stem, seq_len=seq_len)[0]
    cache.parent.mkdir(parents=True, exist_ok=True)
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
    """The upcycled run's start (rebuilt from the dense export) against the export, and its routing at the start
    and at the end."""
    from transformers import AutoModelForCausalLM

    recipe = validate_recipe(recipe)
    section = recipe["model"]
    config = model_config(section, recipe["data"]["seq_len"])
    batch = recipe["train"]["micro_batch_size"]
    dense = AutoModelForCausalLM.from_pretrained(section["init_from"])
    start = upcycled_model(section["init_from"], config, upcycle_options(section))
    end = AutoModelForCausalLM.from_pretrained(Path(recipe["output_dir"]) / "final")
    return {
        "dense_val_loss": mean_lm_loss(dense, validation, batch),
        "start_val_loss": mean_lm_loss(start, validation, batch),
        "start": routing_diagnostics(start, validation, batch, DIAGNOSTIC_CAPACITY),
        "end": routing_diagnostics(end, validation, batch, DIAGNOSTIC_CAPACITY),
    }


def summarize(variant: str, rows: list[dict]) -> dict:
    """One variant over its seeds: sizes from the first row, mean and sample standard deviation of the losses and
    of every task's accuracy."""
    first = rows[0]
    return {
        "variant": variant,
        "name": run_name(variant),
        **{key: first[key] for key in ("params", "active_params", "flops_per_token")},
        "seeds": [row["seed"] for row in rows],
        "val_loss": mean_and_sd([row["val_loss"] for row in rows]),
        "train_loss": mean_and_sd([row["train_loss"] for row in rows]),
        "scores": {task: mean_and_sd([row["scores"][task]["value"] for row in rows]) for task in TASK_NAMES},
        "average": mean_and_sd([row["average"] for row in rows]),
        "runs": rows,
    }


def run_demo(
    output: str | Path = "runs/demo", preset_name: str | None = None, seeds: tuple[int, ...] | None = None
) -> str:
    """Run the preset (the hardware's default if None) with its seeds or `seeds`; return the report."""
    preset_name = preset_name or default_preset()
    if preset_name not in PRESETS:
        raise InputError(f"unknown preset {preset_name!r}: choose one of {sorted(PRESETS)}")
    preset = PRESETS[preset_name]
    if seeds is not None:
        if not seeds or len(set(seeds)) != len(seeds):
            raise InputError(f"seeds {list(seeds)} must be distinct, and at least one")
        preset = replace(preset, seeds=seeds)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    print(f"[demo] preset {preset_name}: {preset.description}; writing to {output}")
    recipes = {seed: variant_recipes(preset, output, seed) for seed in preset.seeds}
    timing = output / "training_seconds.json"
    for seed, by_variant in recipes.items():
        for variant, recipe in by_variant.items():
            print(f"[demo] seed {seed}: pretraining {variant}")
            pretrain_variant(recipe, timing)
    training_minutes = sum(json.loads(timing.read_text()).values()) / 60

    any_recipe = validate_recipe(recipes[preset.seeds[0]]["dense"])
    validation = validation_blocks(any_recipe)
    rows: dict[str, list[dict]] = {}
    for seed, by_variant in recipes.items():
        for variant, recipe in by_variant.items():
            print(f"[demo] seed {seed}: scoring {variant} with lm-eval")
            run = Path(recipe["output_dir"])
            row = score_run(run / "final", output / "scores" / run_name(variant) / f"seed-{seed}.json", preset.seq_len)
            rows.setdefault(variant, []).append({**row, "seed": seed})
    summaries = [summarize(variant, variant_rows) for variant, variant_rows in rows.items()]

    first_seed = recipes[preset.seeds[0]]
    loads = {}
    for variant, recipe in first_seed.items():
        variant_loads = expert_loads(Path(recipe["output_dir"]) / "final", validation)
        if variant_loads is not None:
            loads[variant] = variant_loads
    if loads:
        plot_expert_loads(loads, output / "expert_load.png")
        (output / "expert_load.json").write_text(json.dumps(loads, indent=1))
    flops = {summary["variant"]: summary["flops_per_token"] for summary in summaries}
    plot_loss_against_flops(
        {variant: [Path(recipes[seed][variant]["output_dir"]) for seed in preset.seeds] for variant in rows},
        flops,
        output / "loss_vs_flops.png",
    )
    upcycling = None
    if preset.upcycled:
        name = preset.upcycled + UPCYCLED_SUFFIX
        per_seed = [upcycling_diagnostics(recipes[seed][name], validation) for seed in preset.seeds]
        upcycling = {"variant": name, "at_step": half_step(preset), "diagnostics": per_seed}
    context = {
        "preset": preset_name,
        "description": preset.description,
        "seeds": list(preset.seeds),
        "training_minutes": training_minutes,
        "train": preset.train,
        "seq_len": preset.seq_len,
    }
    report = write_report(output, context, summaries, upcycling)
    print(report)
    print(f"[demo] wrote {output / 'report.md'}, results.json, loss_vs_flops.png and expert_load.png")
    return report
