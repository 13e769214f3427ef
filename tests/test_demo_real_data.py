"""Real-data smoke test of the study's design: the demo's configs with `--data nih` on the NIH sample.

`tools/demo --data nih --root DIR` trains on the demo configs with data.format=nih and data.root=DIR;
this prepares exactly that dataset (32 px) and checks the planted v2 design landed on real radiographs:
every planted prompt is C rows of the train split, every control C distinct real images under one
prompt, and near copies are closer to their source than the source's nearest other patient (pixel
correlation at 32 px, computed here independently). The full study is not part of the suite.
"""
import collections
import os

import numpy as np
import pytest

from data_pipeline.dataset import prepare_dataset
from data_pipeline.dataset_stats import check_dataset_root
from engine.training.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NIH_SAMPLE = os.path.join(os.path.dirname(REPO), "shared", "data", "nih-cxr14-sample")


def _corr(a, b):
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(np.corrcoef(a, b)[0, 1])


@pytest.mark.skipif(not os.path.isdir(NIH_SAMPLE),
                    reason=f"NIH ChestX-ray14 sample not found at {NIH_SAMPLE}: real-data smoke test skipped")
def test_demo_planted_design_on_the_nih_sample(tmp_path):
    check_dataset_root(NIH_SAMPLE, "nih")
    cfg = load_config(os.path.join(REPO, "configs", "demo_cpu.json"),
                      [f"data.root={NIH_SAMPLE}", "data.format=nih", f"data.cache_dir={tmp_path / 'cache'}",
                       f"output_dir={tmp_path / 'run'}"])
    data = prepare_dataset(cfg.data, str(tmp_path / "run"), progress=False)
    m, train = data.manifest, data.splits["train"]
    planted_cfg = cfg.data.planted
    assert m["version"] == 2 and m["dose_levels"] == list(planted_cfg.copies)
    cells = collections.Counter((p["copies"], p["kind"]) for p in m["planted"])
    assert cells == {(c, k): planted_cfg.k for c in planted_cfg.copies for k in planted_cfg.kinds}
    assert len(m["controls"]) == len(m["planted"]) >= 40

    row_of_prompt = collections.defaultdict(list)
    for i, prompt in enumerate(train.prompts):
        row_of_prompt[prompt].append(i)
    by_path = {r.image_path: i for i, r in enumerate(train.records)}
    for p in m["planted"]:
        assert p["image_path"].startswith(os.path.abspath(NIH_SAMPLE)) or p["image_path"].startswith(NIH_SAMPLE)
        rows = row_of_prompt[p["prompt"]]
        assert len(rows) == p["copies"]
        if p["kind"] == "exact":
            assert all(np.array_equal(train.images[i], train.images[rows[0]]) for i in rows)
    for c in m["controls"]:
        rows = row_of_prompt[c["prompt"]]
        assert len(rows) == c["copies"] and len({train.records[i].image_path for i in rows}) == c["copies"]

    # near copies: each copy is closer to its source than the source's nearest other patient is
    source_rows = {r.image_path: i for i, r in enumerate(train.records) if r.image_path in
                   {p["image_path"] for p in m["planted"]}}
    patient = np.array([r.patient_id for r in train.records])
    checked = 0
    for p in (p for p in m["planted"] if p["kind"] == "near" and p["image_path"] in source_rows):
        src = train.images[source_rows[p["image_path"]]]
        others = np.flatnonzero(patient != p["patient_id"])[:300]
        nearest_other = max(_corr(src, train.images[j]) for j in others)
        copies = [train.images[by_path[path]] for path in p["copy_paths"]]
        assert np.median([_corr(src, c) for c in copies]) > nearest_other
        checked += 1
    assert checked >= 5
