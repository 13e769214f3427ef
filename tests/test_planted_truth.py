"""Ground truth from planted manifests (v2 and v1): groups, halves, entries, and nearest-is-planted per dose
and kind against the null rate, checked against plain counting."""
import collections
import math

import numpy as np
import pytest

from data_pipeline.config_schema import build
from data_pipeline.planted import PlantedConfig, plant_duplicates
from data_pipeline.prompts import prompt_for
from data_pipeline.records import XrayRecord
from engine.audit.planted_truth import (
    describe_manifest,
    hash_split,
    nearest_is_planted_by_cell,
    planted_entry,
    prompt_group,
    prompt_split,
    prompt_splits,
)


def records(n=200):
    rng = np.random.default_rng(0)
    return [XrayRecord(f"/d/p{p}.jpg", f"p{p}", f"p{p}/1", "synthetic",
                       tuple(f for f in ("edema", "cardiomegaly", "support devices") if rng.random() < 0.3), (),
                       "frontal", "PA", ("male", "female")[p % 2], 20 + p % 70, (math.nan,)) for p in range(n)]


@pytest.fixture(scope="module")
def planted():
    cfg = build(PlantedConfig, {"k": 4, "copies": [2, 6], "kinds": ["exact", "near"], "seed": 3}, "data.planted")
    return plant_duplicates(records(), cfg, "/run/planted_images")


def test_v2_groups_halves_and_entries(planted):
    out, manifest = planted
    prompts = sorted({prompt_for(r) for r in out})
    by_token = {e["token"]: e for e in manifest["planted"] + manifest["controls"]}
    halves = collections.Counter()
    for prompt in prompts:
        group, half = prompt_group(prompt, manifest), prompt_split(prompt, manifest)
        extra = [t for t in prompt.partition("|")[2].split() if t in by_token]
        if group == "ordinary":
            assert not extra and half == hash_split(prompt, manifest["ordinary_split_seed"])
            halves[half] += 1
            continue
        entry = by_token[extra[0]]
        assert half == entry["split"] and group == ("planted" if extra[0].startswith("plant") else "control")
        if group == "planted":
            e = planted_entry(prompt, manifest)
            assert (e.token, e.copies, e.kind, e.split, e.source) == (entry["token"], entry["copies"], entry["kind"],
                                                                      entry["split"], entry["image_path"])
            assert e.paths == {entry["image_path"], *entry["copy_paths"]}
        else:
            assert planted_entry(prompt, manifest) is None
    # the seeded hash splits ordinary prompts about evenly, and the same way every time
    assert abs(halves["calibration"] - halves["evaluation"]) < 4 * math.sqrt(sum(halves.values()))
    assert prompt_splits(prompts, manifest) == prompt_splits(prompts, manifest)
    assert hash_split("a prompt", 1) in ("calibration", "evaluation")
    assert len({hash_split(f"p{i}", 0) for i in range(20)}) == 2
    assert describe_manifest(manifest) == "16 planted images (exact, near) x 2/6 copies, 16 controls (manifest v2)"


def test_v1_manifest_still_read():
    """v1: exact copies of the manifest's C; halves by a hash of the dedicated token (else the text), manifest seed."""
    manifest = {"k": 1, "copies": 20, "seed": 5, "planted": [{"token": "plant000", "image_path": "/a.png",
                                                               "patient_id": "p1", "copies": 20}],
                "controls": [{"token": "ctrl000", "image_paths": ["/b.png", "/c.png"]}]}
    planted, control = "frontal chest x-ray | plant000", "frontal chest x-ray, male | ctrl000"
    e = planted_entry(planted, manifest)
    assert (e.copies, e.kind, e.paths, e.split) == (20, "exact", {"/a.png"}, hash_split("plant000", 5))
    assert [prompt_group(p, manifest) for p in (planted, control, "lateral chest x-ray")] == \
        ["planted", "control", "ordinary"]
    assert prompt_split(planted, manifest) == e.split
    assert prompt_split(control, manifest) == hash_split("ctrl000", 5)
    assert prompt_split("lateral chest x-ray", manifest) == hash_split("lateral chest x-ray", 5)
    assert describe_manifest(manifest) == "1 planted images (exact) x 20 copies, 1 controls (manifest v1)"


def test_nearest_is_planted_by_cell_against_counting(planted):
    """Random nearest paths (with hits planted in): every cell's rate and null are the plain counts."""
    out, manifest = planted
    rng = np.random.default_rng(1)
    prompts = sorted({prompt_for(r) for r in out})
    train_paths = sorted({r.image_path for r in out})
    g = 3
    nearest = rng.choice(train_paths, size=(len(prompts), g))
    for i, prompt in enumerate(prompts):          # planted prompts hit their image (a copy for near) at random
        e = planted_entry(prompt, manifest)
        if e is not None:
            for j in range(g):
                if rng.random() < 0.3 + 0.1 * e.copies:
                    nearest[i, j] = sorted(e.paths)[j % len(e.paths)]
    truth = nearest_is_planted_by_cell(nearest, prompts, manifest, n_boot=200)
    entries = {i: planted_entry(p, manifest) for i, p in enumerate(prompts)}
    others = [i for i, p in enumerate(prompts) if prompt_group(p, manifest) != "planted"]
    for cell in truth["by_cell"]:
        mine = [i for i, e in entries.items() if e and (e.copies, e.kind) == (cell["copies"], cell["kind"])]
        hits = [nearest[i, j] in entries[i].paths for i in mine for j in range(g)]
        assert cell["rate"] == pytest.approx(np.mean(hits)) and cell["n_prompts"] == len(mine)
        assert cell["ci95"][0] <= cell["rate"] <= cell["ci95"][1]
        images = {entries[i].token: entries[i].paths for i in mine}
        null = np.mean([np.mean([nearest[q, j] in paths for q in others for j in range(g)])
                        for paths in images.values()])
        assert cell["null_rate"] == pytest.approx(null) and cell["n_null_generations"] == len(others) * g
    assert [c["copies"] for c in truth["by_copies"]] == [2, 6] and [c["kind"] for c in truth["by_kind"]] == \
        ["exact", "near"]
    all_hits = [nearest[i, j] in e.paths for i, e in entries.items() if e for j in range(g)]
    assert truth["all"]["rate"] == pytest.approx(np.mean(all_hits))
