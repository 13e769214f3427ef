"""Prompt edits that defuse memorization triggers, and the random-insertion baseline.

- remove:  drop the k most significant tokens (engine.mitigation.token_significance) of a prompt.
- replace: swap each for the nearest token of the same kind (view for view, finding for finding,
           extra for extra) by cosine of the model's own token embeddings, never a trigger and never
           a token the prompt already holds; with no candidate left the token is removed (recorded).
- random:  the baseline from the same literature, insert n random tokens (Wen et al.; Somepalli et al.
           use random words), chosen among `insert_kinds`, never a known trigger.

Edits work on token ids and return canonical prompt text (vocab.decode), which re-encodes to the same
tokens, so edited prompts go through every tool like any other prompt. `audit_prompt_edits` edits the
prompts of a token-significance document and audits original against edited prompts (same seeds, same
ground truth).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import torch

from data_pipeline.atomic_files import write_text
from data_pipeline.json_files import read_json_object
from data_pipeline.vocab import NULL_ID, PAD_ID, Vocabulary
from engine.audit.audit_inputs import AuditInputs
from engine.audit.generation_audit import Comparison, audit_series, scan_generations
from engine.audit.planted_truth import prompt_groups
from engine.audit.prompt_lists import PromptList, encode_prompts
from engine.audit.wen_detector import DetectorSettings

METHODS = ("remove", "replace", "random")
DEFAULT_INSERT_KINDS = ("finding", "uncertain", "extra")


@dataclass
class PromptEdit:
    original: str
    edited: str
    method: str
    changes: list[dict] = field(default_factory=list)   # {token, kind, position, replacement}

    def to_dict(self) -> dict:
        return asdict(self)


def _real_ids(ids: Sequence[int]) -> list[int]:
    return [int(i) for i in ids if int(i) not in (PAD_ID, NULL_ID)]


def canonical_prompt(vocab: Vocabulary, ids: Sequence[int]) -> str:
    """Prompt text of ids in canonical order; checked to re-encode to the same multiset of tokens."""
    text = vocab.decode(ids)
    back = _real_ids(vocab.encode(text))
    if sorted(back) != sorted(_real_ids(ids)):
        raise ValueError(f"prompt edit: {text!r} does not re-encode to its tokens")
    return text


def nearest_same_kind(model, vocab: Vocabulary, token_id: int, exclude: Iterable[int] = ()) -> int | None:
    """Id of the token of the same kind closest by token-embedding cosine, skipping `exclude`."""
    kind = vocab.token_kinds[token_id]
    banned = set(int(i) for i in exclude) | {token_id, PAD_ID, NULL_ID}
    candidates = [i for i in vocab.ids_of_kind(kind) if i not in banned]
    if not candidates:
        return None
    table = model.encoder.token_embedding.weight.detach().float().cpu()
    query = table[token_id]
    cand = table[candidates]
    cos = (cand @ query) / (cand.norm(dim=1) * query.norm()).clamp_min(1e-12)
    return candidates[int(torch.argmax(cos))]   # argmax keeps the first (lowest id) among ties


def remove_tokens(vocab: Vocabulary, ids: Sequence[int], positions: Iterable[int]) -> PromptEdit:
    ids = [int(i) for i in ids]
    drop = set(int(p) for p in positions)
    changes = [dict(token=vocab.tokens[ids[p]], kind=vocab.token_kinds[ids[p]], position=p, replacement=None)
               for p in sorted(drop)]
    kept = [i for p, i in enumerate(ids) if p not in drop]
    return PromptEdit(vocab.decode(ids), canonical_prompt(vocab, vocab.pad(_real_ids(kept))), "remove", changes)


def replace_tokens(model, vocab: Vocabulary, ids: Sequence[int], positions: Iterable[int],
                   triggers: Iterable[int] = ()) -> PromptEdit:
    ids = [int(i) for i in ids]
    positions = sorted(set(int(p) for p in positions))
    banned = set(int(t) for t in triggers) | {ids[p] for p in positions}
    out, changes = list(ids), []
    for p in positions:
        present = set(_real_ids(out))
        new = nearest_same_kind(model, vocab, ids[p], banned | present)
        changes.append(dict(token=vocab.tokens[ids[p]], kind=vocab.token_kinds[ids[p]], position=p,
                            replacement=None if new is None else vocab.tokens[new]))
        out[p] = PAD_ID if new is None else new
    return PromptEdit(vocab.decode(ids), canonical_prompt(vocab, vocab.pad(_real_ids(out))), "replace", changes)


def insert_random_tokens(vocab: Vocabulary, ids: Sequence[int], n: int, generator: torch.Generator,
                         triggers: Iterable[int] = (), kinds: Sequence[str] = DEFAULT_INSERT_KINDS) -> PromptEdit:
    ids = [int(i) for i in ids]
    real = _real_ids(ids)
    banned = set(int(t) for t in triggers) | set(real)
    pool = [i for k in kinds for i in vocab.ids_of_kind(k) if i not in banned]
    room = vocab.max_len - len(real)
    n = min(n, len(pool), room)
    picks = [pool[int(j)] for j in torch.randperm(len(pool), generator=generator)[:n]] if n > 0 else []
    changes = [dict(token=None, kind=vocab.token_kinds[i], position=None, replacement=vocab.tokens[i]) for i in picks]
    return PromptEdit(vocab.decode(ids), canonical_prompt(vocab, vocab.pad(real + picks)), "random", changes)


def edit_prompts(model, vocab: Vocabulary, tokens: torch.Tensor, ranked_positions: Sequence[Sequence[int]], *,
                 method: str, k: int = 1, insert: int = 2, seed: int = 0,
                 known_triggers: Iterable[int] = ()) -> list[PromptEdit]:
    """Edit every prompt of `tokens` [P, L]; `ranked_positions[p]` lists its real tokens, most significant first.

    The trigger set for replacement is the union of every prompt's top-k tokens and `known_triggers`,
    so a replacement never swaps one prompt's trigger for another's.
    """
    if method not in METHODS:
        raise ValueError(f"prompt edits: method must be one of {METHODS}, got {method!r}")
    if k < 1:
        raise ValueError(f"prompt edits: k must be >= 1, got {k}")
    tokens = tokens.cpu()
    top = [list(r)[:k] for r in ranked_positions]
    triggers = set(int(t) for t in known_triggers) | {int(tokens[p, i]) for p, pos in enumerate(top) for i in pos}
    gen = torch.Generator().manual_seed(seed)
    edits = []
    for p, pos in enumerate(top):
        ids = tokens[p].tolist()
        if method == "remove":
            edits.append(remove_tokens(vocab, ids, pos))
        elif method == "replace":
            edits.append(replace_tokens(model, vocab, ids, pos, triggers))
        else:
            edits.append(insert_random_tokens(vocab, ids, insert, gen, triggers))
    return edits


# ---- edits of a token-significance document, audited before/after -------------------------------------

def read_significance(path: str) -> dict:
    """A tools/token_significance output (its prompts, each with `ranked_positions`); a one-line error otherwise."""
    doc = read_json_object(path)
    if not isinstance(doc.get("prompts"), list):
        raise ValueError(f"{path}: no 'prompts' list (not a tools/token_significance output)")
    for i, e in enumerate(doc["prompts"]):
        positions = e.get("ranked_positions") if isinstance(e, dict) else None
        if not (isinstance(e, dict) and isinstance(e.get("prompt"), str) and isinstance(positions, list)
                and all(isinstance(p, int) and not isinstance(p, bool) and 0 <= p for p in positions)):
            raise ValueError(f"{path}: prompts[{i}]: expected {{\"prompt\": text, \"ranked_positions\": "
                             f"[token positions]}}")
    return doc


def audit_prompt_edits(loaded, significance: dict, significance_path: str, inputs: AuditInputs,
                       settings: DetectorSettings, out_dir: str, *, method: str = "replace", k: int = 1,
                       insert: int = 2, exclude_planted: bool = True, threshold: float | None = None,
                       target_fpr: float = 0.01, batch_prompts: int = 16, progress: bool = True) -> Comparison:
    """Edit the top-k significant tokens of every prompt of `significance` and audit original vs edited.

    With `exclude_planted`, no planted token of the run's manifest is ever inserted or substituted.
    Groups and the planted ground truth follow the original prompts (an edit may drop the planted token),
    so both sides are judged against the same truth. Writes out_dir/edited_prompts.txt.
    """
    entries = significance["prompts"]
    originals = PromptList([e["prompt"] for e in entries],
                           [f"{significance_path}:prompts[{i}]" for i in range(len(entries))])
    tokens = encode_prompts(loaded.vocab, originals)
    for i, e in enumerate(entries):
        if any(p >= tokens.shape[1] for p in e["ranked_positions"]):
            raise ValueError(f"{significance_path}:prompts[{i}]: ranked_positions go past the model's "
                             f"{tokens.shape[1]} token positions")
    known = []
    if exclude_planted and inputs.manifest:
        known = [loaded.vocab.id_of(e["token"]) for e in inputs.manifest.get("planted", [])
                 if e["token"] in loaded.vocab]
    edits = edit_prompts(loaded.model, loaded.vocab, tokens, [e["ranked_positions"] for e in entries],
                         method=method, k=k, insert=insert, seed=settings.base_seed, known_triggers=known)
    groups = prompt_groups(originals.prompts, inputs.manifest) or ["ordinary"] * len(originals.prompts)
    edited = PromptList([e.edited for e in edits], [f"edit of {w}" for w in originals.locations])
    base = scan_generations(loaded, originals, settings, os.path.join(out_dir, "original"), manifest=inputs.manifest,
                            groups=groups, batch_prompts=batch_prompts, progress=progress, description="scan original")
    after = scan_generations(loaded, edited, settings, os.path.join(out_dir, f"edited_{method}"),
                             manifest=inputs.manifest, groups=groups, batch_prompts=batch_prompts, progress=progress,
                             description="scan edited")
    after.truth_prompts = list(originals.prompts)
    audits = audit_series([base, after], inputs.real, manifest=inputs.manifest, threshold=threshold,
                          target_fpr=target_fpr, train_cache={}, **inputs.models())
    write_text(os.path.join(out_dir, "edited_prompts.txt"), "".join(e.edited + "\n" for e in edits))
    return Comparison(f"Prompt edits ({method})", ["original", f"edited ({method})"], audits, [base, after],
                      inputs.real, {"edits": [e.to_dict() for e in edits], "method": method, "k": k},
                      ["Groups (planted/control) follow the original prompts, so the edited prompts are judged "
                       "against the same ground truth."])
