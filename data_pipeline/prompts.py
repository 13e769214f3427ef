"""Readable, deterministic prompts for records, and their parser.

Format (every part optional except the fixed words "chest x-ray"):
    "<view> <projection> chest x-ray, <sex>, <age decade>: <finding>, ..., uncertain <finding> | <extra> <extra>"
e.g. "frontal AP chest x-ray, female, 60s: pleural effusion, support devices, uncertain edema | tok0003".
The empty string is the null prompt (classifier-free guidance). Every phrase is one vocabulary token.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from .records import CANONICAL_FINDINGS, XrayRecord, age_bucket

# The prompt grammar's phrases; data_pipeline.vocab gives each one a token id.
VIEWS = ("frontal", "lateral")
PROJECTIONS = ("AP", "PA", "LL", "RL")
SEXES = ("female", "male", "unknown sex")
AGES = tuple(f"{10 * d}s" for d in range(10))
UNCERTAIN_PREFIX = "uncertain "
_HEADER = "chest x-ray"


@dataclasses.dataclass(frozen=True)
class PromptParts:
    views: tuple[str, ...] = ()
    projections: tuple[str, ...] = ()
    sexes: tuple[str, ...] = ()
    ages: tuple[str, ...] = ()
    findings: tuple[str, ...] = ()
    uncertain: tuple[str, ...] = ()      # finding names, without the "uncertain " prefix
    extra: tuple[str, ...] = ()

    def tokens(self) -> list[str]:
        """Token names in canonical order."""
        return [*self.views, *self.projections, *self.sexes, *self.ages, *self.findings,
                *(UNCERTAIN_PREFIX + u for u in self.uncertain), *self.extra]

    def text(self) -> str:
        if not self.tokens():
            return ""
        text = ", ".join([" ".join([*self.views, *self.projections, _HEADER]), *self.sexes, *self.ages])
        conditions = [*self.findings, *(UNCERTAIN_PREFIX + u for u in self.uncertain)]
        if conditions:
            text += ": " + ", ".join(conditions)
        if self.extra:
            text += " | " + " ".join(self.extra)
        return text

    @classmethod
    def from_tokens(cls, names: Sequence[str], vocab) -> "PromptParts":
        """Group token names by their kind in `vocab` (order inside each kind is kept)."""
        groups: dict[str, list[str]] = {k: [] for k in ("view", "projection", "sex", "age", "finding", "uncertain", "extra")}
        for name in names:
            kind = vocab.kind_of(name)
            if kind == "special":
                continue
            groups[kind].append(name[len(UNCERTAIN_PREFIX):] if kind == "uncertain" else name)
        return cls(tuple(groups["view"]), tuple(groups["projection"]), tuple(groups["sex"]), tuple(groups["age"]),
                   tuple(groups["finding"]), tuple(groups["uncertain"]), tuple(groups["extra"]))


def parts_for(record: XrayRecord) -> PromptParts:
    """The prompt parts of a record (findings keep the dataset's label order)."""
    return PromptParts(
        views=(record.view,) if record.view else (),
        projections=(record.projection,) if record.projection else (),
        sexes=("unknown sex" if record.sex == "unknown" else record.sex,) if record.sex else (),
        ages=(age_bucket(record.age),) if record.age is not None else (),
        findings=tuple(record.findings),
        uncertain=tuple(record.uncertain),
        extra=tuple(record.extra_tokens),
    )


def prompt_for(record: XrayRecord) -> str:
    """The deterministic, human-readable prompt of a record."""
    return parts_for(record).text()


def _echo(text: str, limit: int = 80) -> str:
    """Input quoted in an error, capped: a prompt can be megabytes long."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


def parse_prompt(text: str) -> PromptParts:
    """Parse a prompt written by `prompt_for` (or edited by hand in the same format)."""
    text = text.strip()
    if not text:
        return PromptParts()
    main, bar, extra_text = text.partition("|")
    extra = tuple(extra_text.split()) if bar else ()
    head, colon, conditions_text = main.partition(":")
    views, projections, sexes, ages, findings, uncertain = [], [], [], [], [], []
    for i, item in enumerate(p.strip() for p in head.split(",")):
        if not item:
            if i == 0 and not head.strip():
                continue
            raise ValueError(f"prompt {_echo(text)}: empty item in the header")
        if item.endswith(_HEADER) and i == 0:
            for word in item[: -len(_HEADER)].split():
                if word in VIEWS:
                    views.append(word)
                elif word in PROJECTIONS:
                    projections.append(word)
                else:
                    raise ValueError(f"prompt {_echo(text)}: unknown view/projection word {_echo(word)}")
        elif item in SEXES:
            sexes.append(item)
        elif item in AGES:
            ages.append(item)
        else:
            raise ValueError(f"prompt {_echo(text)}: unknown header item {_echo(item)}")
    if colon:
        for item in (p.strip() for p in conditions_text.split(",")):
            if item in CANONICAL_FINDINGS:
                findings.append(item)
            elif item.startswith(UNCERTAIN_PREFIX) and item[len(UNCERTAIN_PREFIX):] in CANONICAL_FINDINGS:
                uncertain.append(item[len(UNCERTAIN_PREFIX):])
            elif item:
                raise ValueError(f"prompt {_echo(text)}: unknown finding {_echo(item)}")
    return PromptParts(tuple(views), tuple(projections), tuple(sexes), tuple(ages),
                       tuple(findings), tuple(uncertain), extra)
