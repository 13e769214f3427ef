"""Planted duplicates (version 2): memorization ground truth over a dose range, with repetition-matched controls.

For every cell (dose C, kind) of `copies` x `kinds`, K training images ("sources", one per patient)
are planted C times under a dedicated prompt token (`plantNNN`):
- exact: the source file itself, C more rows (the original row stays, untouched);
- near:  C new files, each the source after a small rotation, shift, crop, contrast/brightness change
         and noise of its own (a re-acquisition of the same patient), written under the run directory.
Every planted entry has one control (`ctrlNNN`) with the same C: C *distinct* images of other
patients, all carrying ONE prompt text (their anchor's prompt plus the control token; the anchor is
the image whose prompt is nearest the planted source's, so planted and control prompts also match in
content). Planted and
control tokens then occur equally often (C rows) AND their prompts repeat equally often (C identical
rows), so a detector that reacts to a rare token or a repeated prompt, not to a repeated image,
cannot separate them. Control members are the images whose prompts differ least from the anchor's
(fewest differing findings first, then fewest differing view, projection, sex and age phrases), so
the one shared prompt mislabels them as little as the pool allows; every member's mismatch is in the
manifest.

Every planted entry and its control belong to the calibration or the evaluation half, balanced in
each (dose, kind) cell. The manifest (`planted_manifest.json`, schema in notes/design_phase2.md)
records everything: sources, copy paths, each near copy's transform and seed, prompts and halves.
Everything is a function of the records and `seed`.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Literal, Sequence

import numpy as np
from PIL import Image

from .cache import open_gray
from .config_schema import REQUIRED, ConfigSection, FieldError, constrained, to_jsonable
from .images import read_png, write_png
from .keyed_random import keyed_rng
from .prompts import parts_for, prompt_for
from .records import XrayRecord

PLANTED_PREFIX = "plant"
CONTROL_PREFIX = "ctrl"
KINDS = ("exact", "near")
SPLITS = ("calibration", "evaluation")
MANIFEST_VERSION = 2
_NEAR_TAG = 0x6E656172   # "near": the purpose tag of near-copy transform draws (data_pipeline.keyed_random)


def _nonnegative(limit: float | None = None):
    return lambda v: v >= 0 and (limit is None or v <= limit)


@dataclasses.dataclass(frozen=True, kw_only=True)
class NearDuplicateConfig(ConfigSection):
    """Ranges of the per-copy changes of a near duplicate; each copy draws every value uniformly.

    The defaults keep a near copy recognisably the same acquisition: on 40 NIH sample images x 5 copies,
    a copy's pixel correlation to its source at 32 px has median 0.968 (5th percentile 0.907), above the
    nearest OTHER patient's (median 0.882). Real NIH follow-ups of one patient differ far more (best
    follow-up median 0.749 over 168 patients): these are re-acquisitions, not disease follow-ups.
    Shift and crop move the correlation most; contrast, brightness and noise hardly (Pearson ignores gain).
    """
    SECTION = "data.planted.near"
    rotation_deg: float = constrained(2.0, "float in [0, 20]", _nonnegative(20))       # +- degrees
    shift: float = constrained(0.02, "float in [0, 0.2]", _nonnegative(0.2))            # +- fraction of the side, per axis
    crop: float = constrained(0.03, "float in [0, 0.2]", _nonnegative(0.2))             # [0, crop] cut per side, then resized back
    contrast: float = constrained(0.10, "float in [0, 0.5]", _nonnegative(0.5))         # gain in [1 - c, 1 + c] about the mean
    brightness: float = constrained(0.03, "float in [0, 0.3]", _nonnegative(0.3))       # +- offset, fraction of full range
    noise: float = constrained(0.02, "float in [0, 0.2]", _nonnegative(0.2))            # Gaussian sd in [0, noise], fraction of full range

    def draw(self, rng: np.random.Generator) -> dict:
        """One copy's transform (JSON-able): every parameter, and the seed of its noise."""
        u = lambda r: float(rng.uniform(-r, r))  # noqa: E731
        return {"rotation_deg": u(self.rotation_deg), "shift": [u(self.shift), u(self.shift)],
                "crop": [float(rng.uniform(0, self.crop)) for _ in range(4)],
                "contrast": 1.0 + u(self.contrast), "brightness": u(self.brightness),
                "noise_std": float(rng.uniform(0, self.noise)), "noise_seed": int(rng.integers(2**62))}


def _doses_ok(v) -> bool:
    doses = (v,) if isinstance(v, int) else v
    return len(doses) > 0 and all(d >= 1 for d in doses) and len(set(doses)) == len(doses)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlantedConfig(ConfigSection):
    """The `data.planted` section: K images per (dose, kind) cell, each planted `dose` times."""
    SECTION = "data.planted"
    k: int = constrained(REQUIRED, "int >= 1", lambda v: v >= 1)        # planted images per (dose, kind) cell
    copies: tuple[int, ...] | int = constrained(REQUIRED, "an int >= 1 or a list of distinct ints >= 1", _doses_ok)
    kinds: tuple[Literal["exact", "near"], ...] = ("exact",)
    near: NearDuplicateConfig = dataclasses.field(default_factory=NearDuplicateConfig)
    seed: int = 0

    @property
    def dose_levels(self) -> tuple[int, ...]:
        return (self.copies,) if isinstance(self.copies, int) else tuple(self.copies)

    def check(self) -> None:
        if not self.kinds or len(set(self.kinds)) != len(self.kinds):
            raise FieldError("kinds", f"expected a non-empty list of distinct kinds from {list(KINDS)}, "
                                      f"got {list(self.kinds)}")

    def images_needed(self) -> int:
        """Distinct training images taken: K sources per cell, and C control images per planted entry."""
        return self.k * len(self.kinds) * (len(self.dose_levels) + sum(self.dose_levels))


# ---- choosing sources and control members ----------------------------------------------------------

def _patient_first_order(records: Sequence[XrayRecord], rng: np.random.Generator) -> list[int]:
    """A seeded random order with each patient's first image before any patient's second."""
    seen, first, rest = set(), [], []
    for i in rng.permutation(len(records)):
        (rest if records[i].patient_id in seen else first).append(int(i))
        seen.add(records[i].patient_id)
    return first + rest


def _phrases(record: XrayRecord) -> tuple[frozenset[str], frozenset[str]]:
    """(label phrases: findings and uncertain findings, the other phrases: view, projection, sex, age)."""
    parts = parts_for(dataclasses.replace(record, extra_tokens=()))
    labels = frozenset(parts.findings) | frozenset("uncertain " + u for u in parts.uncertain)
    return labels, frozenset(parts.tokens()) - labels


def _mismatch(a: tuple[frozenset, frozenset], b: tuple[frozenset, frozenset]) -> tuple[int, int]:
    """(differing label phrases, differing other phrases) of two prompts."""
    return len(a[0] ^ b[0]), len(a[1] ^ b[1])


def _choose_members(anchor: int, pool: list[int], phrases: dict[int, tuple], count: int) -> list[int]:
    """The `count` pool images whose prompts differ least from the anchor's: fewest differing findings
    first (the labels a shared prompt would get wrong), then fewest differing view/sex/age phrases
    (pool order breaks ties)."""
    mine = phrases[anchor]
    ranked = sorted(range(len(pool)), key=lambda j: (_mismatch(phrases[pool[j]], mine), j))
    return [pool[j] for j in ranked[:count]]


def _cell_entries(cfg: PlantedConfig) -> list[tuple[int, str, str]]:
    """(dose, kind, half) of every planted entry in token order; halves alternate inside each cell, and
    which half gets an odd K's extra entry alternates over kinds and doses, so every cell is split
    K//2 : K - K//2 and the halves' totals differ by at most one per dose level."""
    cells = [(d, kind) for d in cfg.dose_levels for kind in cfg.kinds]
    per_dose = len(cfg.kinds)
    return [(dose, kind, SPLITS[(j + c + c // per_dose) % 2]) for j in range(cfg.k)
            for c, (dose, kind) in enumerate(cells)]


def _control_record(member: XrayRecord, anchor: XrayRecord, token: str) -> XrayRecord:
    """A control row: the member's image under the anchor's prompt (and labels) plus the control token."""
    return dataclasses.replace(member, findings=anchor.findings, uncertain=anchor.uncertain, view=anchor.view,
                               projection=anchor.projection, sex=anchor.sex, age=anchor.age, labels=anchor.labels,
                               extra_tokens=tuple(anchor.extra_tokens) + (token,))


def plant_duplicates(records: Sequence[XrayRecord], cfg: PlantedConfig,
                     near_dir: str | None = None) -> tuple[list[XrayRecord], dict]:
    """Return (records with planted copies appended and control rows rewritten, manifest v2).

    Near copies get paths `near_dir/<token>_cNNN.png` (write them with `write_near_copies`).
    """
    records = list(records)
    entries = _cell_entries(cfg)
    n_controls = sum(dose for dose, _, _ in entries)
    if len(records) < cfg.images_needed():
        raise ValueError(f"data.planted: {len(entries)} planted images and {len(entries)} controls of "
                         f"{n_controls} images need {cfg.images_needed()} distinct training images, the train "
                         f"split has {len(records)}")
    if "near" in cfg.kinds and not near_dir:
        raise ValueError("data.planted: near duplicates need a folder to write their images to")
    rng = np.random.default_rng(cfg.seed)
    order = _patient_first_order(records, rng)
    sources = order[:len(entries)]
    planted_patients = {records[i].patient_id for i in sources}
    pool = [i for i in order[len(entries):] if records[i].patient_id not in planted_patients]
    if len(pool) < n_controls:
        raise ValueError(f"data.planted: the controls need {n_controls} images of patients other than the "
                         f"{len(planted_patients)} planted ones, the train split has {len(pool)}")
    width = max(3, len(str(len(entries) - 1)))
    out = list(records)
    manifest = {"version": MANIFEST_VERSION, "seed": cfg.seed, "dose_levels": list(cfg.dose_levels),
                "kinds": list(cfg.kinds), "per_level": cfg.k, "near": to_jsonable(cfg.near),
                "planted": [], "controls": [], "ordinary_split_seed": cfg.seed,
                "control_members": "anchor: the image of another patient whose prompt is nearest the planted "
                                   "source's; members: C distinct images whose prompts differ least from the "
                                   "anchor's (fewest differing findings, then fewest differing view/sex/age "
                                   "phrases), all rows under the anchor's prompt; label_mismatch / "
                                   "phrase_mismatch count each member's differing findings / other phrases"}
    for e, (dose, kind, half) in enumerate(entries):
        token, src = f"{PLANTED_PREFIX}{e:0{width}d}", records[sources[e]]
        entry = {"token": token, "image_path": src.image_path, "patient_id": src.patient_id, "copies": dose,
                 "kind": kind, "prompt": prompt_for(src.with_extra_tokens((token,))), "split": half}
        if kind == "exact":
            entry["copy_paths"] = [src.image_path] * dose
            out.extend(src.with_extra_tokens((token,)) for _ in range(dose))
        else:
            entry["copy_paths"] = [os.path.join(near_dir, f"{token}_c{j:03d}.png") for j in range(dose)]
            entry["transforms"] = [cfg.near.draw(keyed_rng(cfg.seed, e, j, _NEAR_TAG)) for j in range(dose)]
            out.extend(dataclasses.replace(src, image_path=path, study_id=f"{src.study_id}/near{j}")
                       .with_extra_tokens((token,)) for j, path in enumerate(entry["copy_paths"]))
        manifest["planted"].append(entry)
    phrases = {i: _phrases(records[i]) for i in pool + sources}
    # Largest controls first: they need the most members and get the widest choice. The anchor is the
    # pool image whose prompt is nearest its planted match's (same content, so prompt content is no
    # confound either); the other members are the images nearest the anchor's prompt.
    for e in sorted(range(len(entries)), key=lambda e: (-entries[e][0], e)):
        dose, _, half = entries[e]
        token, anchor = f"{CONTROL_PREFIX}{e:0{width}d}", _choose_members(sources[e], pool, phrases, 1)[0]
        members = [anchor] + _choose_members(anchor, [i for i in pool if i != anchor], phrases, dose - 1)
        pool = [i for i in pool if i not in set(members)]
        for i in members:
            out[i] = _control_record(records[i], records[anchor], token)
        manifest["controls"].append({
            "token": token, "copies": dose, "image_paths": [records[i].image_path for i in members],
            "prompt": prompt_for(out[anchor]), "matched_to": manifest["planted"][e]["token"], "split": half,
            "label_mismatch": [_mismatch(phrases[i], phrases[anchor])[0] for i in members],
            "phrase_mismatch": [_mismatch(phrases[i], phrases[anchor])[1] for i in members]})
    manifest["controls"].sort(key=lambda c: c["token"])
    return out, manifest


def manifest_tokens(manifest: dict) -> list[str]:
    """Every dedicated token of a manifest (planted first, then controls)."""
    return [p["token"] for p in manifest["planted"]] + [c["token"] for c in manifest["controls"]]


# ---- near copies: the images ------------------------------------------------------------------------

def near_duplicate(image: np.ndarray, t: dict) -> np.ndarray:
    """uint8 [H, W] -> the same image cropped (and scaled back), rotated, shifted, re-windowed and noised by `t`."""
    h, w = image.shape
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    left, top, right, bottom = t["crop"]
    img = Image.fromarray(np.asarray(image, np.uint8)).resize(
        (w, h), Image.BILINEAR, box=(left * w, top * h, w - right * w, h - bottom * h))
    img = img.rotate(t["rotation_deg"], resample=Image.BILINEAR, translate=(t["shift"][0] * w, t["shift"][1] * h),
                     fillcolor=int(np.median(border)))
    x = np.asarray(img, np.float64) / 255.0
    x = x.mean() + t["contrast"] * (x - x.mean()) + t["brightness"]
    x = x + keyed_rng(t["noise_seed"]).normal(0.0, t["noise_std"], x.shape)
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def write_near_copies(manifest: dict) -> int:
    """Write every near copy the manifest lists (from its source and transform); returns how many were
    written. A copy already on disk with the same pixels is kept (a resumed run); one with other pixels
    is a one-line error: it was made by another seed or config, and is not ours to overwrite."""
    written = 0
    for entry in manifest.get("planted", []):
        if entry.get("kind") != "near":
            continue
        with Image.open(entry["image_path"]) as img:
            source = np.asarray(open_gray(img), np.uint8)
        for path, t in zip(entry["copy_paths"], entry["transforms"]):
            pixels = near_duplicate(source, t)
            if os.path.exists(path):
                if not np.array_equal(read_png(path), pixels):
                    raise ValueError(f"{path}: holds another image than the planted near copy this config makes; "
                                     f"use a new output_dir")
                continue
            write_png(path, pixels)
            written += 1
    return written
