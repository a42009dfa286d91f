"""Zero-shot scoring with lm-evaluation-harness, side by side in the layout of the paper's Table 7."""

import functools
import json
import logging
import socket
from pathlib import Path

import torch

from ..accounting import count_parameters, flops_per_token
from ..errors import InputError
from ..saved_models import check_weights, load_saved_config
from ..training.metrics import read_metrics
from ..training.tokenizer import has_tokenizer
from .offline_tasks import TASK_NAMES

# The paper's zero-shot tasks (Table 7) by their lm-eval names; SST-2 is fine-tuned instead.
PAPER_TASKS = ("arc_easy", "boolq", "hellaswag")
HUB_ADDRESS = ("huggingface.co", 443)
# The offline tasks about the embedded corpus's world: lm-eval task folders shipped with the package.
OFFLINE_TASKS_DIR = Path(__file__).resolve().parent / "tasks"


class EvalError(InputError):
    """A checkpoint or task that cannot be scored; the message names it and says what to do."""


def reported_metric(task: str, metrics: dict) -> tuple[str, float]:
    """HellaSwag-shaped tasks report length-normalised accuracy (as usually quoted), others accuracy."""
    name = "acc_norm" if "hellaswag" in task and "acc_norm,none" in metrics else "acc"
    return name, metrics[f"{name},none"]


class OfflineTaskNotice(logging.Filter):
    """Drops lm-eval's notice, logged for every task that loads its data with a function (as the offline tasks
    do), that such tasks take custom kwargs: it is repeated per task and per checkpoint and asks nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed to `--metadata`" not in record.getMessage()


@functools.lru_cache(maxsize=4)
def task_manager(include_path: str | Path | None, offline_tasks_dir: str | Path = OFFLINE_TASKS_DIR):
    """lm-eval's task index (slow to build: it reads every task YAML), once per include path and offline tasks
    folder."""
    from lm_eval.tasks import TaskManager

    task_logger = logging.getLogger("lm_eval.api.task")
    if not any(isinstance(f, OfflineTaskNotice) for f in task_logger.filters):
        task_logger.addFilter(OfflineTaskNotice())

    paths = [str(p) for p in (include_path, offline_tasks_dir) if p is not None and Path(p).is_dir()]
    if include_path is not None and not Path(include_path).is_dir():
        raise EvalError(f"--include-path {str(include_path)!r} is not a directory")
    return TaskManager(include_path=paths or None)


def hub_reachable(timeout: float = 3.0) -> bool:
    try:
        socket.create_connection(HUB_ADDRESS, timeout=timeout).close()
    except OSError:
        return False
    return True


def use_cache_only() -> None:
    """Switch the hub clients to offline mode for this process, so data is read from the cache without the
    retries (half a minute) they spend on an unreachable hub."""
    import datasets.config
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True


def check_tasks(manager, tasks: list[str]) -> None:
    """Every task must be known, named once and its data loadable, before any model is loaded."""
    if not tasks:
        raise EvalError("no task given (--tasks): name at least one, e.g. pnet_arc,pnet_boolq,pnet_hellaswag")
    repeated = sorted({task for task in tasks if tasks.count(task) > 1})
    if repeated:
        raise EvalError(f"--tasks names {', '.join(repeated)} more than once")
    for task in tasks:
        if task not in manager.all_tasks:
            raise EvalError(
                f"unknown task {task!r}: not an lm-eval task nor one under --include-path "
                f"(offline tasks: pnet_arc, pnet_boolq, pnet_hellaswag)"
            )
    if any(task not in TASK_NAMES for task in tasks) and not hub_reachable():
        use_cache_only()
    for task in tasks:
        try:
            manager.load([task])
        except Exception as error:
            raise EvalError(
                f"task {task!r} could not load its data ({error.__class__.__name__}: {str(error).splitlines()[0]}). "
                "It is read from the Hugging Face hub: run once with network access to fill the HF datasets "
                "cache (or copy a filled cache here and set HF_DATASETS_CACHE), or score the offline tasks "
                "with --tasks pnet_arc,pnet_boolq,pnet_hellaswag."
            ) from error


def run_summary(checkpoint: Path) -> dict:
    """Final train and validation loss from the metrics.jsonl of the run that wrote `checkpoint`."""
    metrics_path = checkpoint.parent / "metrics.jsonl"
    if not metrics_path.is_file():
        return {"train_loss": None, "val_loss": None}
    lines = read_metrics(metrics_path)
    val_losses = [line["val_loss"] for line in lines if line.get("val_loss") is not None]
    return {"train_loss": lines[-1]["lm_loss"] if lines else None, "val_loss": val_losses[-1] if val_losses else None}


def checkpoint_name(checkpoint: Path) -> str:
    return checkpoint.parent.name if checkpoint.name == "final" else checkpoint.name


def evaluate_checkpoint(
    checkpoint: Path, config, tasks: list[str], manager, batch_size: int, limit: int | None, seq_len: int | None
) -> dict:
    import lm_eval

    params = count_parameters(config)
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(checkpoint), "trust_remote_code": True, "dtype": "auto"},
        tasks=tasks,
        task_manager=manager,
        batch_size=batch_size,
        limit=limit,
        device="cuda" if torch.cuda.is_available() else "cpu",
        log_samples=False,
    )
    scores = {}
    for task in tasks:
        metric, value = reported_metric(task, results["results"][task])
        scores[task] = {
            "metric": metric,
            "value": value,
            "stderr": results["results"][task].get(f"{metric}_stderr,none"),
        }
    return {
        "name": checkpoint_name(checkpoint),
        "checkpoint": str(checkpoint),
        "params": params["total"],
        "active_params": params["active"],
        "flops_per_token": flops_per_token(config, seq_len or config.max_position_embeddings),
        "flops_seq_len": seq_len or config.max_position_embeddings,
        **run_summary(checkpoint),
        "scores": scores,
        "average": sum(score["value"] for score in scores.values()) / len(scores),
        "lm_eval": {task: results["results"][task] for task in tasks},
    }


def format_table(rows: list[dict], tasks: list[str]) -> str:
    """Markdown in Table 7's layout: one row per checkpoint, accuracies in percent."""

    def number(value, digits):
        return "-" if value is None else f"{value:.{digits}f}"

    lengths = {row.get("flops_seq_len") for row in rows}  # the context the attention FLOPs assume
    header = [
        "model",
        "params",
        "active params",
        "GFLOPs/token"
        + (f" (seq {lengths.pop()})" if len(lengths := {row.get("flops_seq_len") for row in rows}) == 1 else ""),
        "train loss",
        "val loss",
        *[f"{task} ({rows[0]['scores'][task]['metric']})" for task in tasks],
        "avg",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            row["name"],
            f"{row['params'] / 1e6:.2f}M",
            f"{row['active_params'] / 1e6:.2f}M",
            f"{row['flops_per_token'] / 1e9:.4f}",
            number(row["train_loss"], 3),
            number(row["val_loss"], 3),
            *[f"{100 * row['scores'][task]['value']:.2f}" for task in tasks],
            f"{100 * row['average']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def evaluate(
    checkpoints: list[str],
    tasks: list[str],
    output: str | Path,
    include_path: str | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    seq_len: int | None = None,
    offline_tasks_dir: str | Path = OFFLINE_TASKS_DIR,
) -> list[dict]:
    """Score every checkpoint on every task; write output/results.json and output/table.md. The offline tasks are
    read from `offline_tasks_dir` (a copy of the shipped folder may hold the questions of another world)."""
    paths = [Path(checkpoint) for checkpoint in checkpoints]
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise EvalError(f"--output {str(output)!r} is a file, not a directory")
    configs = [load_saved_config(path) for path in paths]
    for path in paths:
        if not has_tokenizer(path):
            raise EvalError(f"checkpoint {str(path)!r} holds no tokenizer (tokenizer.json or tokenizer.model)")
        check_weights(path)
    manager = task_manager(include_path, offline_tasks_dir)
    check_tasks(manager, tasks)
    rows = [
        evaluate_checkpoint(path, config, tasks, manager, batch_size, limit, seq_len)
        for path, config in zip(paths, configs, strict=True)
    ]
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(json.dumps({"tasks": tasks, "rows": rows}, indent=1, default=str))
    (output / "table.md").write_text(format_table(rows, tasks))
    return rows
