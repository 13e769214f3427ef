"""data_pipeline.images owns image scaling: uint8 [0, 255] <-> model range [-1, 1], checked against the
formula x / 127.5 - 1, for read-only arrays too (memory-mapped caches) without a warning."""
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch

from data_pipeline.images import image_tensor, to_model_range, to_uint8

REPO = Path(__file__).resolve().parents[1]


def test_uint8_to_model_range_is_the_formula_for_writable_read_only_and_tensor_input():
    a = np.arange(256, dtype=np.uint8).reshape(2, 8, 16)
    expected = torch.from_numpy(a.astype(np.float64) / 127.5 - 1.0).float()
    frozen = a.copy()
    frozen.flags.writeable = False
    outs = [to_model_range(a), to_model_range(frozen), to_model_range(torch.from_numpy(a))]
    # the read-only array is copied, not wrapped: writing to its tensor leaves the array as it was
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
    """torch warns once per process when it wraps non-writable numpy memory, so an earlier test could hide
    it: a fresh interpreter turns that warning into an error and feeds a read-only batch to every reader."""
    script = textwrap.dedent("""
        import warnings
        warnings.filterwarnings("error", message=".*not writable.*")
        import numpy as np, torch
        from data_pipeline.images import to_model_range
        from engine.audit.clip_embedding import ClipEmbedder, ClipSpec
        from engine.audit.copy_detection import CopyDetectorConfig, build_embedder, prepare_input
        from engine.audit.deepssim import DeepSSIM, DeepSSIMConfig
        a = np.random.default_rng(0).integers(0, 256, (3, 32, 32), dtype=np.uint8)
        a.flags.writeable = False
        to_model_range(a)
        x = prepare_input(a, CopyDetectorConfig(backbone="tiny"), "cpu")
        assert torch.allclose(x.amin(dim=(1, 2, 3)), torch.zeros(3)) and x.shape == (3, 1, 32, 32)
        assert ClipEmbedder(ClipSpec("memdiff-tiny")).embed(a, batch_size=2).shape[0] == 3
        deepssim = DeepSSIM(build_embedder("tiny", 8), DeepSSIMConfig(backbone="tiny", embed_dim=8))
        assert deepssim.embed(a, batch_size=2).shape == (3, 8)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
