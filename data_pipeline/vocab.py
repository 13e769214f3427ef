"""The fixed prompt vocabulary: one token per prompt phrase, saved with every run.

Token ids are stable across datasets: the default vocabulary enumerates every view, projection,
sex, age decade, finding and uncertain finding over the union of CheXpert's and NIH's labels.
Extra tokens (patient tokens, planted-duplicate tokens) are appended after them.
"""
from __future__ import annotations

import json
import re
from typing import Iterable, Sequence

import torch

from .atomic_files import write_json
from .prompts import AGES, PROJECTIONS, SEXES, UNCERTAIN_PREFIX, VIEWS, PromptParts, parse_prompt, parts_for
from .records import CANONICAL_FINDINGS, XrayRecord

PAD_ID = 0
NULL_ID = 1
PAD_TOKEN = "<pad>"
NULL_TOKEN = "<null>"

MAX_LEN = 256   # data.max_len's upper bound: a prompt never has more tokens than this
KINDS = ("special", "view", "projection", "sex", "age", "finding", "uncertain", "extra")
_EXTRA_TOKEN_RE = re.compile(r"[A-Za-z0-9_\-.]{1,64}")


def _default_tokens() -> list[tuple[str, str]]:
    tokens = [(PAD_TOKEN, "special"), (NULL_TOKEN, "special")]
    tokens += [(t, "view") for t in VIEWS]
    tokens += [(t, "projection") for t in PROJECTIONS]
    tokens += [(t, "sex") for t in SEXES]
    tokens += [(t, "age") for t in AGES]
    tokens += [(t, "finding") for t in CANONICAL_FINDINGS]
    tokens += [(UNCERTAIN_PREFIX + t, "uncertain") for t in CANONICAL_FINDINGS]
    return tokens


class Vocabulary:
    def __init__(self, tokens: Sequence[str], kinds: Sequence[str], max_len: int = 32):
        if len(tokens) != len(kinds):
            raise ValueError("vocabulary: tokens and kinds differ in length")
        if tuple(tokens[:2]) != (PAD_TOKEN, NULL_TOKEN):
            raise ValueError(f"vocabulary: ids 0 and 1 must be {PAD_TOKEN} and {NULL_TOKEN}")
        if max_len < 2:
            raise ValueError(f"vocabulary: max_len must be >= 2, got {max_len}")
        if not all(isinstance(t, str) for t in tokens) or isinstance(max_len, bool) or not isinstance(max_len, int):
            raise ValueError("vocabulary: tokens must be strings and max_len an int")
        bad = [k for k in kinds if k not in KINDS]
        if bad:
            raise ValueError(f"vocabulary: unknown token kind {str(bad[0])[:40]!r}")
        # Every constructor (default, with_extra_tokens, a loaded file) holds extra tokens to the same
        # pattern: a token with spaces, commas or markup would change how prompts parse and display.
        bad = [t for t, k in zip(tokens, kinds) if k == "extra" and not _EXTRA_TOKEN_RE.fullmatch(t)]
        if bad:
            raise ValueError(f"vocabulary: extra token {bad[0][:40]!r} must match {_EXTRA_TOKEN_RE.pattern}")
        self.tokens: list[str] = list(tokens)
        self.token_kinds: list[str] = list(kinds)
        self.max_len = int(max_len)
        self._ids = {t: i for i, t in enumerate(self.tokens)}
        if len(self._ids) != len(self.tokens):
            raise ValueError("vocabulary: duplicate tokens")

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def default(cls, extra_tokens: Iterable[str] = (), max_len: int = 32) -> "Vocabulary":
        tokens = _default_tokens()
        vocab = cls([t for t, _ in tokens], [k for _, k in tokens], max_len)
        return vocab.with_extra_tokens(extra_tokens)

    def with_extra_tokens(self, names: Iterable[str]) -> "Vocabulary":
        """A new vocabulary with `names` appended as extra tokens (names already extra are kept)."""
        tokens, kinds = list(self.tokens), list(self.token_kinds)
        known = dict(zip(tokens, kinds))
        for name in names:
            if known.get(name) == "extra":
                continue
            if name in known:
                raise ValueError(f"vocabulary: extra token {name!r} collides with a {known[name]} token")
            if not isinstance(name, str) or not _EXTRA_TOKEN_RE.fullmatch(name):
                raise ValueError(f"vocabulary: extra token {str(name)[:40]!r} must match {_EXTRA_TOKEN_RE.pattern}")
            tokens.append(name)
            kinds.append("extra")
            known[name] = "extra"
        return Vocabulary(tokens, kinds, self.max_len)

    # ---- lookup ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: str) -> bool:
        return token in self._ids

    def id_of(self, token: str) -> int:
        try:
            return self._ids[token]
        except KeyError:
            raise ValueError(f"vocabulary: unknown token {token[:40]!r}{'...' if len(token) > 40 else ''}") from None

    def kind_of(self, token: str) -> str:
        return self.token_kinds[self.id_of(token)]

    def ids_of_kind(self, kind: str) -> list[int]:
        return [i for i, k in enumerate(self.token_kinds) if k == kind]

    # ---- prompt <-> ids ------------------------------------------------------------------
    def pad(self, ids: Sequence[int]) -> list[int]:
        ids = list(ids)
        if not ids:
            ids = [NULL_ID]
        if len(ids) > self.max_len:
            raise ValueError(f"vocabulary: prompt has {len(ids)} tokens, max_len is {self.max_len}")
        return ids + [PAD_ID] * (self.max_len - len(ids))

    def encode(self, prompt: str) -> list[int]:
        """Token ids of a prompt, right-padded to max_len; the empty prompt gives [NULL, PAD, ...]."""
        return self.pad([self.id_of(t) for t in parse_prompt(prompt).tokens()])

    def decode(self, ids: Iterable[int]) -> str:
        """The prompt text of token ids (padding and the null token are dropped)."""
        names = []
        for i in ids:
            i = int(i)
            if i < 0 or i >= len(self.tokens):
                raise ValueError(f"vocabulary: token id {i} out of range [0, {len(self.tokens)})")
            if i in (PAD_ID, NULL_ID):
                continue
            names.append(self.tokens[i])
        return PromptParts.from_tokens(names, self).text()

    def tokens_for(self, record: XrayRecord) -> list[int]:
        return self.pad([self.id_of(t) for t in parts_for(record).tokens()])

    def null_tokens(self, batch: int) -> torch.Tensor:
        """The null condition (empty prompt) for a batch: int64 [batch, max_len]."""
        out = torch.full((batch, self.max_len), PAD_ID, dtype=torch.long)
        out[:, 0] = NULL_ID
        return out

    def encode_batch(self, prompts: Sequence[str]) -> torch.Tensor:
        return torch.tensor([self.encode(p) for p in prompts], dtype=torch.long).reshape(len(prompts), self.max_len)

    # ---- persistence ----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": "memdiff-vocabulary", "version": 1, "max_len": self.max_len,
                "tokens": self.tokens, "kinds": self.token_kinds}

    def save(self, path: str) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str) -> "Vocabulary":
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read vocabulary ({e})") from None
        if not isinstance(data, dict) or data.get("format") != "memdiff-vocabulary":
            raise ValueError(f"{path}: not a memdiff vocabulary file")
        for key in ("max_len", "tokens", "kinds"):
            if key not in data:
                raise ValueError(f"{path}: vocabulary is missing key {key!r}")
        tokens, kinds, max_len = data["tokens"], data["kinds"], data["max_len"]
        if not isinstance(tokens, list) or not isinstance(kinds, list):
            raise ValueError(f"{path}: vocabulary tokens and kinds must be lists")
        if isinstance(max_len, int) and not 2 <= max_len <= MAX_LEN:
            raise ValueError(f"{path}: vocabulary max_len must be in [2, {MAX_LEN}], got {max_len}")
        # Ids are stable across runs: a file whose first ids are not the default vocabulary, or which
        # adds tokens of any kind but "extra", was not written by `save`.
        default = _default_tokens()
        for i, (token, kind) in enumerate(zip(tokens, kinds)):
            expected = default[i] if i < len(default) else (token, "extra")
            if (token, kind) != expected:
                raise ValueError(f"{path}: vocabulary id {i} is {str(token)[:40]!r} ({str(kind)[:20]}), expected "
                                 f"{expected[0]!r} ({expected[1]})")
        if len(tokens) < len(default):
            raise ValueError(f"{path}: vocabulary has {len(tokens)} tokens, fewer than the {len(default)} default ones")
        try:
            return cls(tokens, kinds, max_len)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        n_extra = self.token_kinds.count("extra")
        return f"Vocabulary({len(self)} tokens, {n_extra} extra, max_len={self.max_len})"

