"""`metrics.jsonl`: one JSON line per logging step, appended while a run trains.

A crash or a full disk can leave the last line cut short; readers skip it, and a resumed run drops it.
"""

import json
import os
from pathlib import Path

from ..errors import InputError


def read_metrics(path: str | Path) -> list[dict]:
    """The logged records of `path`, without a torn last line; a damaged line before it is an error naming it."""
    path = Path(path)
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines):  # cut short by a crash while logging
                break
            raise InputError(f"{path} line {number} is not a JSON record ({error})") from error
    return records


def keep_logged_steps_up_to(path: str | Path, step: int) -> None:
    """Keep only the records up to `step` (a crashed run may have logged past its last checkpoint, or torn its
    last line), rewriting the file under a temporary name and renaming it, so a crash now loses nothing."""
    path = Path(path)
    if not path.exists():
        return
    kept = [record for record in read_metrics(path) if record["step"] <= step]
    staging = path.with_name(f".{path.name}.rewriting")
    staging.write_text("".join(json.dumps(record) + "\n" for record in kept))
    os.replace(staging, path)
