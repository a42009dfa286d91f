"""Pretraining with accelerate: `accelerate launch -m parameternet_llm.training --config RECIPE [key=value ...]`.

One CPU, one GPU or many GPUs and nodes: the process layout, DDP / FSDP / DeepSpeed and mixed
precision come from accelerate's config (see recipes/accelerate/). Each logging step appends a JSON
line to `output_dir/metrics.jsonl`; checkpoints are accelerate states written atomically under
`output_dir/checkpoints/`; the finished model is an HF checkpoint in `output_dir/final/`.
"""

import argparse
import errno
import json
import os
import shutil
import socket
import time
import zlib
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, set_seed
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, LlamaForCausalLM
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

from ..accounting import flops_per_token
from ..errors import InputError, user_message
from ..modeling_parameternet_llama import ParameterNetLlamaForCausalLM, expert_capacity
from ..presets import is_parameternet
from ..saved_models import check_weights, load_saved_config
from ..upcycling import read_checkpoint_config, upcycled_model
from .balance import expert_counts, global_aux_loss
from .data import Source, build_pretraining_data, open_recipe_sources, training_documents, unreadable_data
from .metrics import keep_logged_steps_up_to, read_metrics
from .recipe import RecipeError, flat_items, load_recipe, model_config, resume_changes, upcycle_options
from .tokenizer import has_tokenizer, load_tokenizer, train_tokenizer

logger = get_logger(__name__)
CHECKPOINT_PREFIX = "step-"
CHECKPOINT_MANIFEST = "manifest.json"
RUN_RECIPE = "recipe.json"  # the recipe and model config a checkpoint was saved with


class DivergedError(InputError):
    """Training produced a non-finite loss or gradient; the message names the steps and what to change."""


class SaveError(InputError):
    """A checkpoint or model could not be written (a full disk, most often); the last good checkpoint stays."""


DISK_NEARLY_FULL = 16 * 2**20  # bytes free under which a failed write is put down to a full disk


# Dense bf16 tensor-core peak per device, for MFU.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def prepare_tokenizer(recipe: dict, opened) -> object:
    section = recipe["tokenizer"]
    path = section["path"] or recipe["model"]["init_from"]
    if section["train"] is not None and not has_tokenizer(path):
        options = section["train"]
        documents = training_documents(opened, recipe["data"]["seed"], recipe["data"]["validation_documents"])
        texts = (document["text"] for document in documents.take(options.get("max_documents", 20000)))
        asked = options.get("vocab_size", 8000)
        tokenizer = train_tokenizer(texts, path, asked)
        if len(tokenizer) < asked:
            print(
                f"trained a {len(tokenizer)}-piece tokenizer in {path}: its documents support no more than that of "
                f"the {asked} asked for (tokenizer.train.vocab_size)"
            )
        return tokenizer
    return load_tokenizer(path)


def initial_model(model_section: dict, config) -> torch.nn.Module:
    """The model training starts from: newly initialised, or `model.init_from`'s weights (in float32), upcycled
    when the checkpoint is dense and the config is ParameterNet's."""
    init_from = model_section.get("init_from")
    if init_from is None:
        return AutoModelForCausalLM.from_config(config)
    if is_parameternet(config) and not is_parameternet(read_checkpoint_config(init_from)):
        return upcycled_model(init_from, config, upcycle_options(model_section))
    model_class = ParameterNetLlamaForCausalLM if is_parameternet(config) else LlamaForCausalLM
    return model_class.from_pretrained(init_from, config=config, dtype=torch.float32)


class OutputLock:
    """`output_dir/.lock`, naming the process that trains there: a second trainer on the same directory stops
    instead of interleaving checkpoints and metrics. A lock whose process is gone (on this host) is taken over."""

    def __init__(self, output_dir: Path):
        self.path = output_dir / ".lock"
        output_dir.mkdir(parents=True, exist_ok=True)
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        while True:
            try:
                with self.path.open("x") as stream:
                    json.dump(owner, stream)
                return
            except FileExistsError:
                holder = self.holder()
                if holder is not None and holder.get("pid") != os.getpid():  # this process's own: an earlier run
                    if self.alive(holder):
                        raise InputError(
                            f"{output_dir} is in use by process {holder['pid']} on {holder['host']} (since "
                            f"{holder['started']}); wait for it, or choose another output_dir. If that process is "
                            f"gone, delete {self.path}"
                        ) from None
                    logger.warning(f"taking over {self.path}, left by a process that is gone: {holder}")
                self.path.unlink(missing_ok=True)

    def holder(self) -> dict | None:
        """Who holds the lock; None for a lock that is unreadable or not one of ours (taken over)."""
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None

    @staticmethod
    def alive(holder: dict) -> bool:
        if holder.get("host") != socket.gethostname():
            return True  # cannot tell for another machine: assume it still trains
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def release(self) -> None:
        if (self.holder() or {}).get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)


def check_engine(accelerator: Accelerator) -> None:
    """Refuse a launch that asked for FSDP or DeepSpeed where accelerate runs neither: it falls back to plain data
    parallelism without a word on machines without accelerators (a config with use_cpu: true included)."""
    for engine, variable in (
        (DistributedType.FSDP, "ACCELERATE_USE_FSDP"),
        (DistributedType.DEEPSPEED, "ACCELERATE_USE_DEEPSPEED"),
    ):
        if os.environ.get(variable, "false").lower() == "true" and accelerator.distributed_type != engine:
            raise InputError(
                f"the accelerate config asks for {engine.value} ({variable}=true), but accelerate runs "
                f"{accelerator.distributed_type.value} here: it runs {engine.value} only on accelerators (GPUs), not "
                "on CPUs or with use_cpu: true. Use a data-parallel config on this machine."
            )


def optimizer_settings(train: dict) -> list[dict]:
    """AdamW's settings for its two parameter groups: the matrices (decayed), then the vectors (not decayed)."""
    common = {"lr": train["lr"], "betas": (train["adam_beta1"], train["adam_beta2"]), "eps": train["adam_eps"]}
    return [{**common, "weight_decay": train["weight_decay"]}, {**common, "weight_decay": 0.0}]


def learning_rate_schedule(optimizer, train: dict) -> LambdaLR:
    """Linear warm-up, then cosine decay to min_lr_ratio at max_steps. A run that starts at `start_step` (on
    weights another run trained that far) follows the rest of that schedule, warmed up again over warmup_steps
    because its optimizer state starts empty."""
    schedule = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, train["warmup_steps"], train["max_steps"], min_lr_rate=train["min_lr_ratio"]
    )
    start = train["start_step"]
    if start == 0:
        return schedule
    cosine = schedule.lr_lambdas[0]
    rewarm = max(1, train["warmup_steps"])
    return LambdaLR(optimizer, lambda step: cosine(start + step) * min(1.0, (step + 1) / rewarm))


def checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a save in progress lives under a dot-name until renamed)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX))


def resolve_resume(resume, output_dir: Path) -> Path | None:
    found = checkpoints(output_dir / "checkpoints")
    if resume is None:
        if found:
            raise RecipeError(
                f"{output_dir} already holds checkpoints ({found[-1].name}); set train.resume=auto to "
                "continue that run, or choose another output_dir"
            )
        return None
    if resume == "auto":
        for checkpoint in reversed(found):  # the newest intact one
            problem = checkpoint_problem(checkpoint)
            if problem is None:
                return checkpoint
            logger.warning(
                f"checkpoint {checkpoint} is damaged ({problem}); trying the one before it", main_process_only=False
            )
        if found:
            raise RecipeError(f"every checkpoint under {output_dir / 'checkpoints'} is damaged; none can be resumed")
        return None
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise RecipeError(f"train.resume={resume!r} is not a checkpoint directory (no trainer_state.json)")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise RecipeError(f"train.resume={resume!r} is damaged: {problem}")
    return path


def checkpoint_problem(path: Path) -> str | None:
    """What is wrong with a checkpoint, against the size and CRC-32 of each file its manifest recorded when it was
    saved (None: intact). Manifests of earlier versions recorded sizes only."""
    manifest = path / CHECKPOINT_MANIFEST
    try:
        json.loads((path / "trainer_state.json").read_text())
        recorded = json.loads(manifest.read_text()) if manifest.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"unreadable trainer state or manifest: {error}"
    for name, record in recorded.items():
        file = path / name
        size, crc = (record, None) if isinstance(record, int) else (record["size"], record["crc32"])
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} when saved"
        if crc is not None and file_crc32(file) != crc:
            return f"{name} has other contents than when saved (CRC-32 differs)"
    return None


def file_crc32(path: Path) -> int:
    crc = 0
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def mixed_precision(choice: str) -> str:
    if choice == "fp16" and not torch.cuda.is_available():
        raise RecipeError("train.mixed_precision=fp16 needs a GPU (accelerate would run fp32 here): use bf16 or no")
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def tracker_config(recipe: dict) -> dict:
    """The recipe as the flat mapping of scalars trackers take."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat_items("", recipe).items()}


class Trainer:
    """One pretraining run as the recipe describes it."""

    def __init__(self, recipe: dict):
        self.recipe = recipe
        self.output_dir = Path(recipe["output_dir"])
        train = recipe["train"]
        data = recipe["data"]
        self.accelerator = Accelerator(
            # Several processes on a machine without accelerators (torchrun, or `accelerate launch
            # --multi_gpu` there): accelerate forms a gloo group only when told it runs on CPUs.
            cpu=int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available(),
            gradient_accumulation_steps=train["gradient_accumulation_steps"],
            mixed_precision=mixed_precision(train["mixed_precision"]),
            log_with=train["trackers"] or None,
            project_dir=str(self.output_dir),
        )
        check_engine(self.accelerator)
        set_seed(train["seed"])
        accelerator = self.accelerator
        with accelerator.main_process_first():
            opened = open_recipe_sources(data)
            self.tokenizer = prepare_tokenizer(recipe, opened)
        tokenizer_ids = {
            "vocab_size": len(self.tokenizer),
            "bos_token_id": self.tokenizer.bos_token_id,
            "eos_token_id": self.tokenizer.eos_token_id,
        }
        self.config = model_config(recipe["model"], data["seq_len"], defaults=tokenizer_ids)
        if self.config.vocab_size < len(self.tokenizer):
            raise RecipeError(
                f"model.vocab_size={self.config.vocab_size} is smaller than the tokenizer "
                f"({len(self.tokenizer)} tokens)"
            )
        self.data = build_pretraining_data(
            opened,
            self.tokenizer,
            data["seq_len"],
            data["seed"],
            data["validation_documents"],
            recipe["eval"]["batches"] * train["micro_batch_size"],
            accelerator.process_index,
            accelerator.num_processes,
            data["skip_blocks"],
        )
        model = initial_model(recipe["model"], self.config)
        if train["gradient_checkpointing"]:
            model.gradient_checkpointing_enable({"use_reentrant": False})
        matrices, vectors = optimizer_settings(train)
        optimizer = torch.optim.AdamW(
            [
                {"params": [p for p in model.parameters() if p.dim() >= 2], **matrices},
                {"params": [p for p in model.parameters() if p.dim() < 2], **vectors},
            ],
            fused=True,  # one kernel per step on CUDA and CPU alike
        )
        # Stepped once per optimizer step here, so not handed to accelerate (which would step it per process).
        self.scheduler = learning_rate_schedule(optimizer, train)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        accelerator.register_for_checkpointing(self.scheduler)
        self.train_flops_per_token = 3 * flops_per_token(self.config, data["seq_len"])
        self.tokens_per_step = (
            train["micro_batch_size"]
            * data["seq_len"]
            * train["gradient_accumulation_steps"]
            * accelerator.num_processes
        )
        self.step = train["start_step"]
        self.resumed_window = None
        # Taken once the input has been checked, so bad input leaves no output_dir behind.
        self.lock = OutputLock(self.output_dir) if accelerator.is_main_process else None
        with self.lock_released_on_error():
            self.resume_from = resolve_resume(train["resume"], self.output_dir)
            if self.resume_from is not None:
                self.load_checkpoint(self.resume_from)
                if self.step > train["max_steps"]:
                    raise RecipeError(
                        f"{self.resume_from} is at step {self.step}, past train.max_steps={train['max_steps']}: "
                        "nothing to train. Raise train.max_steps to continue that run, or choose another output_dir"
                    )
        if train["trackers"]:
            accelerator.init_trackers("parameternet-llm", config=tracker_config(recipe))

    # --- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self, window: "Window") -> None:
        accelerator = self.accelerator
        root = self.output_dir / "checkpoints"
        final = root / f"{CHECKPOINT_PREFIX}{self.step:08d}"
        staging = root / f".saving-{final.name}"
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        accelerator.wait_for_everyone()
        with self.saving(f"saving step {self.step}", staging):
            accelerator.save_state(str(staging))
            (staging / f"data_state_rank{accelerator.process_index}.json").write_text(
                json.dumps(self.data.train.state_dict())
            )
            # The statistics of the steps since the last log, so a resumed run logs what the uninterrupted one would.
            torch.save(window.state_dict(), staging / f"window_rank{accelerator.process_index}.pt")
            if accelerator.is_main_process:
                (staging / "trainer_state.json").write_text(json.dumps({"step": self.step}))
                (staging / RUN_RECIPE).write_text(
                    json.dumps({"recipe": self.recipe, "model_config": self.config.to_dict()}, indent=1)
                )
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:  # what a resume checks the files against
                recorded = {
                    str(f.relative_to(staging)): {"size": f.stat().st_size, "crc32": file_crc32(f)}
                    for f in sorted(staging.rglob("*"))
                    if f.is_file()
                }
                (staging / CHECKPOINT_MANIFEST).write_text(json.dumps(recorded, indent=1))
        if accelerator.is_main_process:
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)  # atomic: a crash before this line leaves the last good checkpoint
            for old in checkpoints(root)[: -self.recipe["train"]["keep_checkpoints"]]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()

    @contextmanager
    def saving(self, what: str, written: Path):
        """Turn a failure to write `written` (a full disk shows as torch's 'unexpected pos') into an error that
        says so and names the last good checkpoint; a partly written directory is removed."""
        try:
            yield
        except (OSError, RuntimeError) as error:
            free = shutil.disk_usage(written.parent).free
            if written.is_dir():
                shutil.rmtree(written, ignore_errors=True)
            full = getattr(error, "errno", None) == errno.ENOSPC or free < DISK_NEARLY_FULL
            good = checkpoints(self.output_dir / "checkpoints")
            raise SaveError(
                f"{'disk full while ' if full else ''}{what} ({error.__class__.__name__}: "
                f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}; {free / 2**20:.1f} MiB free "
                f"on the disk of {written.parent}); "
                + (f"the last good checkpoint is {good[-1]}" if good else "no checkpoint had been saved yet")
                + ". Free some space, then resume with train.resume=auto"
            ) from error

    def load_checkpoint(self, path: Path) -> None:
        data_state = path / f"data_state_rank{self.accelerator.process_index}.json"
        if not data_state.is_file():
            raise RecipeError(
                f"checkpoint {path} has no data state for process {self.accelerator.process_index}; "
                "resume with the number of processes it was saved with"
            )
        self.check_recipe_against(path)
        try:
            self.accelerator.load_state(str(path))
        except RuntimeError as error:  # a checkpoint saved without its recipe, of another shape
            raise RecipeError(f"{path} does not fit this recipe's model: {str(error).splitlines()[0]}") from error
        self.apply_optimizer_settings()
        self.data.train.load_state_dict(json.loads(data_state.read_text()))
        window = path / f"window_rank{self.accelerator.process_index}.pt"
        self.resumed_window = torch.load(window, map_location=self.accelerator.device) if window.is_file() else None
        self.step = json.loads((path / "trainer_state.json").read_text())["step"]
        self.accelerator.print(f"resumed from {path} at step {self.step}")

    def check_recipe_against(self, path: Path) -> None:
        """Refuse to resume `path` with another model or data than it was saved with (naming each change); say
        which other settings changed."""
        saved_file = path / RUN_RECIPE
        if not saved_file.is_file():
            logger.warning(f"{path} was saved without its recipe: changes to the model or data cannot be checked")
            return
        saved = json.loads(saved_file.read_text())
        config = json.loads(json.dumps(self.config.to_dict()))  # as read back from JSON
        refused, applied = resume_changes(saved["recipe"], self.recipe, saved["model_config"], config)
        if refused:
            raise RecipeError(
                f"{path} was saved by a run with another model or data, so resuming it would not continue that run:"
                + "".join(f"\n  {line}" for line in refused)
                + "\nRestore these values to resume it, or choose another output_dir for a new run"
            )
        if applied:
            self.accelerator.print(
                f"resuming {path.name} with changed settings, in force from here on:"
                + "".join(f"\n  {line}" for line in applied)
            )

    def apply_optimizer_settings(self) -> None:
        """The recipe's optimizer settings and peak learning rate over those a resumed checkpoint restored."""
        groups = self.optimizer.param_groups
        for group, settings in zip(groups, optimizer_settings(self.recipe["train"]), strict=True):
            group.update(settings, initial_lr=settings["lr"])
        scheduler = self.scheduler
        scheduler.base_lrs = [group["initial_lr"] for group in groups]
        for group, factor in zip(groups, scheduler.lr_lambdas, strict=True):
            group["lr"] = group["initial_lr"] * factor(scheduler.last_epoch)

    # --- training ----------------------------------------------------------------------------
    @contextmanager
    def lock_released_on_error(self):
        """A run that fails (bad input, divergence, a full disk) leaves output_dir free for the next one."""
        try:
            yield
        except BaseException:
            if self.lock is not None:
                self.lock.release()
            raise

    def run(self) -> dict:
        """Train to train.max_steps, then write final/ and summary.json; the summary."""
        with self.lock_released_on_error():
            return self.train_to_the_end()

    def train_to_the_end(self) -> dict:
        accelerator, recipe = self.accelerator, self.recipe
        train = recipe["train"]
        metrics_path = self.output_dir / "metrics.jsonl"
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            keep_logged_steps_up_to(metrics_path, self.step)
        batches = iter(torch.utils.data.DataLoader(self.data.train, batch_size=train["micro_batch_size"]))
        unwrapped = accelerator.unwrap_model(self.model)
        routed = is_parameternet(unwrapped)
        peak = peak_flops(accelerator.device)
        progress = tqdm(
            total=train["max_steps"],
            initial=self.step,
            desc="pretrain",
            dynamic_ncols=True,
            disable=not (accelerator.is_main_process and train["progress_bar"]),
        )
        window = Window()
        if self.resumed_window is not None:
            window.load_state_dict(self.resumed_window)
        starvation = StarvationWatch(train["starved_expert_steps"])
        drops = DropWatch(
            train["starved_expert_steps"], self.config, train["micro_batch_size"] * recipe["data"]["seq_len"]
        )
        self.model.train()
        finished = self.finished_summary() if self.step == train["max_steps"] else None
        if finished is not None:
            accelerator.print(
                f"{self.output_dir} is already trained to train.max_steps={self.step}: nothing to do (raise "
                "train.max_steps to continue it, or choose another output_dir)"
            )
            self.close()
            return finished
        logged = read_metrics(metrics_path) if metrics_path.is_file() else []
        record = logged[-1] if logged and logged[-1]["step"] == self.step else {}  # when nothing is left to train
        global_balance = routed and train["router_aux_loss_scope"] == "global"
        while self.step < train["max_steps"]:
            micro_batches = [
                next_batch(batches, recipe["data"]["sources"]).to(accelerator.device)
                for _ in range(train["gradient_accumulation_steps"])
            ]
            if global_balance:
                shares, total_tokens = self.global_expert_shares(micro_batches)
            for batch in micro_batches:
                with accelerator.accumulate(self.model):
                    out = self.model(input_ids=batch, labels=batch, use_cache=False)
                    if global_balance:
                        scale = accelerator.num_processes * len(micro_batches)
                        aux_loss = global_aux_loss(out.routing, shares, total_tokens, scale)
                        losses = SimpleNamespace(aux_loss=aux_loss, z_loss=out.z_loss)
                        out["loss"] = unwrapped.with_router_losses(out.lm_loss, losses)
                        out["aux_loss"] = aux_loss  # averaged over micro-batches and ranks: the global loss
                    accelerator.backward(out.loss)
                    if accelerator.sync_gradients:
                        window.add_grad_norm(accelerator.clip_grad_norm_(self.model.parameters(), train["grad_clip"]))
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                window.add(out, unwrapped.routing_stats(out) if routed else None)
            self.scheduler.step()
            self.step += 1
            window.steps += 1
            window.timed_steps += 1
            progress.update(1)
            evaluate_now = self.step % recipe["eval"]["every"] == 0 or self.step == train["max_steps"]
            if self.step % train["log_every"] == 0 or evaluate_now:
                record = window.summary(accelerator, self.step, self.tokens_per_step, self.scheduler.get_last_lr()[0])
                record["mfu"] = (
                    None
                    if peak is None
                    else self.train_flops_per_token * record["tokens_per_s"] / (peak * accelerator.num_processes)
                )
                self.stop_if_diverged(window)
                record["val_loss"] = self.validation_loss() if evaluate_now and self.data.validation else None
                if accelerator.is_main_process:
                    with self.saving(f"logging step {self.step}", metrics_path), metrics_path.open("a") as stream:
                        stream.write(json.dumps(record) + "\n")
                    progress.set_postfix(
                        loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}"
                    )
                accelerator.log(tracker_values(record), step=self.step)
                for warning in [
                    *starvation.update(record["expert_load"], window.steps),
                    *drops.update(record["dropped"], window.steps),
                ]:
                    logger.warning(warning)
                window = Window()
            if self.step in train["export_steps"]:
                self.export(self.output_dir / "export" / f"{CHECKPOINT_PREFIX}{self.step:08d}")
            if self.step % train["save_every"] == 0 or self.step == train["max_steps"]:
                self.stop_if_diverged(window)
                self.save_checkpoint(window)
        progress.close()
        summary = {
            "step": self.step,
            "num_processes": accelerator.num_processes,
            "final": record,
            "ranks_in_sync": self.ranks_in_sync(),
        }
        self.save_final(summary)
        self.close()
        return summary

    def finished_summary(self) -> dict | None:
        """The summary of a run that already wrote an intact final/ and summary.json; None if either is missing or
        damaged (then both are written again from the last checkpoint)."""
        try:
            summary = json.loads((self.output_dir / "summary.json").read_text())
            check_weights(self.output_dir / "final")
            load_saved_config(self.output_dir / "final")
        except (OSError, json.JSONDecodeError, InputError) as error:
            if (self.output_dir / "summary.json").exists() or (self.output_dir / "final").exists():
                logger.warning(f"the finished run's summary or final/ is damaged ({error}); writing them again")
            return None
        return summary

    def stop_if_diverged(self, window: "Window") -> None:
        """Stop before logging or saving anything non-finite: the last checkpoint stays the last good one."""
        if not window.finite(self.accelerator):
            good = checkpoints(self.output_dir / "checkpoints")
            raise DivergedError(
                f"training diverged: a non-finite loss or gradient norm between step {self.step - window.steps} and "
                f"step {self.step}; nothing of it was saved"
                + (f", the last good checkpoint is {good[-1].name}" if good else "")
                + ". Lower train.lr or raise train.warmup_steps, then resume (train.resume=auto)"
            )

    def global_expert_shares(self, micro_batches: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """f of the global batch: every routed linear's share of tokens per expert over this step's micro-batches on
        every process (a forward without gradients), and the global number of tokens."""
        counts = tokens = 0
        with torch.no_grad():
            for batch in micro_batches:
                batch_counts, batch_tokens = expert_counts(self.model(input_ids=batch, use_cache=False).routing)
                counts, tokens = counts + batch_counts, tokens + batch_tokens
        counts, tokens = self.accelerator.reduce(counts, "sum"), self.accelerator.reduce(tokens, "sum")
        return counts / tokens.clamp(min=1), tokens

    def close(self) -> None:
        """Free the prepared model and optimizer, then end the trackers and the process group. DDP's reducer
        holds the gloo group: freed only after the group was destroyed, it shut the group down at garbage
        collection, where one process was seen waiting at exit for a peer that had already gone."""
        self.model, self.optimizer, self.scheduler = self.accelerator.free_memory(
            self.model, self.optimizer, self.scheduler
        )
        self.accelerator.end_training()
        if self.lock is not None:
            self.lock.release()

    def validation_loss(self) -> float:
        batch_size = self.recipe["train"]["micro_batch_size"]
        loss = mean_lm_loss(self.model, self.data.validation, batch_size, self.accelerator.device)
        self.model.train()
        return loss

    def ranks_in_sync(self) -> bool | None:
        """Whether every process holds the same weights (None where weights are sharded)."""
        accelerator = self.accelerator
        if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            return None
        checksum = torch.stack([p.detach().double().sum() for p in self.model.parameters()]).sum().reshape(1)
        gathered = accelerator.gather(checksum)
        return bool(torch.all(gathered == gathered[0]).item())

    def save_final(self, summary: dict) -> None:
        self.export(self.output_dir / "final")
        if self.accelerator.is_main_process:
            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=1))

    def export(self, path: Path) -> None:
        """The model as an HF checkpoint with the tokenizer at `path`, written under a temporary name and renamed."""
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        state_dict = accelerator.get_state_dict(self.model)
        if accelerator.is_main_process:
            staging = path.with_name(f".saving-{path.name}")
            shutil.rmtree(staging, ignore_errors=True)
            with self.saving(f"writing {path}", staging):
                accelerator.unwrap_model(self.model).save_pretrained(staging, state_dict=state_dict)
                self.tokenizer.save_pretrained(staging)
            if path.exists():
                shutil.rmtree(path)
            os.replace(staging, path)
        accelerator.wait_for_everyone()


class Window:
    """Per-micro-batch statistics between two logging steps, kept on the device until logged."""

    def __init__(self):
        self.losses, self.grad_norms, self.loads, self.dropped = [], [], [], []
        self.linears: list[str] = []
        self.started = time.perf_counter()
        self.steps = 0  # optimizer steps in the window
        self.timed_steps = 0  # of which this process timed (a resumed window's earlier steps were not)

    def state_dict(self) -> dict:
        return {
            "losses": self.losses,
            "grad_norms": self.grad_norms,
            "loads": self.loads,
            "dropped": self.dropped,
            "linears": self.linears,
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict) -> None:
        self.losses, self.grad_norms = state["losses"], state["grad_norms"]
        self.loads, self.dropped, self.linears = state["loads"], state["dropped"], state["linears"]
        self.steps = state["steps"]

    def add_grad_norm(self, norm) -> None:
        if norm is not None:  # DeepSpeed clips inside its engine and may not report the norm
            self.grad_norms.append(torch.as_tensor(norm, dtype=torch.float32))

    def add(self, out, routing_stats) -> None:
        zero = torch.zeros_like(out.loss)
        aux, z = getattr(out, "aux_loss", None), getattr(out, "z_loss", None)
        losses = [out.loss, lm_loss_of(out), zero if aux is None else aux, zero if z is None else z]
        self.losses.append(torch.stack(losses).detach().float())
        if routing_stats:
            self.linears = list(routing_stats)
            self.loads.append(torch.stack([s["load"] for s in routing_stats.values()]))  # [R, E]
            self.dropped.append(torch.stack([s["dropped"] for s in routing_stats.values()]))  # [R]

    def finite(self, accelerator) -> bool:
        """Whether every loss and gradient norm of the window is finite on every process."""
        values = [torch.stack(self.losses).flatten()] if self.losses else []
        values += [torch.stack(self.grad_norms).flatten()] if self.grad_norms else []
        if not values:
            return True
        bad = (~torch.isfinite(torch.cat([v.to(accelerator.device) for v in values]))).sum().float()
        return accelerator.reduce(bad, "sum").item() == 0

    def summary(self, accelerator, step: int, tokens_per_step: int, lr: float) -> dict:
        losses = accelerator.reduce(torch.stack(self.losses).mean(0), "mean").tolist()
        elapsed = time.perf_counter() - self.started
        record = {
            "step": step,
            "loss": losses[0],
            "lm_loss": losses[1],
            "aux_loss": losses[2],
            "z_loss": losses[3],
            "lr": lr,
            "grad_norm": torch.stack(self.grad_norms).mean().item() if self.grad_norms else None,
            "tokens": step * tokens_per_step,
            "tokens_per_s": self.timed_steps * tokens_per_step / elapsed,
            "expert_load_max": None,
            "dropped_frac": None,
            "expert_load": None,
            "dropped": None,
        }
        if self.loads:
            loads = accelerator.reduce(torch.stack(self.loads).mean(0), "mean")  # [R, E] over the window and ranks
            dropped = accelerator.reduce(torch.stack(self.dropped).mean(0), "mean")  # [R]
            record["expert_load_max"] = loads.max(1).values.mean().item()
            record["dropped_frac"] = dropped.mean().item()
            record["expert_load"] = dict(zip(self.linears, loads.tolist(), strict=True))
            record["dropped"] = dict(zip(self.linears, dropped.tolist(), strict=True))
        return record


class StarvationWatch:
    """Warns once per expert whose share of tokens stays under a tenth of the balanced 1/E for `patience` steps
    (router collapse): the window loads are checked at every logging step."""

    def __init__(self, patience: int):
        self.patience = patience
        self.starved_for: dict[tuple[str, int], int] = {}
        self.warned: set[tuple[str, int]] = set()

    def update(self, loads: dict[str, list[float]] | None, steps: int) -> list[str]:
        """Count `steps` more for every starved expert; the warnings due now."""
        warnings = []
        for linear, shares in (loads or {}).items():
            for expert, share in enumerate(shares):
                key = (linear, expert)
                self.starved_for[key] = self.starved_for.get(key, 0) + steps if share < 0.1 / len(shares) else 0
                if self.starved_for[key] >= self.patience and key not in self.warned:
                    self.warned.add(key)
                    warnings.append(
                        f"expert {expert} of {linear} has had under {100 * 0.1 / len(shares):.2f}% of the tokens "
                        f"for {self.starved_for[key]} steps (router collapse?): consider a larger "
                        "router_aux_loss_coef, router_jitter_noise, or a lower learning rate"
                    )
        return warnings


class DropWatch:
    """Warns once per routed linear that drops more than half its tokens for `patience` steps (young routers may for
    a while), naming the capacity that makes it drop them; checked at every logging step."""

    heavy = 0.5

    def __init__(self, patience: int, config, micro_batch_tokens: int):
        self.patience, self.config, self.micro_batch_tokens = patience, config, micro_batch_tokens
        self.heavy_for: dict[str, int] = {}
        self.warned: set[str] = set()

    def update(self, dropped: dict[str, float] | None, steps: int) -> list[str]:
        """Count `steps` more for every routed linear dropping heavily; the warnings due now."""
        warnings = []
        for linear, share in (dropped or {}).items():
            self.heavy_for[linear] = self.heavy_for.get(linear, 0) + steps if share > self.heavy else 0
            if self.heavy_for[linear] >= self.patience and linear not in self.warned:
                self.warned.add(linear)
                config, tokens = self.config, self.micro_batch_tokens
                count = torch.tensor(tokens, dtype=torch.float64)
                room = int(expert_capacity(config.capacity_factor, count, config.num_experts, config.min_capacity))
                warnings.append(
                    f"{linear} has dropped over half its tokens for {self.heavy_for[linear]} steps ({share:.0%} in "
                    f"the last {steps}): capacity_factor={config.capacity_factor} gives each of its "
                    f"{config.num_experts} experts room for {room} of a micro-batch's {tokens} tokens. Raise "
                    "model.capacity_factor (null: no drops), lower model.num_experts or raise the micro-batch"
                )
        return warnings


def next_batch(batches, source_specs: list[dict]) -> torch.Tensor:
    """The next training batch; a failure to read the data names its culprit where it can."""
    try:
        return next(batches)
    except InputError:
        raise
    except Exception as error:  # a reader's error (pyarrow, json) deep in datasets' streaming
        raise unreadable_data([Source.from_recipe(spec) for spec in source_specs], error) from error


def tracker_values(record: dict) -> dict[str, float]:
    """The record's numbers for trackers, with every routed linear's expert loads and dropped share as scalars
    (`expert_load/layers.0.up_proj/3`, `dropped/layers.0.up_proj`)."""
    values = {key: value for key, value in record.items() if isinstance(value, (int, float))}
    for linear, shares in (record["expert_load"] or {}).items():
        short = linear.removeprefix("model.").replace(".mlp.", ".")
        values.update({f"expert_load/{short}/{expert}": share for expert, share in enumerate(shares)})
        values[f"dropped/{short}"] = record["dropped"][linear]
    return values


def mean_lm_loss(model, blocks, batch_size: int, device: torch.device | str = "cpu") -> float:
    """The language-model loss over `blocks` (token blocks of one length) in eval mode, the mean of its batches of
    `batch_size`, read back once. Leaves the model in eval mode."""
    model.eval()
    total, batches = torch.zeros((), device=device), 0
    with torch.no_grad():
        for start in range(0, len(blocks), batch_size):
            batch = torch.stack(list(blocks[start : start + batch_size])).to(device)
            total += lm_loss_of(model(input_ids=batch, labels=batch, use_cache=False))
            batches += 1
    return (total / batches).item()


def lm_loss_of(out) -> torch.Tensor:
    """The cross-entropy alone: ParameterNet outputs carry it as lm_loss, dense LLaMA's loss is it."""
    lm_loss = getattr(out, "lm_loss", None)
    return out.loss if lm_loss is None else lm_loss


def run(recipe_path: str, overrides: list[str]) -> dict:
    return Trainer(load_recipe(recipe_path, overrides)).run()


def finished_message(output_dir: Path, summary: dict) -> str:
    """What a finished run says: its last losses, where the model is and how to load and score it."""
    final = summary.get("final") or {}
    losses = ", ".join(f"{key} {final[key]:.4f}" for key in ("lm_loss", "val_loss") if final.get(key) is not None)
    return (
        f"trained to step {summary['step']}" + (f" ({losses})" if losses else "") + f"; the model is in "
        f"{output_dir / 'final'}: AutoModelForCausalLM.from_pretrained({str(output_dir / 'final')!r}, "
        f"trust_remote_code=True), or `parameternet-llm eval {output_dir / 'final'} --tasks "
        f"pnet_arc,pnet_boolq,pnet_hellaswag --output {output_dir / 'scores'}`; metrics in "
        f"{output_dir / 'metrics.jsonl'}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m parameternet_llm.training",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", help="recipe overrides as dotted.key=value")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.config, args.overrides)
        summary = Trainer(recipe).run()
    except (ValueError, OSError) as error:  # InputError is a ValueError
        message = user_message(error)
        if message is None:
            raise
        raise SystemExit(message) from None
    if int(os.environ.get("RANK", "0")) == 0:
        print(finished_message(Path(recipe["output_dir"]), summary))
