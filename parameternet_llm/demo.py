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

from .configuration_parameternet_llama import MOE_PROJECTIONS
from .data import build_pretraining_data, open_sources
from .errors import InputError
from .evaluation import OFFLINE_TASKS_DIR, evaluate, format_table
from .recipe import validate_recipe
from .tasks import CHANCE, TASK_NAMES
from .tokenizer import load_tokenizer
from .train import Trainer


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


UP_PROJ_VARIANTS = {
    "dense": {"dense": True},
    "up_proj x4": {"num_experts": 4, "moe_projections": ["up_proj"]},
    "up_proj x8": {"num_experts": 8, "moe_projections": ["up_proj"]},
}
TABLE7_VARIANTS = {
    "dense": {"dense": True},
    **{f"{projection} x{experts}": {"num_experts": experts, "moe_projections": [projection]}
       for projection in MOE_PROJECTIONS for experts in (4, 8)},
}

PRESETS = {
    "cpu": Preset(
        description="2-core CPU, about 15 minutes: dense vs 4 and 8 experts on up_proj",
        model=dict(hidden_size=128, intermediate_size=344, num_attention_heads=4, num_hidden_layers=4),
        corpus_tokens=3_000_000, vocab_size=4096, seq_len=256,
        train=dict(max_steps=300, micro_batch_size=8, lr=2.0e-3, warmup_steps=30, log_every=10, save_every=100),
        variants=UP_PROJ_VARIANTS,
    ),
    "gpu": Preset(
        description="one GPU: a 30M-token corpus, a 512-wide 8-layer LLaMA, all seven Table 7 rows",
        model=dict(hidden_size=512, intermediate_size=1376, num_attention_heads=8, num_hidden_layers=8),
        corpus_tokens=30_000_000, vocab_size=8192, seq_len=512,
        train=dict(max_steps=2000, micro_batch_size=32, lr=1.0e-3, warmup_steps=100, log_every=20, save_every=500),
        variants=TABLE7_VARIANTS,
    ),
}


PRESETS["cpu-table7"] = replace(
    PRESETS["cpu"], description="CPU, about 35 minutes: dense vs 4 and 8 experts on each of gate, up and down",
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
    return validate_recipe({
        "output_dir": str(output / "runs" / run_name(variant)),
        "model": model,
        "data": {
            "seq_len": preset.seq_len,
            "corpus": {"path": str(corpus), "num_tokens": preset.corpus_tokens, "seed": 0},
            "sources": [{"name": source, "weight": weight, "files": str(corpus / source / "*.jsonl")}
                        for source, weight in (("web", 0.682), ("wiki", 0.205), ("arxiv", 0.114))],
        },
        "tokenizer": {"path": str(output / "tokenizer"), "train": {"vocab_size": preset.vocab_size}},
        "train": {**preset.train, "resume": "auto"},
        "eval": {"every": preset.train["save_every"], "batches": 4},
    })


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
    return build_pretraining_data(open_sources(data["sources"]), tokenizer, data["seq_len"], data["seed"],
                                  data["validation_documents"], blocks).validation


def expert_loads(checkpoint: Path, validation: list[torch.Tensor]) -> dict[str, list[float]] | None:
    """Mean expert shares of every routed linear over the validation blocks (None for a dense model)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    if not hasattr(model, "routing_stats"):
        return None
    totals: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for block in validation:
            for name, stats in model.routing_stats(model(block.unsqueeze(0))).items():
                totals[name] = totals.get(name, 0) + stats["load"]
    return {name: (total / len(validation)).tolist() for name, total in totals.items()}


def plot_losses(runs: dict[str, Path], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    for index, (variant, run_dir) in enumerate(runs.items()):
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        color = f"C{index}"
        axis.plot([m["tokens"] / 1e6 for m in lines], [m["lm_loss"] for m in lines], color=color, label=f"{variant} train")
        validated = [m for m in lines if m.get("val_loss") is not None]
        axis.plot([m["tokens"] / 1e6 for m in validated], [m["val_loss"] for m in validated], "o--", color=color,
                  label=f"{variant} validation")
    axis.set_xlabel("training tokens (millions)")
    axis.set_ylabel("language-model loss")
    axis.set_yscale("log")
    axis.set_title("Same FLOPs, same data: dense LLaMA vs ParameterNet")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_expert_loads(loads: dict[str, dict[str, list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(loads), figsize=(4.5 * len(loads), 4), squeeze=False)
    for axis, (variant, per_linear) in zip(axes[0], loads.items()):
        names = list(per_linear)
        shares = torch.tensor([per_linear[name] for name in names])
        bottom = torch.zeros(len(names))
        for expert in range(shares.shape[1]):
            axis.bar(range(len(names)), shares[:, expert], bottom=bottom, label=f"expert {expert}")
            bottom += shares[:, expert]
        for level in torch.arange(1, shares.shape[1]) / shares.shape[1]:
            axis.axhline(level.item(), color="black", linewidth=0.5, linestyle=":")
        axis.set_xticks(range(len(names)), [name.split(".")[2] for name in names])
        axis.set_xlabel("layer")
        axis.set_ylabel("share of tokens (dotted: perfect balance)")
        axis.set_title(variant)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


PAPER_TABLE7 = """| model (paper, LLaMA-1B, ~90B tokens) | params | train loss | ARC-e | BoolQ | SST-2 | HellaSwag | avg |
|---|---|---|---|---|---|---|---|
| LLaMA-1B | 0.94B | 1.86 | 47.99 | 57.31 | 88.53 | 38.92 | 58.19 |
| MoE on gate, 4 / 8 experts | 1.54B / 2.35B | 1.75 / 1.64 | 48.81 / 49.04 | 57.86 / 57.70 | 88.88 / 89.56 | 42.09 / 43.78 | 59.41 / 60.02 |
| MoE on up, 4 / 8 experts | 1.54B / 2.35B | 1.72 / 1.61 | 49.09 / 49.58 | 58.04 / 58.39 | 89.67 / 90.05 | 42.35 / 44.21 | 59.79 / 60.56 |
| MoE on down, 4 / 8 experts | 1.54B / 2.35B | 1.70 / 1.62 | 49.36 / 49.22 | 57.99 / 58.58 | 89.13 / 90.34 | 41.95 / 43.60 | 59.61 / 60.44 |
"""


def verdict(rows: list[dict]) -> list[str]:
    """What the numbers say, whichever way they come out."""
    dense = next(row for row in rows if row["name"] == "dense")
    lines = []
    for row in rows:
        if row is dense:
            continue
        loss_delta = row["val_loss"] - dense["val_loss"]
        accuracy_delta = 100 * (row["average"] - dense["average"])
        lines.append(
            f"- {row['variant']}: {row['params'] / dense['params']:.2f}x the parameters at "
            f"{row['flops_per_token'] / dense['flops_per_token']:.3f}x the FLOPs per token; validation loss "
            f"{row['val_loss']:.3f} vs {dense['val_loss']:.3f} ({'lower' if loss_delta < 0 else 'higher'} by "
            f"{abs(loss_delta):.3f}); average accuracy {100 * row['average']:.2f} vs {100 * dense['average']:.2f} "
            f"({accuracy_delta:+.2f} points)."
        )
    better = [row for row in rows if row is not dense and row["val_loss"] < dense["val_loss"]]
    lines.append(
        f"- {len(better)} of {len(rows) - 1} ParameterNet variants reached a lower validation loss than the dense "
        f"model at the same FLOPs." + (" The paper's claim holds here." if len(better) == len(rows) - 1 else
                                        " The paper's claim does not hold for every variant at this scale.")
    )
    return lines


def write_report(output: Path, preset_name: str, preset: Preset, rows: list[dict]) -> str:
    tasks = list(TASK_NAMES)
    chance = ", ".join(f"{task} {100 * CHANCE[task]:.0f}%" for task in tasks)
    report = "\n".join([
        f"# ParameterNet in miniature (preset `{preset_name}`: {preset.description})",
        "",
        "Same corpus, tokenizer, data order and schedule for every model; FLOPs per token are equal up to the "
        "routers. Accuracies are zero-shot lm-eval scores on the offline tasks about the corpus's world "
        f"(chance: {chance}).",
        "",
        format_table(rows, tasks),
        "What this run measured:",
        "",
        *verdict(rows),
        "",
        "Plots: `loss_curves.png` (train and validation loss of every model), `expert_load.png` (share of tokens "
        "per expert in every routed linear, on the validation data).",
        "",
        "For reference, the paper's Table 7 (not measured here):",
        "",
        PAPER_TABLE7,
    ])
    (output / "report.md").write_text(report)
    (output / "results.json").write_text(json.dumps({"preset": preset_name, "tasks": tasks, "rows": rows}, indent=1,
                                                    default=str))
    return report


def run_demo(output: str | Path = "runs/demo", preset_name: str | None = None) -> str:
    preset_name = preset_name or default_preset()
    if preset_name not in PRESETS:
        raise InputError(f"unknown preset {preset_name!r}: choose one of {sorted(PRESETS)}")
    if not OFFLINE_TASKS_DIR.is_dir():
        raise InputError(f"the offline task folder {OFFLINE_TASKS_DIR} is missing: run the demo from a source "
                         "checkout of parameternet-llm")
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
    plot_losses({variant: Path(recipe["output_dir"]) for variant, recipe in recipes.items()}, output / "loss_curves.png")
    if loads:
        plot_expert_loads(loads, output / "expert_load.png")
        (output / "expert_load.json").write_text(json.dumps(loads, indent=1))
    report = write_report(output, preset_name, preset, rows)
    print(report)
    print(f"[demo] wrote {output / 'report.md'}, results.json, loss_curves.png, expert_load.png")
    return report
