"""Lists of prompts to scan, audit or sample: read from a file or a run's training split, then encoded.

Every prompt keeps where it came from ("file:line"), so an unknown phrase fails with a one-line error
naming its file and line before any sampling starts.
"""
from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter
from dataclasses import dataclass

import torch


@dataclass
class PromptList:
    prompts: list[str]
    locations: list[str]                       # "file:line" of each prompt, for error messages
    train_counts: list[int] | None = None      # training images carrying each prompt, if known
    duplicates_dropped: int = 0


def distinct_prompts(prompts: list[str], locations: list[str], counts: list[int] | None = None) -> PromptList:
    """Each prompt once (its first occurrence), so that a scan has exactly one row per prompt."""
    seen, keep = set(), []
    for i, p in enumerate(prompts):
        if p not in seen:
            seen.add(p)
            keep.append(i)
    return PromptList([prompts[i] for i in keep], [locations[i] for i in keep],
                      [counts[i] for i in keep] if counts is not None else None, len(prompts) - len(keep))


def load_prompts(path: str, column: str = "prompt", distinct: bool = True) -> PromptList:
    """Prompts from a .txt (one per line; blank lines and #comments skipped), .csv or .jsonl (`column`) file.

    With `distinct` (scans and audits), a repeated prompt is kept once (first occurrence) so that each
    prompt has exactly one row; without it (sampling), every line is one prompt. No prompt of the
    grammar starts with '#' (data_pipeline.prompts), so a comment line is never a prompt.
    """
    if not os.path.isfile(path):
        raise ValueError(f"{path}: prompt file not found")
    prompts, where = [], []
    ext = os.path.splitext(path)[1].lower()
    with io.StringIO(read_utf8(path), newline="") as f:
        if ext == ".csv":
            reader = csv.DictReader(f)
            if reader.fieldnames is None or column not in reader.fieldnames:
                raise ValueError(f"{path}: no column {column!r} (columns: {reader.fieldnames})")
            for row_no, row in enumerate(reader, start=2):
                if None in row:  # DictReader's key for surplus fields: an unquoted comma split the prompt
                    raise ValueError(f"{path}:{row_no}: more fields than the header has; quote prompts with commas")
                prompts.append((row[column] or "").strip())
                where.append(f"{path}:{row_no}")
        elif ext in (".jsonl", ".ndjson"):
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict) or column not in obj or not isinstance(obj[column], str):
                    raise ValueError(f"{path}:{line_no}: no string key {column!r}")
                prompts.append(obj[column].strip())
                where.append(f"{path}:{line_no}")
        else:
            for line_no, line in enumerate(f, start=1):
                if line.strip() and not line.lstrip().startswith("#"):
                    prompts.append(line.strip())
                    where.append(f"{path}:{line_no}")
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return distinct_prompts(prompts, where) if distinct else PromptList(prompts, where)


def read_utf8(path: str) -> str:
    """The file's text; a file that is not UTF-8 is a one-line error naming the file and the line of
    its first bad byte."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}: not UTF-8 text (byte {data[e.start]:#04x} at line {line})") from None


def training_prompt_list(prompts: list[str], source: str) -> PromptList:
    """The distinct prompts of a training split with how many training images carry each."""
    counts = Counter(prompts)
    distinct = list(counts)
    return PromptList(distinct, [f"{source}[{p!r}]" for p in distinct], [counts[p] for p in distinct])


def encode_prompts(vocab, prompt_list: PromptList) -> torch.Tensor:
    """Token ids [P, L]; an unknown phrase fails here, naming its file and line, before any sampling."""
    rows = []
    for prompt, where in zip(prompt_list.prompts, prompt_list.locations):
        try:
            rows.append(vocab.encode(prompt))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), vocab.max_len)


def command_line_prompts(texts: list[str], path: str | None = None) -> PromptList:
    """Prompts given one by one (located as "--prompt i") followed by every line of a prompt file, in
    order and with repeats (each is sampled); an empty result is an error."""
    given = PromptList(list(texts), [f"--prompt {i + 1}" for i in range(len(texts))])
    if path is not None:
        from_file = load_prompts(path, distinct=False)
        given = PromptList(given.prompts + from_file.prompts, given.locations + from_file.locations)
    if not given.prompts:
        raise ValueError("give --prompt TEXT (repeatable) or --prompts FILE")
    return given
