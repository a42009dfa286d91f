"""SST-2 as the paper scores it: fine-tune a sequence-classification head and report validation accuracy."""

import json
import math
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from datasets import load_dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding
from transformers.optimization import get_linear_schedule_with_warmup

from ..errors import InputError

HUB_DATASET = "stanfordnlp/sst2"
FILE_FORMATS = {
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".csv": ("csv", {}),
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".parquet": ("parquet", {}),
}


def load_sst2(train_file: str | None = None, validation_file: str | None = None):
    """SST-2 splits with `sentence` and `label` columns: local files (GLUE's tsv, csv, jsonl, parquet) or the hub."""
    if (train_file is None) != (validation_file is None):
        raise InputError("give both --train-file and --validation-file, or neither (to read the hub's SST-2)")
    try:
        if train_file is None:
            splits = load_dataset(HUB_DATASET)
        else:
            for path in (train_file, validation_file):
                if not Path(path).is_file():
                    raise InputError(f"SST-2 file {path!r} does not exist")
            suffix = Path(train_file).suffix
            if suffix not in FILE_FORMATS:
                raise InputError(f"SST-2 file {train_file!r}: expected one of {sorted(FILE_FORMATS)}")
            builder, options = FILE_FORMATS[suffix]
            splits = load_dataset(builder, data_files={"train": train_file, "validation": validation_file}, **options)
    except InputError:
        raise
    except Exception as error:
        raise InputError(
            f"could not load SST-2 from {'the hub dataset ' + HUB_DATASET if train_file is None else train_file} "
            f"({error.__class__.__name__}: {str(error).splitlines()[0] if str(error) else ''}); offline, pass "
            "--train-file and --validation-file (GLUE's SST-2 train.tsv / dev.tsv)"
        ) from error
    for name, split in splits.items():
        missing = {"sentence", "label"} - set(split.column_names)
        if missing:
            raise InputError(f"SST-2 {name} split lacks column(s) {sorted(missing)}; has {split.column_names}")
    return splits["train"], splits["validation"]


def finetune_sst2(
    checkpoint: str,
    output: str,
    train_file: str | None = None,
    validation_file: str | None = None,
    epochs: int = 1,
    max_steps: int | None = None,
    lr: float = 2e-5,
    batch_size: int = 16,
    max_length: int = 128,
    seed: int = 0,
) -> dict:
    """Fine-tune `checkpoint` (ParameterNet or dense LLaMA) on SST-2; save the classifier and its accuracy."""
    set_seed(seed)
    accelerator = Accelerator()
    train, validation = load_sst2(train_file, validation_file)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(
        checkpoint, num_labels=2, trust_remote_code=True, pad_token_id=tokenizer.pad_token_id
    )

    def encode(batch):
        return tokenizer(batch["sentence"], truncation=True, max_length=max_length)

    columns = ["input_ids", "attention_mask", "labels"]
    train = train.map(encode, batched=True).rename_column("label", "labels").with_format(columns=columns)
    validation = validation.map(encode, batched=True).rename_column("label", "labels").with_format(columns=columns)
    collate = DataCollatorWithPadding(tokenizer)
    train_loader = torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True, collate_fn=collate)
    validation_loader = torch.utils.data.DataLoader(validation, batch_size=batch_size, collate_fn=collate)
    total_steps = max_steps or epochs * math.ceil(len(train) / batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(0.06 * total_steps), total_steps)
    model, optimizer, train_loader, validation_loader = accelerator.prepare(
        model, optimizer, train_loader, validation_loader
    )

    step = 0
    model.train()
    while step < total_steps:
        for batch in train_loader:
            loss = model(**batch).loss
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            if step == total_steps:
                break

    model.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in validation_loader:
            predictions = model(**batch).logits.argmax(-1)
            predictions, labels = accelerator.gather_for_metrics((predictions, batch["labels"]))
            correct += (predictions == labels).sum().item()
            total += labels.numel()
    result = {
        "checkpoint": str(checkpoint),
        "validation_accuracy": correct / total,
        "validation_examples": total,
        "train_examples": len(train),
        "steps": step,
        "lr": lr,
        "batch_size": batch_size,
    }
    if accelerator.is_main_process:
        output_path = Path(output)
        accelerator.unwrap_model(model).save_pretrained(output_path)
        tokenizer.save_pretrained(output_path)
        (output_path / "sst2_results.json").write_text(json.dumps(result, indent=1))
    return result
