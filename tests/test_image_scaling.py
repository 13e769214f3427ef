"""data_pipeline.images owns image scaling: uint8 [0, 255] <-> model range [-1, 1], checked against the
formula x / 127.5 - 1, for read-only arrays too (memory-mapped caches) without a warning."""
import warnings

import numpy as np
import torch

from data_pipeline.images import image_tensor, to_model_range, to_uint8


def test_uint8_to_model_range_is_the_formula_for_writable_read_only_and_tensor_input():
    a = np.arange(256, dtype=np.uint8).reshape(2, 8, 16)
    expected = torch.from_numpy(a.astype(np.float64) / 127.5 - 1.0).float()
    frozen = a.copy()
    frozen.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")         # torch warns when it wraps non-writable numpy memory
        outs = [to_model_range(a), to_model_range(frozen), to_model_range(torch.from_numpy(a))]
    # the read-only array is copied, not wrapped: writing to its tensor leaves the array as it was (the
    # warning above is printed once per process, so this is the check that holds in a full test run)
    t = image_tensor(frozen)
    t[0, 0, 0] = 7
    assert frozen[0, 0, 0] == 0 and t[0, 0, 0] == 7
    for x in outs:
        assert x.shape == (2, 1, 8, 16) and x.dtype == torch.float32
        assert torch.allclose(x[:, 0], expected, atol=1e-6, rtol=0)
    assert to_model_range(a, channel_dim=False).shape == (2, 8, 16)
    assert x[0, 0, 0, 0] == -1.0 and x[1, 0, -1, -1] == 1.0


def test_uint8_round_trip_is_exact():
    a = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    assert np.array_equal(to_uint8(to_model_range(a)), a)


def test_read_only_batches_become_tensors_without_a_warning():
    from engine.audit.clip_embedding import ClipEmbedder, ClipSpec
    from engine.audit.copy_detection import CopyDetectorConfig, prepare_input
    a = np.random.default_rng(0).integers(0, 256, (3, 32, 32), dtype=np.uint8)
    a.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = prepare_input(a, CopyDetectorConfig(backbone="tiny"), "cpu")
        e = ClipEmbedder(ClipSpec("memdiff-tiny")).embed(a, batch_size=2)
    lo = x.amin(dim=(1, 2, 3))
    assert x.shape == (3, 1, 32, 32) and torch.allclose(lo, torch.zeros(3)) and e.shape[0] == 3
