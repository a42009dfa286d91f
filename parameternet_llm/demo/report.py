"""The demo's report: Table 7-style scores with the mean and spread over seeds, what they say, and the plots."""

import json
import math
from pathlib import Path

import torch

from ..evaluation.offline_tasks import CHANCE
from ..training.metrics import read_metrics

# Training FLOPs per token are 3x the forward's (forward, and the backward's two products).
TRAINING_FLOPS_PER_FORWARD = 3


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def mean_and_sd(values: list[float]) -> dict:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "sd": sd, "n": len(values), "values": values}


def plot_loss_against_flops(runs: dict[str, list[Path]], flops_per_token: dict[str, float], path: Path) -> None:
    """Validation loss (mean over seeds, bars: their standard deviation) and the mean train loss of every
    variant against its training FLOPs."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(9, 5.5))
    shown = []  # the losses the plot must show: validation means, and the train loss where it ends
    for index, (variant, run_dirs) in enumerate(runs.items()):
        color = f"C{index}"
        per_seed = [read_metrics(d / "metrics.jsonl") for d in run_dirs]
        scale = TRAINING_FLOPS_PER_FORWARD * flops_per_token[variant] / 1e12
        steps = sorted(set.intersection(*({m["step"] for m in lines} for lines in per_seed)))
        by_step = [{m["step"]: m for m in lines} for lines in per_seed]
        tokens = [by_step[0][step]["tokens"] * scale for step in steps]
        train = [sum(seed[step]["lm_loss"] for seed in by_step) / len(by_step) for step in steps]
        axis.plot(tokens, train, color=color, alpha=0.45, linewidth=1, label=f"{variant}: train (mean)")
        shown.append(train[-1])
        validated = [step for step in steps if by_step[0][step].get("val_loss") is not None]
        values = [[seed[step]["val_loss"] for seed in by_step] for step in validated]
        stats = [mean_and_sd(v) for v in values]
        means = [stat["mean"] for stat in stats]
        shown += means
        axis.errorbar(
            [by_step[0][step]["tokens"] * scale for step in validated],
            means,
            yerr=[stat["sd"] for stat in stats],
            color=color,
            marker="o",
            capsize=3,
            linewidth=2,
            label=f"{variant}: validation (mean ± sd over {len(run_dirs)} seeds)",
        )
    axis.set_xlabel("training compute (TFLOPs: 3 x forward FLOPs per token x tokens)")
    axis.set_ylabel("language-model loss (nats per token)")
    axis.set_title("Loss against training compute: dense LLaMA vs ParameterNet at the same FLOPs per token")
    axis.set_ylim(0.95 * min(shown), 1.1 * max(shown))  # the early, steep part is cut
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_expert_loads(loads: dict[str, dict[str, list[float]]], path: Path) -> None:
    """A heatmap per routed variant: the share of validation tokens each expert of each routed linear takes."""
    plt = pyplot()
    rows = max(map(len, loads.values()))
    figure, axes = plt.subplots(1, len(loads), figsize=(6 * len(loads), max(3.2, 1.6 + 0.45 * rows)))
    axes = [axes] if len(loads) == 1 else list(axes)
    for axis, (variant, per_linear) in zip(axes, loads.items(), strict=True):
        names = list(per_linear)
        shares = torch.tensor([per_linear[name] for name in names])
        balanced = 1 / shares.shape[1]
        image = axis.imshow(shares, cmap="RdBu_r", vmin=0, vmax=2 * balanced, aspect="auto")
        for row in range(shares.shape[0]):
            for expert in range(shares.shape[1]):
                axis.text(expert, row, f"{100 * shares[row, expert]:.0f}", ha="center", va="center", fontsize=7)
        axis.set_xticks(range(shares.shape[1]))
        axis.set_yticks(range(len(names)), [name.removeprefix("model.layers.").replace(".mlp.", " ") for name in names])
        axis.set_xlabel("expert")
        axis.set_ylabel("layer and routed projection")
        axis.set_title(f"{variant}: % of tokens per expert")
        figure.colorbar(image, ax=axis, label=f"share (white: {100 * balanced:.1f}%, balanced)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def difference(a: dict, b: dict) -> tuple[float, float]:
    """(mean of a - mean of b, two standard errors of that difference over the seeds)."""
    return a["mean"] - b["mean"], 2 * math.sqrt(a["sd"] ** 2 / a["n"] + b["sd"] ** 2 / b["n"])


def judged(delta: float, margin: float, lower_is_better: bool) -> str:
    if abs(delta) <= margin:
        return "within the spread"
    return "better" if (delta < 0) == lower_is_better else "worse"


def cell(stats: dict, scale: float = 1.0, digits: int = 3) -> str:
    return f"{scale * stats['mean']:.{digits}f} ± {scale * stats['sd']:.{digits}f}"


def results_table(summaries: list[dict]) -> str:
    tasks = list(summaries[0]["scores"])
    header = ["model", "params", "active", "GFLOPs/token", "val loss", *tasks, "avg"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for summary in summaries:
        lines.append(
            "| "
            + " | ".join(
                [
                    summary["variant"],
                    f"{summary['params'] / 1e6:.3f}M",
                    f"{summary['active_params'] / 1e6:.3f}M",
                    f"{summary['flops_per_token'] / 1e9:.5f}",
                    cell(summary["val_loss"]),
                    *[cell(summary["scores"][task], 100, 1) for task in tasks],
                    cell(summary["average"], 100, 1),
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def verdict(summaries: list[dict]) -> list[str]:
    """Each variant against the dense model: a difference counts only beyond two standard errors of it."""
    dense = next(summary for summary in summaries if summary["variant"] == "dense")
    lines = []
    for summary in summaries:
        if summary is dense:
            continue
        loss_delta, loss_margin = difference(summary["val_loss"], dense["val_loss"])
        accuracy_delta, accuracy_margin = difference(summary["average"], dense["average"])
        lines.append(
            f"- {summary['variant']}: {summary['params'] / dense['params']:.2f}x the parameters at "
            f"{summary['flops_per_token'] / dense['flops_per_token']:.3f}x the FLOPs per token. Validation loss "
            f"{loss_delta:+.3f} against dense (two standard errors: {loss_margin:.3f}): "
            f"{judged(loss_delta, loss_margin, True)}. Average accuracy {100 * accuracy_delta:+.1f} points "
            f"(two standard errors: {100 * accuracy_margin:.1f}): {judged(accuracy_delta, accuracy_margin, False)}."
        )
    return lines


def upcycling_lines(upcycling: dict) -> list[str]:
    per_seed = upcycling["diagnostics"]

    def mean(key: str, part: str | None = None) -> float:
        values = [(seed[part] if part else seed)[key] for seed in per_seed]
        return sum(values) / len(values)

    return [
        f"Upcycled row: each seed's dense run, exported at step {upcycling['at_step']}, becomes "
        f"`{upcycling['variant'].split(',')[0]}` (every expert a copy, straight-through scale, dropless) and "
        "trains on for the rest of the same schedule, on the blocks the dense run would have read next. At the "
        f"switch its validation loss is {mean('start_val_loss'):.4f}, the dense export's {mean('dense_val_loss'):.4f} "
        f"(means over seeds). Its experts' mean pairwise cosine distance goes from "
        f"{mean('expert_divergence', 'start'):.1e} to {mean('expert_divergence', 'end'):.3f}, its load-balancing "
        f"loss from {mean('aux_loss', 'start'):.3f} to {mean('aux_loss', 'end'):.3f} (1 when balanced), and the "
        f"busiest expert's share of tokens from {mean('expert_load_max', 'start'):.3f} to "
        f"{mean('expert_load_max', 'end'):.3f} (balanced: {1 / per_seed[0]['start']['num_experts']:.3f}).",
        "",
    ]


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


def write_report(output: Path, context: dict, summaries: list[dict], upcycling: dict | None = None) -> str:
    train = context["train"]
    tokens = train["max_steps"] * train["micro_batch_size"] * context["seq_len"]
    chance = ", ".join(f"{task} {100 * CHANCE[task]:.0f}%" for task in summaries[0]["scores"])
    report = "\n".join(
        [
            f"# ParameterNet in miniature (preset `{context['preset']}`: {context['description']})",
            "",
            f"Every model: {train['max_steps']} steps of {train['micro_batch_size']} x {context['seq_len']} tokens "
            f"({tokens / 1e6:.2f}M tokens), the same corpus, tokenizer and schedule; seed s sets the initialisation "
            f"and the data order, the same for every variant. Seeds: {context['seeds']}. Training took "
            f"{context['training_minutes']:.1f} minutes here. Values are mean ± standard deviation over the seeds; "
            "accuracies are zero-shot lm-eval scores (in %) on the offline tasks about the corpus's world, 500 "
            f"questions each (chance: {chance}).",
            "",
            results_table(summaries),
            "What this run measured (a difference counts when it exceeds two standard errors of the difference "
            "over the seeds):",
            "",
            *verdict(summaries),
            "",
            *(upcycling_lines(upcycling) if upcycling else []),
            "Plots: `loss_vs_flops.png` (losses against training compute), `expert_load.png` (each expert's share of "
            "tokens in every routed linear, first seed).",
            "",
            "For reference, the paper's Table 7 (LLaMA-1B, about 90B tokens; not measured here):",
            "",
            PAPER_TABLE7,
        ]
    )
    (output / "report.md").write_text(report)
    (output / "results.json").write_text(
        json.dumps({**context, "variants": summaries, "upcycling": upcycling}, indent=1, default=str)
    )
    return report
