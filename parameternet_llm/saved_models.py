"""Reading a saved model directory's config: a missing directory, a missing, unreadable or malformed
config.json, or a config transformers cannot build is an error naming the file."""

import json
from pathlib import Path

from .errors import InputError


class CheckpointError(InputError):
    """A saved model directory (or config.json) that cannot be read; the message names it."""


def read_config_dict(path: str | Path) -> dict:
    """The mapping in a config.json, given the file or the checkpoint directory holding it."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    file = path if path.is_file() else path / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{path} is not a checkpoint directory: it has no config.json")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{file} is not valid JSON ({error})") from error
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file} holds no mapping of config fields")
    return raw


def load_saved_config(checkpoint: str | Path):
    """The config of a saved model directory, of any model type (a ParameterNet's through its own code)."""
    from transformers import AutoConfig

    read_config_dict(checkpoint)
    try:
        return AutoConfig.from_pretrained(checkpoint, trust_remote_code=True)
    except (ValueError, OSError, KeyError, TypeError) as error:
        where = Path(checkpoint) / "config.json"
        raise CheckpointError(f"{where} cannot be read as a config: {brief(error)}") from error


def brief(error: Exception, limit: int = 120) -> str:
    """An error's first line, cut at `limit` characters (transformers lists every model type it knows)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else error.__class__.__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def check_weights(checkpoint: Path) -> None:
    """Refuse a checkpoint whose weights are missing, unreadable, or NaN or infinite (a diverged run): nothing it
    computes would mean anything."""
    import torch
    from safetensors import SafetensorError, safe_open

    files = sorted(checkpoint.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"checkpoint {str(checkpoint)!r} holds no weights (*.safetensors)")
    for file in files:
        try:
            with safe_open(file, framework="pt") as opened:
                for name in opened.keys():  # noqa: SIM118 (safe_open is not iterable)
                    if not torch.isfinite(opened.get_tensor(name)).all():
                        raise CheckpointError(
                            f"checkpoint {str(checkpoint)!r} has non-finite weights ({name} in {file.name}): the run "
                            "that wrote it diverged; use an earlier checkpoint"
                        )
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"weights file {file} is unreadable ({error}): the checkpoint is damaged") from error
