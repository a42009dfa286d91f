"""Zero-shot scoring with lm-evaluation-harness (the paper's tasks and offline ones shipped in `tasks/`), and
SST-2 fine-tuning."""
