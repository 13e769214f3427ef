"""Batches for training: a DALI pipeline and a plain PyTorch DataLoader path with the same stream.

Both yield (images float32 [-1, 1] [B, 1, S, S], tokens int64 [B, L], index int64 [B]) forever.
Which rows form a batch is a pure function of (seed, step, rank, world_size): the records are
visited epoch by epoch, each epoch a permutation seeded by (seed, epoch); the global batch of a
step holds batch_size * world_size consecutive positions of that stream, and rank r takes its
r-th slice (sharding). Resuming at `start_step` therefore continues exactly the same stream.

DALI design: images come from the uint8 preprocessing cache through `external_source` (the JPEGs
were decoded once when the cache was built, so there is nothing left to decode per step); the
augmentation (rotation, contrast/brightness) runs as DALI ops, on the GPU when `device` is CUDA
and in a CPU pipeline (device_id=None) otherwise. Its per-sample parameters are drawn from the
same (seed, step) generator as the torch path; Gaussian noise is added afterwards in torch from
that generator, so a resumed DALI stream is identical too. With augmentation off both paths give
the same images for the same indices.
"""
from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
import torch

from .augment import AugmentConfig, AugmentParams, add_noise, augment_batch, draw_params
from .dataset import SplitData
from .images import to_model_range

log = logging.getLogger(__name__)
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class IndexStream:
    """Record indices of every (step, rank): seeded epoch permutations, sharded by rank."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if n < 1:
            raise ValueError("loader: the split has no images")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"loader: bad batch_size={batch_size}, rank={rank}, world_size={world_size}")
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perms[epoch]

    def indices(self, step: int) -> np.ndarray:
        start = (step * self.world_size + self.rank) * self.batch_size
        positions = np.arange(start, start + self.batch_size, dtype=np.int64)
        epochs, offsets = positions // self.n, positions % self.n
        out = np.empty(self.batch_size, dtype=np.int64)
        for e in np.unique(epochs):   # a batch spans one epoch, or a few when batch > n
            m = epochs == e
            out[m] = self._perm(int(e))[offsets[m]]
        return out

    def generator(self, step: int) -> torch.Generator:
        """The augmentation generator of a step (distinct per rank)."""
        state = np.random.SeedSequence([self.seed, step, self.rank, 0xA46]).generate_state(2, dtype=np.uint64)
        return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


class _StepBatches(torch.utils.data.Dataset):
    """Item `step` is the whole batch of that step (the DataLoader runs with batch_size=None)."""

    def __init__(self, split: SplitData, stream: IndexStream, augment: AugmentConfig | None):
        self.split, self.stream, self.augment = split, stream, augment

    def __len__(self) -> int:   # the sampler is infinite; this only satisfies the interface
        return 2**62

    def __getitem__(self, step: int) -> Batch:
        idx = self.stream.indices(step)
        images = to_model_range(self.split.images[idx])
        if self.augment is not None:
            images = augment_batch(images, self.augment, self.stream.generator(step))
        return images, self.split.tokens[idx], torch.from_numpy(idx)


def _count_from(start: int):
    step = start
    while True:
        yield step
        step += 1


def torch_loader(split: SplitData, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1,
                 start_step: int = 0, augment: AugmentConfig | None = None, device: str = "cpu",
                 num_workers: int = 0) -> Iterator[Batch]:
    stream = IndexStream(len(split.images), batch_size, seed, rank, world_size)
    loader = torch.utils.data.DataLoader(
        _StepBatches(split, stream, augment), batch_size=None, sampler=_count_from(start_step),
        num_workers=num_workers, pin_memory=torch.device(device).type == "cuda")
    for images, tokens, index in loader:
        yield images.to(device, non_blocking=True), tokens.to(device, non_blocking=True), index.to(device)


def dali_available() -> tuple[bool, str]:
    try:
        import nvidia.dali  # noqa: F401
        return True, ""
    except Exception as e:   # missing wheel, or a wheel that cannot load its libraries
        return False, f"{type(e).__name__}: {e}"


def dali_loader(split: SplitData, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1,
                start_step: int = 0, augment: AugmentConfig | None = None, device: str = "cpu",
                num_threads: int = 2, prefetch: int = 2) -> Iterator[Batch]:
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, pipeline_def, types

    stream = IndexStream(len(split.images), batch_size, seed, rank, world_size)
    torch_device = torch.device(device)
    on_gpu = torch_device.type == "cuda"
    device_id = (torch_device.index if torch_device.index is not None else torch.cuda.current_device()) if on_gpu else None
    # step -> (parameters, the step's generator just after drawing them: the noise comes next, as
    # on the torch path). The pipeline's sources read a step ahead of the loop that consumes it.
    params_cache: dict[int, tuple[AugmentParams, torch.Generator]] = {}

    def params_and_generator(step: int) -> tuple[AugmentParams, torch.Generator]:
        if step not in params_cache:
            if len(params_cache) > 4 * prefetch + 8:
                params_cache.pop(min(params_cache))
            gen = stream.generator(step)
            params_cache[step] = (draw_params(batch_size, augment, gen), gen)
        return params_cache[step]

    def images_of(info):
        idx = stream.indices(start_step + info.iteration)
        return [np.ascontiguousarray(split.images[i])[:, :, None] for i in idx]

    def scalar_of(name):
        def source(info):
            values = getattr(params_and_generator(start_step + info.iteration)[0], name).numpy().astype(np.float32)
            return [np.array(v, dtype=np.float32) for v in values]
        return source

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                  prefetch_queue_depth=prefetch, seed=seed)
    def pipeline():
        images = fn.external_source(source=images_of, batch=True, batch_info=True, layout="HWC", dtype=types.UINT8)
        if on_gpu:
            images = images.gpu()
        x = fn.cast(images, dtype=types.FLOAT) * (1.0 / 255.0)
        if augment is not None:
            angle = fn.external_source(source=scalar_of("angle_deg"), batch=True, batch_info=True, dtype=types.FLOAT)
            contrast = fn.external_source(source=scalar_of("contrast"), batch=True, batch_info=True, dtype=types.FLOAT)
            brightness = fn.external_source(source=scalar_of("brightness"), batch=True, batch_info=True, dtype=types.FLOAT)
            if augment.hflip_p > 0:
                flip = fn.external_source(source=scalar_of("hflip"), batch=True, batch_info=True, dtype=types.FLOAT)
                x = fn.flip(x, horizontal=fn.cast(flip, dtype=types.INT32))
            x = fn.rotate(x, angle=angle, keep_size=True, fill_value=0.0, interp_type=types.INTERP_LINEAR)
            x = dmath.clamp(0.5 + contrast * (x - 0.5) + brightness, 0.0, 1.0)
        return fn.transpose(x * 2.0 - 1.0, perm=[2, 0, 1])

    pipe = pipeline()
    pipe.build()
    step = start_step
    while True:
        (out,) = pipe.run()
        idx = stream.indices(step)
        if on_gpu:
            from nvidia.dali.plugin.pytorch import feed_ndarray
            dense = out.as_tensor()
            images = torch.empty(dense.shape(), dtype=torch.float32, device=torch_device)
            feed_ndarray(dense, images, cuda_stream=torch.cuda.current_stream(torch_device))
        else:
            images = torch.from_numpy(out.as_array())
        if augment is not None:
            p, gen = params_cache.pop(step)   # the pipeline has read this step's parameters already
            images = add_noise((images + 1) / 2, p, gen) * 2 - 1
        yield images, split.tokens[idx].to(torch_device), torch.from_numpy(idx).to(torch_device)
        step += 1


def choose_backend(backend: str, device: str) -> tuple[str, str]:
    """("dali" | "torch", why) for a `training.loader` setting and the training device.

    "auto" takes DALI only on CUDA (where its augmentation runs on the GPU) and when it loads; on
    the CPU the PyTorch path: with augmentation it delivered 1.0-2.2x the images/s of DALI's CPU
    pipeline at 32 and 64 px in the side-by-side runs (bench/RESULTS.md), never less, and over 100x
    what training consumes. "dali" that cannot load is an error.
    """
    if backend not in ("auto", "dali", "torch"):
        raise ValueError(f"loader.backend: {backend!r} is not auto, dali or torch")
    if backend == "torch":
        return "torch", "loader: torch"
    ok, why = dali_available()
    if backend == "dali":
        if not ok:
            raise RuntimeError(f"loader.backend: DALI requested but it cannot be loaded ({why})")
        return "dali", "loader: dali"
    if torch.device(device).type != "cuda":
        return "torch", "loader auto: the PyTorch path on the CPU (faster there than DALI's CPU pipeline)"
    if not ok:
        return "torch", f"loader auto: DALI unavailable ({why}); using the PyTorch path"
    return "dali", "loader auto: DALI on CUDA"


def make_loader(split: SplitData, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1,
                start_step: int = 0, augment: AugmentConfig | None = None, backend: str = "auto",
                device: str = "cpu") -> Iterator[Batch]:
    """Infinite iterator of (images [-1, 1] [B,1,S,S], tokens int64 [B,L], index int64 [B]).

    backend: "dali", "torch", or "auto" (see choose_backend: DALI on CUDA when it loads, else
    torch, with one log line).
    """
    chosen, why = choose_backend(backend, device)
    log.info("%s", why)
    kwargs = dict(seed=seed, rank=rank, world_size=world_size, start_step=start_step, augment=augment, device=device)
    if chosen == "torch":
        return torch_loader(split, batch_size, **kwargs)
    return dali_loader(split, batch_size, **kwargs)
