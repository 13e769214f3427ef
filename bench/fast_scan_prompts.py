"""N distinct valid prompts for a scan at scale: a run's own distinct training prompts (so the planted
duplicates and their controls, the ground truth, are among them), then prompts drawn from the prompt
grammar (data_pipeline.prompts) over the run's vocabulary until N distinct prompts are reached.

    python bench/fast_scan_prompts.py --checkpoint RUN --n 10000 --out prompts.txt

Drawn prompts follow the shape of a dataset record: a frontal (AP/PA) or lateral (LL/RL) view, a sex,
an age decade and 1-3 findings (some uncertain) or "no finding". Seeded: the same arguments write the
same file.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from data_pipeline.prompts import AGES, PROJECTIONS, SEXES, VIEWS, PromptParts
from data_pipeline.records import CANONICAL_FINDINGS


def grammar_prompts(rng: np.random.Generator):
    """An endless stream of prompt texts drawn from the grammar."""
    findings_pool = [f for f in CANONICAL_FINDINGS if f != "no finding"]
    while True:
        n_findings = int(rng.choice(4, p=[0.3, 0.35, 0.25, 0.1]))
        findings = [str(f) for f in rng.choice(findings_pool, n_findings, replace=False)] or ["no finding"]
        n_uncertain = int(rng.integers(0, n_findings + 1)) if n_findings and rng.random() < 0.3 else 0
        view = str(rng.choice(VIEWS))
        projection = str(rng.choice(PROJECTIONS[:2] if view == "frontal" else PROJECTIONS[2:]))
        yield PromptParts(views=(view,), projections=(projection,),
                          sexes=(str(rng.choice(SEXES)),), ages=(str(rng.choice(AGES)),),
                          findings=tuple(findings[n_uncertain:]), uncertain=tuple(findings[:n_uncertain])).text()


def build_prompts(vocab, first: list[str], n: int, seed: int = 0) -> list[str]:
    """`first` (kept in order, repeats dropped), then grammar prompts, n distinct in all, each encodable."""
    out = list(dict.fromkeys(first))[:n]
    seen = set(out)
    stream = grammar_prompts(np.random.default_rng(seed))
    while len(out) < n:
        prompt = next(stream)
        if prompt not in seen:
            vocab.encode(prompt)                     # raises on anything the vocabulary cannot encode
            seen.add(prompt)
            out.append(prompt)
    return out


def main(argv=None) -> int:
    from data_pipeline.atomic_files import write_text
    from engine.audit.run_data import split_prompts
    from engine.model.export import load_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    vocab = load_model(args.checkpoint).vocab
    prompts = build_prompts(vocab, split_prompts(args.checkpoint, "train"), args.n, args.seed)
    write_text(args.out, "".join(p + "\n" for p in prompts))
    print(f"{len(prompts)} distinct prompts -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
