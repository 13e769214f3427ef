"""The preprocessing cache, prepare_dataset, and the DALI / PyTorch loaders."""
import json
import os

import numpy as np
import pytest
import torch

from data_pipeline import loaders
from data_pipeline.augment import AugmentConfig, augment_batch
from data_pipeline.cache import decode_image, load_or_build_cache
from data_pipeline.dataset import data_config, prepare_dataset
from data_pipeline.loaders import IndexStream, choose_backend, dali_available, make_loader
from data_pipeline.synthetic import make_synthetic_chexpert

NIH_SAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "nih-cxr14-sample")


def dali_runs():
    ok, why = dali_available()
    if not ok:
        return False, why
    try:
        from nvidia.dali import fn, pipeline_def, types
        @pipeline_def(batch_size=1, num_threads=1, device_id=None)
        def p():
            return fn.external_source(source=lambda: [np.zeros((2, 2, 1), np.uint8)], batch=True, dtype=types.UINT8)
        pipe = p()
        pipe.build()
        pipe.run()
        return True, ""
    except Exception as e:
        return False, f"{type(e).__name__}: {e}"


DALI_OK, DALI_WHY = dali_runs()
needs_dali = pytest.mark.skipif(not DALI_OK, reason=f"DALI cannot run here: {DALI_WHY}")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    root = make_synthetic_chexpert(str(base / "CheXpert-v1.0-small"), 60, seed=0, image_size=64, progress=False)
    cfg = {"format": "synthetic", "root": root, "image_size": 32, "cache_dir": str(base / "cache"),
           "planted": {"k": 1, "copies": [2, 3], "kinds": ["exact", "near"], "seed": 0},
           "split_fractions": [0.7, 0.15, 0.15]}
    return prepare_dataset(data_config(cfg), str(base / "run"), progress=False), base


def test_cache_matches_decoder_skips_corrupt_and_rebuilds(tmp_path):
    root = make_synthetic_chexpert(str(tmp_path / "s"), 6, seed=1, image_size=48, progress=False)
    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".jpg"))
    corrupt = str(tmp_path / "corrupt.jpg")
    open(corrupt, "wb").write(open(paths[0], "rb").read()[:200])      # truncated JPEG
    sources = paths + [corrupt, str(tmp_path / "missing.jpg")]
    first = load_or_build_cache(sources, 32, str(tmp_path / "c"), progress=False)
    assert first.rebuilt and first.images.shape == (len(sources), 32, 32) and first.images.dtype == np.uint8
    assert first.ok.tolist() == [True] * len(paths) + [False, False]
    assert len(first.skipped) == 2 and "corrupt.jpg" in first.skipped[0] and "missing.jpg" in first.skipped[1]
    for i, p in enumerate(paths):
        assert np.array_equal(first.images[i], decode_image(p, 32))
    again = load_or_build_cache(sources, 32, str(tmp_path / "c"), progress=False)
    assert not again.rebuilt and np.array_equal(again.images, first.images)
    assert load_or_build_cache(sources, 40, str(tmp_path / "c"), progress=False).rebuilt          # size changed
    assert load_or_build_cache(paths[:-1], 32, str(tmp_path / "c"), progress=False).rebuilt       # list changed
    os.utime(paths[1], ns=(1, 1))
    assert load_or_build_cache(sources, 32, str(tmp_path / "c"), progress=False).rebuilt          # a file changed
    with pytest.raises(ValueError, match="image_size"):
        load_or_build_cache(paths, 16, str(tmp_path / "c"))


def test_prepare_dataset_outputs(prepared):
    data, base = prepared
    run = base / "run"
    assert json.load(open(run / "planted_manifest.json")) == data.manifest
    splits_json = json.load(open(run / "splits.json"))
    assert {k: len(v) for k, v in splits_json["splits"].items()} == {k: len(v) for k, v in data.splits.items()}
    from data_pipeline.vocab import Vocabulary
    assert Vocabulary.load(str(run / "vocab.json")) == data.vocab
    train = data.splits["train"]
    assert train.images.dtype == np.uint8 and train.images.shape[1:] == (32, 32)
    assert train.tokens.dtype == torch.long and train.tokens.shape == (len(train), data.vocab.max_len)
    for i in range(len(train)):
        assert data.vocab.decode(train.tokens[i].tolist()) == train.prompts[i]
        assert np.array_equal(train.images[i], decode_image(train.records[i].image_path, 32))
    for planted in data.manifest["planted"]:
        rows = [i for i, r in enumerate(train.records) if planted["token"] in r.extra_tokens]
        assert [train.records[i].image_path for i in rows] == planted["copy_paths"]
        source = decode_image(planted["image_path"], 32)
        if planted["kind"] == "exact":
            assert all(np.array_equal(train.images[i], source) for i in rows)
        else:   # near copies: files in the run directory, each changed a little from the source
            assert all(p.startswith(str(run / "planted_images")) for p in planted["copy_paths"])
            corr = [np.corrcoef(train.images[i].ravel(), source.ravel())[0, 1] for i in rows]
            assert all(0.8 < c < 1.0 for c in corr), corr
    again = prepare_dataset(data.config, str(run), progress=False)   # a resumed run: same files, same data
    assert again.manifest == data.manifest and np.array_equal(again.splits["train"].images, train.images)


@pytest.mark.parametrize("bad, key", [({"colour": 1}, "data.colour"), ({"image_size": 16}, "data.image_size"),
                                      ({"planted": {"k": 0, "copies": 2}}, "data.planted.k"),
                                      ({"format": "dicom"}, "data.format"), ({"split_fractions": [1, 1, 0]}, "data.split_fractions")])
def test_data_config_errors_name_the_key(tmp_path, bad, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        data_config({"root": str(tmp_path), **bad})


def take(loader, n):
    return [next(loader) for _ in range(n)]


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=needs_dali)])
def test_loader_resume_and_shapes(prepared, backend):
    train = prepared[0].splits["train"]
    aug = AugmentConfig(rotation_p=1.0, noise_p=1.0, jitter_p=1.0)
    full = take(make_loader(train, 5, seed=3, backend=backend, augment=aug), 6)
    resumed = take(make_loader(train, 5, seed=3, backend=backend, augment=aug, start_step=4), 2)
    for (x, t, i), (y, u, j) in zip(full[4:], resumed):
        assert torch.equal(i, j) and torch.equal(t, u) and torch.equal(x, y)
    x, t, i = full[0]
    assert x.shape == (5, 1, 32, 32) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    assert t.dtype == torch.long and i.dtype == torch.long and torch.equal(t, train.tokens[i])
    other = next(make_loader(train, 5, seed=4, backend=backend))
    assert not torch.equal(other[2], i)


@needs_dali
def test_dali_and_torch_give_the_same_batches(prepared):
    train = prepared[0].splits["train"]
    torch_batches = take(make_loader(train, 7, seed=1, backend="torch"), 4)
    dali_batches = take(make_loader(train, 7, seed=1, backend="dali"), 4)
    for (x, t, i), (y, u, j) in zip(torch_batches, dali_batches):
        assert torch.equal(i, j) and torch.equal(t, u)
        reference = torch.from_numpy(train.images[i.numpy()]).float().unsqueeze(1) / 127.5 - 1
        assert torch.allclose(x, reference, atol=1e-6) and torch.allclose(y, reference, atol=1e-6)
    # With augmentation on, DALI's rotate/jitter ops reproduce the torch reference closely.
    aug = AugmentConfig(rotation_deg=8.0, rotation_p=1.0, noise_p=1.0, jitter_p=1.0)
    (x, _, i), (y, _, j) = next(make_loader(train, 7, seed=2, backend="torch", augment=aug)), \
        next(make_loader(train, 7, seed=2, backend="dali", augment=aug))
    plain = torch.from_numpy(train.images[i.numpy()]).float().unsqueeze(1) / 127.5 - 1
    assert (x - plain).abs().mean() > 0.02                      # the augmentation did something
    assert (x - y).abs().mean() < 1e-3 and (x - y)[..., 2:-2, 2:-2].abs().max() < 0.02


def test_auto_loader_is_dali_only_on_cuda(prepared, monkeypatch):
    """loader auto: the PyTorch path on the CPU even where DALI loads (it measured faster there);
    DALI on CUDA when it loads, else torch; an explicit backend is kept, a missing DALI refused."""
    monkeypatch.setattr(loaders, "dali_available", lambda: (True, ""))
    assert choose_backend("auto", "cpu")[0] == "torch"
    assert choose_backend("auto", "cuda:1")[0] == "dali"
    assert choose_backend("dali", "cpu")[0] == "dali" and choose_backend("torch", "cuda")[0] == "torch"
    train = prepared[0].splits["train"]
    auto = make_loader(train, 5, seed=3, backend="auto", device="cpu")
    assert auto.__name__ == "torch_loader"                 # not built: DALI would be dali_loader
    for (x, t, i), (y, u, j) in zip(take(auto, 2), take(make_loader(train, 5, seed=3, backend="torch"), 2)):
        assert torch.equal(x, y) and torch.equal(t, u) and torch.equal(i, j)
    monkeypatch.setattr(loaders, "dali_available", lambda: (False, "ImportError: no DALI"))
    assert choose_backend("auto", "cuda")[0] == "torch"
    with pytest.raises(RuntimeError, match="DALI requested"):
        choose_backend("dali", "cpu")
    with pytest.raises(ValueError, match="loader.backend"):
        choose_backend("gpu", "cpu")


def test_sharding_partitions_each_global_batch():
    n, b, w = 23, 4, 3
    streams = [IndexStream(n, b, seed=5, rank=r, world_size=w) for r in range(w)]
    single = IndexStream(n, b * w, seed=5)
    for step in range(10):
        shards = [s.indices(step) for s in streams]
        assert np.array_equal(np.concatenate(shards), single.indices(step))
    # Every epoch visits every record exactly once.
    stream = np.concatenate([single.indices(s) for s in range(23)])   # 23 steps x 12 = 12 epochs of 23
    assert all(sorted(stream[e * n:(e + 1) * n]) == list(range(n)) for e in range(12))


def test_augment_reference_properties():
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    g = lambda: torch.Generator().manual_seed(0)   # noqa: E731
    cfg = AugmentConfig(rotation_p=1.0, noise_p=1.0, jitter_p=1.0)
    assert torch.equal(augment_batch(x, cfg, g()), augment_batch(x, cfg, g()))
    off = AugmentConfig(rotation_p=0.0, noise_p=0.0, jitter_p=0.0)
    assert torch.allclose(augment_batch(x, off, g()), x, atol=1e-6)
    # A 90-degree rotation equals torch.rot90 (counter-clockwise as displayed).
    img = torch.zeros(1, 1, 8, 8)
    img[0, 0, 1, 5] = 1.0
    from data_pipeline.augment import rotate
    out = rotate(img, torch.tensor([90.0]))
    assert torch.allclose(out, torch.rot90(img, 1, dims=(2, 3)), atol=1e-5)
    assert AugmentConfig().hflip_p == 0.0                        # no flip unless asked
    with pytest.raises(ValueError, match="augment.noise_p"):
        AugmentConfig(noise_p=2.0)


@pytest.mark.skipif(not os.path.isdir(NIH_SAMPLE), reason=f"NIH sample not found at {NIH_SAMPLE}")
@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=needs_dali)])
def test_nih_sample_loads_through_both_paths(tmp_path_factory, backend):
    base = tmp_path_factory.getbasetemp() / "nih"
    data = prepare_dataset(data_config({"format": "nih", "root": NIH_SAMPLE, "image_size": 32,
                                        "cache_dir": str(base / "cache"), "max_images": 200}),
                           str(base / "run"), progress=False)
    x, t, i = next(make_loader(data.splits["train"], 16, seed=0, backend=backend))
    assert x.shape == (16, 1, 32, 32) and x.std() > 0.1
    reference = torch.from_numpy(data.splits["train"].images[i.numpy()]).float().unsqueeze(1) / 127.5 - 1
    assert torch.allclose(x, reference, atol=1e-6)


def test_index_stream_is_the_epoch_permutations_read_in_order():
    """Step s of rank r reads global positions (s*W + r)*B ... of the concatenated per-epoch
    permutations, batches larger than the dataset included (they span several epochs)."""
    for n, b, world in ((7, 3, 1), (5, 12, 2), (10, 10, 3)):
        streams = [IndexStream(n, b, seed=4, rank=r, world_size=world) for r in range(world)]
        flat = np.concatenate([np.random.default_rng([4, e]).permutation(n) for e in range(20)])
        for step in range(4):
            for r, s in enumerate(streams):
                start = (step * world + r) * b
                assert s.indices(step).tolist() == flat[start:start + b].tolist(), (n, b, world, step, r)
