"""Reading JSON files that anyone may have written (a run folder someone sent, a hand-edited sidecar).

One owner for the one-line errors of a JSON read: the file is named with what is wrong (not UTF-8,
not JSON, not an object), never a traceback from deep inside the json module. Callers check the
keys they need and name them. (Writing is data_pipeline.atomic_files.)
"""
from __future__ import annotations

import json
import os


def read_json_object(path: str | os.PathLike) -> dict:
    """The JSON object in `path`; a one-line ValueError naming the file otherwise."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        obj = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}: not UTF-8 text (byte {data[e.start]:#04x} at line {line})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj
