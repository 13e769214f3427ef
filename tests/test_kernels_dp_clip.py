"""Per-sample gradient norms, clipping and noise (kernels/dp_clip.py) against torch.func per-sample
gradients (vmap of grad) in float64, on the engine's real U-Net blocks and on plain layer stacks."""

import pytest
import torch
from kernel_test_support import fresh_seed, interpreted_kernel_module, poison_allocations
from torch import nn
from torch.func import functional_call, grad, vmap


@pytest.fixture(scope="module")
def dp():
    return interpreted_kernel_module("kernels.dp_clip")


@pytest.fixture
def poisoned(dp, monkeypatch):
    poison_allocations(dp, monkeypatch)


def per_sample_grads(model, loss_fn, inputs):
    """torch.func: {name: [B, *param.shape]} gradients of loss_fn(model(*one sample)) per sample."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in model.named_parameters() if not v.requires_grad}

    def one(p, *xs):
        out = functional_call(model, {**p, **buffers}, tuple(x.unsqueeze(0) for x in xs))
        return loss_fn(out).sum()

    return vmap(grad(one), in_dims=(None,) + (0,) * len(inputs))(params, *inputs)


def sq_norms_of(grads):
    return torch.stack([g.flatten(1).square().sum(1) for g in grads.values()]).sum(0)


def mse(out):
    return out.square().flatten(1).mean(1)


class Stack(nn.Module):
    """Conv (stride/dilation/padding), GroupNorm, Linear on a token dim, LayerNorm, Embedding."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6, padding_idx=0)
        self.c1 = nn.Conv2d(2, 8, 3, padding=1)
        self.gn = nn.GroupNorm(4, 8)
        self.c2 = nn.Conv2d(8, 6, 3, stride=2, padding=2, dilation=2)
        self.c3 = nn.Conv2d(6, 6, 1, bias=False)
        self.ln = nn.LayerNorm(6)
        self.lin = nn.Linear(6, 5)

    def forward(self, x, tok):
        h = self.c3(torch.nn.functional.silu(self.c2(self.gn(self.c1(x)))))
        seq = h.flatten(2).transpose(1, 2) + self.emb(tok).mean(1, keepdim=True)
        return self.lin(self.ln(seq))


@pytest.mark.parametrize("method", ["direct", "ghost", "auto", "grouped", "measured"])
def test_layer_stack_matches_torch_func_float64(dp, method):
    gen = torch.Generator().manual_seed(fresh_seed())
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
    model = Stack().double()
    x = torch.randn(4, 2, 7, 9, dtype=torch.float64, generator=gen)
    tok = torch.randint(0, 11, (4, 5), generator=gen)
    tok[:, 1] = tok[:, 0]                                  # repeated tokens share an embedding row
    want = sq_norms_of(per_sample_grads(model, mse, (x, tok)))
    hooks = dp.PerSampleNormHooks(model, method)
    got = hooks.sq_norms(mse(model(x, tok)))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    if method == "measured":   # every Linear/Conv2d weight got a rule; only the close calls were timed
        assert set(hooks.plan) == {"c1", "c2", "c3", "lin"}
        for label, seconds in hooks.plan_seconds.items():
            assert hooks.plan[label] == min(seconds, key=seconds.get) and len(seconds) >= 2


@pytest.mark.parametrize("case", [dict(k=3, s=1, p=1, d=1), dict(k=3, s=2, p=2, d=2), dict(k=(1, 3), s=(2, 1), p=(0, 1), d=1),
                                  dict(k=2, s=3, p=0, d=1), dict(k=3, s=1, p=3, d=3)])
def test_conv_patches_equal_unfold(dp, case):
    gen = torch.Generator().manual_seed(fresh_seed())
    conv = nn.Conv2d(3, 4, case["k"], stride=case["s"], padding=case["p"], dilation=case["d"])
    base = torch.randn(5, 3, 11, 13, generator=gen)
    for x in (base, base.contiguous(memory_format=torch.channels_last), base[1:4, :, 1:, 2:]):
        want = torch.nn.functional.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding,
                                          stride=conv.stride)
        assert torch.equal(dp.conv_patches(x, conv), want)


@pytest.mark.parametrize("k", [1, 2])
def test_conv_rules_match_torch_func_float64(dp, k):
    """Every conv rule (patch matrix direct / ghost, grouped weight gradients) against torch.func,
    with K rows per sample; stride, dilation and no bias."""
    gen = torch.Generator().manual_seed(fresh_seed())
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=2, dilation=2, bias=False).double()
    x = torch.randn(4 * k, 3, 9, 10, generator=gen, dtype=torch.float64)
    per_row = per_sample_grads(conv, mse, (x,))["weight"]
    want = per_row.reshape(4, k, -1).sum(1).square().sum(1)
    out = conv(x)
    grad_out = torch.autograd.grad(mse(out).sum(), out)[0]
    for method in dp.CONV_METHODS:
        got = dp.conv2d_weight_sq_norms(x, grad_out, conv, method, rows_per_sample=k)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=0, msg=method)


@pytest.mark.parametrize("method,keep", [("measured", True), ("ghost", True), ("grouped", True), ("grouped", False)])
@pytest.mark.parametrize("k", [1, 2])
def test_clipped_sum_without_second_backward_float64(dp, monkeypatch, method, keep, k):
    """Book-keeping: .grad = sum_i c_i g_i built layer by layer from the recorded inputs and the
    output gradients scaled per row, on every layer kind (strided/dilated conv, conv without bias,
    GroupNorm, LayerNorm, Linear over tokens, Embedding with padding and repeated tokens), with K
    rows per sample, against torch.func per-sample gradients clipped one by one. "grouped" keeps
    its per-sample conv weight gradients for the clipped sum, or (keep_bytes 0) recomputes it."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Stack().double()
    b = 5
    x = torch.randn(b, k, 2, 7, 9, dtype=torch.float64, generator=gen)
    tok = torch.randint(0, 11, (b, 5), generator=gen)
    tok[:, 1] = tok[:, 0]
    tok[:, 4] = 0                                          # padding

    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, xs, tk):
            return self.m(xs.flatten(0, 1), tk.repeat_interleave(k, 0)).reshape(xs.shape[0], -1)

    grouped = Grouped()
    per = per_sample_grads(grouped, mse, (x, tok))
    norms = sq_norms_of(per).sqrt()
    clip = norms.median().item()
    factors = torch.clamp(clip / (norms + 1e-6), max=1.0)
    assert (factors < 1).any() and (factors == 1).any()
    hooks = dp.PerSampleNormHooks(model, method, rows_per_sample=k, keep_bytes=dp.KEEP_BYTES if keep else 0)
    recomputed = []                                        # conv weights whose clipped sum was a second pass
    real = dp.layer_param_grads
    monkeypatch.setattr(dp, "layer_param_grads", lambda m, x, g, weight=True: (
        recomputed.append(m) if weight and isinstance(m, nn.Conv2d) else None) or real(m, x, g, weight))
    for p in model.parameters():                           # .grad accumulates, as backward() does
        p.grad = torch.full_like(p, 0.5)
    got_norms = hooks.clipped_backward(mse(grouped(x, tok)), clip)
    torch.testing.assert_close(got_norms, norms, rtol=1e-10, atol=0)
    for name, p in model.named_parameters():
        want = (per["m." + name] * factors.reshape(-1, *[1] * p.dim())).sum(0) + 0.5
        torch.testing.assert_close(p.grad, want, rtol=1e-10, atol=1e-12, msg=f"{name} seed {seed}")
    if method == "grouped":                                # all three convs: kept, or recomputed when keep_bytes 0
        assert len(recomputed) == (0 if keep else 3)


def test_layer_grads_equal_autograd_backward(dp):
    """Unclipped (c = 1), the layer-by-layer gradients are what loss.sum().backward() gives."""
    torch.manual_seed(fresh_seed())
    model = Stack().double()
    x = torch.randn(4, 2, 7, 9, dtype=torch.float64)
    tok = torch.randint(0, 11, (4, 5))
    tok[:, 2] = 0
    mse(model(x, tok)).sum().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    dp.PerSampleNormHooks(model, "auto").clipped_backward(mse(model(x, tok)), float("inf"))
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-12, atol=1e-14, msg=n)


def _engine_blocks():
    unet = pytest.importorskip("engine.model.unet")
    penc = pytest.importorskip("engine.model.prompt_encoder")
    return unet, penc


class _ResBlockCase(nn.Module):
    def __init__(self, unet, cin, cout):
        super().__init__()
        self.block = unet.ResBlock(cin, cout, 16, 0.0)
        for p in self.block.parameters():                 # undo the zero init so every layer has gradient
            nn.init.normal_(p, std=0.3)

    def forward(self, x, emb):
        return self.block(x, emb)


class _AttnCase(nn.Module):
    def __init__(self, unet, ch):
        super().__init__()
        self.block = unet.AttentionBlock(ch, 12, 2, "sdpa")
        for p in self.block.parameters():
            nn.init.normal_(p, std=0.3)

    def forward(self, x, context):
        mask = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
        return self.block(x, context, mask)


class _EncoderCase(nn.Module):
    def __init__(self, penc):
        super().__init__()
        self.tok = nn.Embedding(20, 12)
        self.layer = penc.EncoderLayer(12, 2, "sdpa")

    def forward(self, tokens):
        return self.layer(self.tok(tokens), tokens != 0)


@pytest.mark.parametrize("case", ["res_8_16_8px", "res_8_8_6px", "attn_8_4px", "attn_16_3px", "encoder"])
def test_engine_blocks_match_torch_func_float64(dp, case):
    unet, penc = _engine_blocks()
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if case.startswith("res"):
        _, cin, cout, px = case.split("_")
        model = _ResBlockCase(unet, int(cin), int(cout)).double()
        inputs = (torch.randn(3, int(cin), int(px[:-2]), int(px[:-2]), generator=gen, dtype=torch.float64),
                  torch.randn(3, 16, generator=gen, dtype=torch.float64))
    elif case.startswith("attn"):
        _, ch, px = case.split("_")
        model = _AttnCase(unet, int(ch)).double()
        inputs = (torch.randn(3, int(ch), int(px[:-2]), int(px[:-2]), generator=gen, dtype=torch.float64),
                  torch.randn(3, 5, 12, generator=gen, dtype=torch.float64))
    else:
        model = _EncoderCase(penc).double()
        inputs = (torch.randint(1, 20, (3, 6), generator=gen),)
    want = sq_norms_of(per_sample_grads(model, mse, inputs))
    got = dp.PerSampleNormHooks(model).sq_norms(mse(model(*inputs)))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=0, msg=f"{case} seed {seed}")


def test_clipped_backward_gives_sum_of_clipped_per_sample_grads(dp):
    unet, _ = _engine_blocks()
    torch.manual_seed(fresh_seed())
    model = _ResBlockCase(unet, 4, 8).double()
    x, e = torch.randn(5, 4, 6, 6, dtype=torch.float64), torch.randn(5, 16, dtype=torch.float64)
    per = per_sample_grads(model, mse, (x, e))
    norms = sq_norms_of(per).sqrt()
    clip = norms.median().item()                          # some samples clipped, some not
    factors = torch.clamp(clip / (norms + 1e-6), max=1.0)
    hooks = dp.PerSampleNormHooks(model)
    got_norms = hooks.clipped_backward(mse(model(x, e)), clip)
    torch.testing.assert_close(got_norms, norms, rtol=1e-10, atol=0)
    for name, p in model.named_parameters():
        want = (per[name] * factors.reshape(-1, *[1] * p.dim())).sum(0)
        torch.testing.assert_close(p.grad, want, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("shape", [(3, 40, 20, 24), (2, 17, 70, 5)])   # (B, T, P, Q), ragged tiles
def test_direct_triton_kernel_matches_reference(dp, poisoned, dtype, tol, shape):
    gen = torch.Generator().manual_seed(fresh_seed())
    b, t, p, q = shape
    a = torch.randn(b, p, t, generator=gen).to(dtype).transpose(1, 2)    # strided view, as unfold()^T
    g = torch.randn(b, t, q, generator=gen).to(dtype)
    want = dp.direct_sq_norms_reference(a.double(), g.double())
    got = dp.direct_sq_norms_triton(a, g, block_t=16, block_p=16, block_q=16)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=0)
    torch.testing.assert_close(dp.ghost_sq_norms_reference(a.double(), g.double()), want, rtol=1e-10, atol=0)


def test_hooks_use_triton_kernel_for_conv(dp, monkeypatch):
    unet, _ = _engine_blocks()
    torch.manual_seed(fresh_seed())
    model = _ResBlockCase(unet, 4, 8)
    x, e = torch.randn(2, 4, 6, 6), torch.randn(2, 16)
    want = sq_norms_of(per_sample_grads(model.double(), mse, (x.double(), e.double())))
    model.float()
    calls = []
    real = dp.direct_sq_norms_triton
    monkeypatch.setattr(dp, "direct_sq_norms_triton", lambda a, g: calls.append(a.shape) or real(a, g, 16, 16, 16))
    monkeypatch.setenv("MEMDIFF_KERNELS", "triton")
    got = dp.PerSampleNormHooks(model, "direct").sq_norms(mse(model(x, e)))
    assert len(calls) == 3                                  # conv1, conv2, skip conv
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=0)


def test_noise_step_triton_equals_reference_and_has_right_scale(dp, monkeypatch):
    seed = fresh_seed()
    grads = [torch.randn(37, 3), torch.randn(1000), torch.randn(5, 2, 3, 3)]
    a = [g.clone() for g in grads]
    b = [g.clone() for g in grads]
    dp.add_noise_and_scale_reference_(a, 1.3, 0.7, 8.0, seed)
    monkeypatch.setenv("MEMDIFF_KERNELS", "triton")
    dp.add_noise_and_scale_(b, 1.3, 0.7, 8.0, seed)
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, rtol=0, atol=1e-6)
    noise = torch.cat([(x * 8.0 - g).flatten() for x, g in zip(a, grads)])      # N(0, (1.3*0.7)^2)
    n = noise.numel()
    assert abs(noise.mean().item()) < 5 * 0.91 / n ** 0.5
    assert abs(noise.std().item() / 0.91 - 1) < 5 / (2 * n) ** 0.5
    c = [g.clone() for g in grads]
    dp.add_noise_and_scale_reference_(c, 1.3, 0.7, 8.0, seed + 1)
    other = torch.cat([(x * 8.0 - g).flatten() for x, g in zip(c, grads)])
    assert abs(torch.corrcoef(torch.stack([noise, other]))[0, 1].item()) < 5 / n ** 0.5


def test_clip_factors(dp):
    norms = torch.tensor([0.0, 0.5, 1.0, 4.0])
    torch.testing.assert_close(dp.clip_factors(norms, 1.0), torch.tensor([1.0, 1.0, 1 / (1 + 1e-6), 1 / (4 + 1e-6)]))


def test_unsupported_and_misused_layers_raise(dp):
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm1d\)"):
        dp.PerSampleNormHooks(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)))
    with pytest.raises(ValueError, match="groups=1"):
        dp.PerSampleNormHooks(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="scale_grad_by_freq"):
        dp.PerSampleNormHooks(nn.Embedding(5, 3, scale_grad_by_freq=True))
    shared = nn.Linear(3, 3)
    hooks = dp.PerSampleNormHooks(shared)
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="more than once"):
        hooks.sq_norms(mse(shared(shared(x))))

    class Positions(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Embedding(4, 3)

        def forward(self, x):
            return x + self.pos(torch.arange(4))[None]

    m = Positions()
    with pytest.raises(ValueError, match="without a batch dim"):
        dp.PerSampleNormHooks(m).sq_norms(mse(m(torch.randn(2, 4, 3))))


def _tiny_unet_float64(seed: int):
    """The engine's whole U-Net (convs, GroupNorm, attention, LayerNorm, embeddings), 8 px, float64,
    with every parameter random so that no per-sample gradient vanishes."""
    unet, _ = _engine_blocks()
    torch.manual_seed(seed)
    cfg = unet.UNetConfig(image_size=8, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                          attention_resolutions=(4,), num_heads=2, vocab_size=16, max_tokens=5,
                          context_dim=8, encoder_layers=1, encoder_heads=2)
    model = unet.ConditionalUNet(cfg).double()
    for p in model.parameters():
        nn.init.normal_(p, std=0.2)
    return model


def test_whole_tiny_unet_matches_torch_func_float64(dp):
    seed = fresh_seed()
    model = _tiny_unet_float64(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 1, 8, 8, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 1000, (3,), generator=gen)
    tokens = torch.randint(2, 16, (3, 5), generator=gen)
    tokens[:, 3:] = 0
    want = sq_norms_of(per_sample_grads(model, mse, (x, t, tokens)))
    got = dp.PerSampleNormHooks(model).sq_norms(mse(model(x, t, tokens)))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=0, msg=f"seed {seed}")


@pytest.mark.parametrize("k", [2, 3])
def test_rows_per_sample_groups_consecutive_rows_float64(dp, k):
    """Noise multiplicity: sample i is rows i*K .. i*K+K-1 and its loss the mean over them. The
    hooks' grouped norms equal torch.func per-sample gradients of that grouped loss, on the whole
    tiny U-Net (convs, GroupNorm, attention, LayerNorm, embeddings) and on the layer stack."""
    seed = fresh_seed()
    model = _tiny_unet_float64(seed)
    gen = torch.Generator().manual_seed(seed)
    b = 3
    x = torch.randn(b, k, 1, 8, 8, generator=gen, dtype=torch.float64)     # K draws of x_t per sample
    t = torch.randint(0, 1000, (b, k), generator=gen)
    tokens = torch.randint(2, 16, (b, 5), generator=gen)
    tokens[:, 3:] = 0

    class Grouped(nn.Module):   # one sample = its K rows; loss = mean over them
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, xs, ts, tok):
            n = xs.shape[0]
            return self.m(xs.flatten(0, 1), ts.flatten(), tok.repeat_interleave(k, 0)).reshape(n, k, -1)

    grouped = Grouped()
    want = sq_norms_of(per_sample_grads(grouped, lambda out: out.square().mean(dim=(1, 2)), (x, t, tokens)))
    hooks = dp.PerSampleNormHooks(model, rows_per_sample=k)
    got = hooks.sq_norms(grouped(x, t, tokens).square().mean(dim=(1, 2)))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=0, msg=f"seed {seed}")
    # Without grouping the hooks refuse: K*B rows for B losses.
    with pytest.raises(ValueError, match=r"saw batch dim"):
        dp.PerSampleNormHooks(model).sq_norms(grouped(x, t, tokens).square().mean(dim=(1, 2)))
