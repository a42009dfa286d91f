"""The demo's report: Table 7-style scores, what they say, and plots of the losses and the expert loads."""

import json
from pathlib import Path

import torch

from ..evaluation.harness import format_table
from ..evaluation.offline_tasks import CHANCE


def plot_losses(
    runs: dict[str, Path],
    path: Path,
    offsets: dict[str, int] | None = None,
    title: str = "Same FLOPs, same data: dense LLaMA vs ParameterNet",
) -> None:
    """Train and validation loss of every run against its training tokens (plus its offset: tokens a run it
    continues trained on)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    for index, (variant, run_dir) in enumerate(runs.items()):
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        color = f"C{index}"
        offset = (offsets or {}).get(variant, 0)
        axis.plot(
            [(offset + m["tokens"]) / 1e6 for m in lines],
            [m["lm_loss"] for m in lines],
            color=color,
            label=f"{variant} train",
        )
        validated = [m for m in lines if m.get("val_loss") is not None]
        axis.plot(
            [(offset + m["tokens"]) / 1e6 for m in validated],
            [m["val_loss"] for m in validated],
            "o--",
            color=color,
            label=f"{variant} validation",
        )
    axis.set_xlabel("training tokens (millions)")
    axis.set_ylabel("language-model loss")
    axis.set_yscale("log")
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_expert_loads(loads: dict[str, dict[str, list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(loads), figsize=(4.5 * len(loads), 4), squeeze=False)
    for axis, (variant, per_linear) in zip(axes[0], loads.items(), strict=True):
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


# The paper's Table 7 (LLaMA-1B, about 90B tokens), 4 / 8 experts in each routed row.
PAPER_TABLE7 = "\n".join(
    [
        "| model (paper) | params | train loss | ARC-e | BoolQ | SST-2 | HellaSwag | avg |",
        "|---|---|---|---|---|---|---|---|",
        "| LLaMA-1B | 0.94B | 1.86 | 47.99 | 57.31 | 88.53 | 38.92 | 58.19 |",
        "| MoE on gate | 1.54B / 2.35B | 1.75 / 1.64 | 48.81 / 49.04 | 57.86 / 57.70 | 88.88 / 89.56 | 42.09 / 43.78 "
        "| 59.41 / 60.02 |",
        "| MoE on up | 1.54B / 2.35B | 1.72 / 1.61 | 49.09 / 49.58 | 58.04 / 58.39 | 89.67 / 90.05 | 42.35 / 44.21 "
        "| 59.79 / 60.56 |",
        "| MoE on down | 1.54B / 2.35B | 1.70 / 1.62 | 49.36 / 49.22 | 57.99 / 58.58 | 89.13 / 90.34 | 41.95 / 43.60 "
        "| 59.61 / 60.44 |",
        "",
    ]
)


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
        f"model at the same FLOPs."
        + (
            " The paper's claim holds here."
            if len(better) == len(rows) - 1
            else " The paper's claim does not hold for every variant at this scale."
        )
    )
    return lines


def upcycling_section(upcycling: dict, tasks: list[str]) -> list[str]:
    """The continued-training comparison: dense continued, upcycled, and from scratch on the same tokens."""
    rows = {row["variant"]: row for row in upcycling["rows"]}
    dense, continued = rows["dense"], rows["dense, continued"]
    upcycled = next(row for variant, row in rows.items() if variant.endswith("upcycled"))
    scratch = next(row for variant, row in rows.items() if variant.endswith("from scratch"))
    steps, millions = upcycling["steps"], upcycling["tokens"] / 1e6
    diagnostics = upcycling["diagnostics"]
    start, end = diagnostics["step_0"], diagnostics["end"]

    def versus(row, other) -> str:
        delta = row["val_loss"] - other["val_loss"]
        return (
            f"validation loss {row['val_loss']:.3f} vs {other['val_loss']:.3f} ({'lower' if delta < 0 else 'higher'} "
            f"by {abs(delta):.3f}), average accuracy {100 * row['average']:.2f} vs {100 * other['average']:.2f}"
        )

    return [
        "## Upcycling: does it pay?",
        "",
        f"`{dense['name']}` ({millions:.2f}M tokens) trained on for {steps} more steps (new warm-up and cosine "
        f"schedule) on the {millions:.2f}M tokens that follow the ones it saw: as it is (`{continued['name']}`) and "
        f"upcycled (`{upcycled['name']}`: every expert a copy of its projection, straight-through scale, dropless); "
        f"beside the same routing trained from scratch on all {2 * millions:.2f}M tokens (`{scratch['name']}`).",
        "",
        format_table(list(rows.values()), tasks),
        f"- Step 0: the upcycled model's validation loss {diagnostics['step_0_val_loss']:.4f}, the dense "
        f"checkpoint's {diagnostics['dense_val_loss']:.4f}.",
        f"- Upcycled vs dense, both continued: {versus(upcycled, continued)}.",
        f"- Upcycled vs from scratch on the same tokens: {versus(upcycled, scratch)}.",
        f"- Symmetry breaking: the experts' mean pairwise cosine distance {start['expert_divergence']:.2e} at step 0, "
        f"{end['expert_divergence']:.2e} after {steps} steps; load-balancing loss {start['aux_loss']:.3f} then "
        f"{end['aux_loss']:.3f} (1 when balanced); the busiest expert's share of tokens "
        f"{start['expert_load_max']:.3f} then {end['expert_load_max']:.3f} (balanced: {1 / start['num_experts']:.3f}); "
        f"capacity factor {start['capacity_factor']} would drop {100 * start['dropped_at_capacity']:.1f}% of tokens at "
        f"step 0 and {100 * end['dropped_at_capacity']:.1f}% after (the upcycled model trains dropless).",
        "",
        "Plot: `upcycling.png` (losses against all the tokens each model has seen).",
        "",
    ]


def write_report(
    output: Path, preset_name: str, description: str, rows: list[dict], upcycling: dict | None = None
) -> str:
    tasks = list(rows[0]["scores"])
    chance = ", ".join(f"{task} {100 * CHANCE[task]:.0f}%" for task in tasks)
    report = "\n".join(
        [
            f"# ParameterNet in miniature (preset `{preset_name}`: {description})",
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
            *(upcycling_section(upcycling, tasks) if upcycling else []),
            "For reference, the paper's Table 7 (not measured here):",
            "",
            PAPER_TABLE7,
        ]
    )
    (output / "report.md").write_text(report)
    (output / "results.json").write_text(
        json.dumps({"preset": preset_name, "tasks": tasks, "rows": rows, "upcycling": upcycling}, indent=1, default=str)
    )
    return report
