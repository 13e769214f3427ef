"""Images/s of the DALI loader vs the PyTorch DataLoader path, at 64 and 256 px, on a synthetic
CheXpert set and on the real NIH sample (skipped when absent). Augmentation on (the realistic
training case); both read the uint8 preprocessing cache, built once outside the timing.

    pytest bench/bench_loaders.py --benchmark-only
"""
import os

import pytest

from data_pipeline.augment import AugmentConfig
from data_pipeline.dataset import data_config, prepare_dataset
from data_pipeline.loaders import dali_available, make_loader

NIH_SAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "nih-cxr14-sample")
BATCH, STEPS = 32, 10
SYNTHETIC_IMAGES = 300


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    base = tmp_path_factory.mktemp("bench_loaders")
    cache = {}

    def get(name, size):
        if (name, size) not in cache:
            if name == "nih":
                if not os.path.isdir(NIH_SAMPLE):
                    pytest.skip(f"NIH sample not found at {NIH_SAMPLE}")
                cfg = {"format": "nih", "root": NIH_SAMPLE}
            else:
                cfg = {"format": "synthetic", "root": str(base / "CheXpert-v1.0-small"), "synthetic_images": SYNTHETIC_IMAGES}
            cfg.update(image_size=size, cache_dir=str(base / "cache"))
            prepared = prepare_dataset(data_config(cfg), str(base / f"run-{name}-{size}"), progress=False)
            cache[(name, size)] = prepared.splits["train"]
        return cache[(name, size)]
    return get


@pytest.mark.parametrize("dataset", ["synthetic", "nih"])
@pytest.mark.parametrize("size", [64, 256])
@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_loader_throughput(benchmark, datasets, dataset, size, backend):
    if backend == "dali" and not dali_available()[0]:
        pytest.skip(f"DALI unavailable: {dali_available()[1]}")
    split = datasets(dataset, size)
    loader = make_loader(split, BATCH, seed=0, backend=backend, augment=AugmentConfig())
    next(loader)   # pipeline build / first batch outside the timing

    def run():
        for _ in range(STEPS):
            next(loader)

    benchmark.pedantic(run, rounds=3, iterations=1)
    benchmark.extra_info["images_per_s"] = BATCH * STEPS / benchmark.stats.stats.mean
    benchmark.extra_info["n_images"] = len(split)
