"""Inference-time mitigations: token significance, trajectory, prompt-embedding optimisation, edits."""
import math

import pytest
import torch

from data_pipeline.vocab import NULL_ID, PAD_ID, Vocabulary
from engine.diffusion.guidance import conditional_noise_magnitude, null_tokens_like
from engine.diffusion.sampling import sample, step_coefficients, timestep_sequence
from engine.diffusion.schedule import NoiseSchedule
from engine.diffusion.seeds import seeded_noise
from engine.mitigation.token_significance import token_significance
from engine.model.unet import ConditionalUNet, UNetConfig
from engine.reports.token_significance_page import heat_strip_html
from kernels.guided_step import guided_step_reference

PROMPTS = ["frontal AP chest x-ray, female, 60s: pleural effusion | tok0001",
           "frontal PA chest x-ray, male, 30s: edema, uncertain cardiomegaly"]


def tiny_model(vocab: Vocabulary, seed: int = 0) -> ConditionalUNet:
    """A random tiny U-Net whose cond and uncond predictions differ (the zero-inits are overwritten)."""
    torch.manual_seed(seed)
    cfg = UNetConfig(image_size=8, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(4,), num_heads=2, vocab_size=len(vocab), max_tokens=vocab.max_len,
                     context_dim=8, encoder_layers=1, encoder_heads=2)
    model = ConditionalUNet(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                torch.nn.init.normal_(p, std=1.0 / math.sqrt(p[0].numel()))
            elif "norm" not in name:
                torch.nn.init.normal_(p, std=0.1)
    return model.eval()


@pytest.fixture(scope="module")
def setup():
    vocab = Vocabulary.default(["tok0000", "tok0001", "tok0002"], max_len=8)
    model = tiny_model(vocab)
    tokens = vocab.encode_batch(PROMPTS)
    return vocab, model, tokens, NoiseSchedule("linear", 100)


def test_significance_matches_finite_differences(setup):
    vocab, model, tokens, schedule = setup
    model = ConditionalUNet(model.cfg).double().eval()
    model.load_state_dict(setup[1].state_dict())
    noise = seeded_noise([3, 4], (1, 8, 8)).double()
    res = token_significance(model, tokens, noise, schedule, steps=3, guidance=3.0, keep_trajectory=True)
    with torch.no_grad():
        ctx, mask = model.encode(tokens)
        nctx, nmask = model.encode(null_tokens_like(tokens))
    ctx, nctx = ctx.double(), nctx.double()
    h = 1e-6
    ss_fd = torch.zeros(tokens.shape, dtype=torch.float64)
    # Independent reference: the full gradient by central differences, coordinate by coordinate.
    for s, t in enumerate(res.timesteps.tolist()):
        x = res.trajectory[s]
        for b in range(tokens.shape[0]):
            for i in range(tokens.shape[1]):
                g = torch.zeros(ctx.shape[-1], dtype=torch.float64)
                for d in range(ctx.shape[-1]):
                    plus, minus = ctx.clone(), ctx.clone()
                    plus[b, i, d] += h
                    minus[b, i, d] -= h
                    with torch.no_grad():
                        lp, _, _ = conditional_noise_magnitude(model, x, t, (plus, mask), (nctx, nmask), schedule)
                        lm, _, _ = conditional_noise_magnitude(model, x, t, (minus, mask), (nctx, nmask), schedule)
                    g[d] = (lp[b] - lm[b]) / (2 * h)
                ss_fd[b, i] += g.pow(2).sum()
    ss_fd /= len(res.timesteps)
    assert res.scores.dtype == torch.float64
    assert (ss_fd[mask] > 0).all()
    torch.testing.assert_close(res.scores, ss_fd, rtol=1e-5, atol=1e-12)
    # Padding positions are ignored by the network: exactly zero significance.
    assert (res.scores[~mask] == 0).all()


def test_significance_walks_the_sampler_trajectory_not_the_swapped_one(setup):
    vocab, model, tokens, schedule = setup
    noise = seeded_noise([10, 11, 12, 13], (1, 8, 8))
    steps, w = 6, 5.0
    res = token_significance(model, tokens, noise, schedule, generations=2, steps=steps, guidance=w)
    ref = sample(model, tokens.repeat_interleave(2, 0), noise, schedule, steps=steps, guidance=w)
    torch.testing.assert_close(res.norms_raw.reshape(steps, -1).float(), ref.norms_raw, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(res.images, ref.images, rtol=1e-4, atol=1e-5)

    # Wen's reference slip: the [null; prompt] order fed to the cond-first guidance rule, i.e.
    # x_{t-1} from eps_c + w (eps_u - eps_c). It must give a visibly different trajectory.
    rows = tokens.repeat_interleave(2, 0)
    with torch.no_grad():
        ctx, mask = model.encode(rows)
        nctx, nmask = model.encode(null_tokens_like(rows))
        x, swapped_norms = noise.clone(), []
        ts = timestep_sequence(schedule, steps)
        for i, t in enumerate(ts.tolist()):
            coefs = step_coefficients(schedule, t, int(ts[i + 1]) if i + 1 < steps else -1, 0.0)
            _, _, pred = conditional_noise_magnitude(model, x, t, (nctx, nmask), (ctx, mask), schedule)
            x, n_raw, _ = guided_step_reference(pred, x, None, guidance=w, **coefs)
            swapped_norms.append(n_raw)
    swapped = torch.stack(swapped_norms)
    # Step 1 sees the same x_T, so the norm agrees; the walks then part.
    torch.testing.assert_close(swapped[0], ref.norms_raw[0], rtol=1e-4, atol=1e-5)
    assert (swapped[1:] - ref.norms_raw[1:]).abs().max() > 1e-2 * ref.norms_raw.abs().max()
    assert (x.clamp(-1, 1) - ref.images).abs().max() > 1e-2


def test_significance_averages_generations_and_is_batch_invariant(setup):
    vocab, model, tokens, schedule = setup
    noise = seeded_noise([1, 2, 3, 4], (1, 8, 8))
    full = token_significance(model, tokens, noise, schedule, generations=2, steps=3, guidance=2.0)
    chunked = token_significance(model, tokens, noise, schedule, generations=2, steps=3, guidance=2.0,
                                 batch_size=1)
    torch.testing.assert_close(full.scores, chunked.scores, rtol=1e-4, atol=1e-9)
    # The average over generations, against one-generation runs on each generation's own noise
    # (rows are prompt-major: prompt p's generations are rows 2p, 2p + 1).
    singles = [token_significance(model, tokens, noise[g::2], schedule, generations=1, steps=3, guidance=2.0).scores
               for g in (0, 1)]
    torch.testing.assert_close(full.scores, (singles[0] + singles[1]) / 2, rtol=1e-4, atol=1e-9)
    one = token_significance(model, tokens[1:], noise[2:], schedule, steps=3, guidance=2.0, generations=2)
    torch.testing.assert_close(one.scores[0], full.scores[1], rtol=1e-4, atol=1e-9)
    ranked = full.ranked_positions(0)
    assert set(ranked) == {i for i, t in enumerate(tokens[0].tolist()) if t not in (PAD_ID, NULL_ID)}
    assert all(full.scores[0, a] >= full.scores[0, b] for a, b in zip(ranked, ranked[1:]))


def test_heat_strip_escapes_and_shades():
    out = heat_strip_html(["<b>x</b>", "edema"], [2.0, 1.0], title="a & b")
    assert "<b>x</b>" not in out and "&lt;b&gt;x&lt;/b&gt;" in out and "a &amp; b" in out
    assert "rgb(255,0,0)" in out and "rgb(255,128,128)" in out
    with pytest.raises(ValueError):
        heat_strip_html(["a"], [1.0, 2.0])


# ---- prompt-embedding optimisation --------------------------------------------------------------

def test_embedding_optimisation_lowers_first_step_norm(setup):
    from engine.mitigation.prompt_optimization import optimize_prompt_embedding
    vocab, model, tokens, schedule = setup
    noise = seeded_noise([5, 6, 7, 8], (1, 8, 8))
    res = optimize_prompt_embedding(model, tokens, noise, schedule, generations=2, target_rms=0.0)
    assert res.iterations.tolist() == [10, 10]              # target 0 is never reached: capped at 10
    assert (res.loss_after < 0.8 * res.loss_before).all()
    # loss_after is what the returned context gives at the first step from the same noise.
    ctx, mask = res.rows(2)
    with torch.no_grad():
        nctx, nmask = model.encode(null_tokens_like(tokens.repeat_interleave(2, 0)))
        norm, _, _ = conditional_noise_magnitude(model, noise, schedule.num_timesteps - 1, (ctx, mask), (nctx, nmask), schedule)
    torch.testing.assert_close(norm.reshape(2, 2).mean(1), res.loss_after, rtol=1e-5, atol=1e-6)
    # And sampling with it gives the first-step norm the sampler records.
    out = sample(model, tokens.repeat_interleave(2, 0), noise, schedule, steps=4, guidance=3.0, context=(ctx, mask))
    torch.testing.assert_close(out.norms_raw[0], norm, rtol=1e-4, atol=1e-5)
    assert res.elements == 64 and res.target_raw == 0.0


def test_embedding_optimisation_stops_at_target_per_prompt(setup):
    from engine.mitigation.prompt_optimization import optimize_prompt_embedding
    vocab, model, tokens, schedule = setup
    noise = seeded_noise([5, 6], (1, 8, 8))
    first = optimize_prompt_embedding(model, tokens, noise, schedule, max_iterations=0)
    assert first.iterations.tolist() == [0, 0]
    torch.testing.assert_close(first.loss_after, first.loss_before)
    # A target between the two prompts' starting norms: the lower prompt is left untouched.
    lo, hi = sorted(first.loss_before.tolist())
    target_rms = (lo + hi) / 2 / 8.0
    res = optimize_prompt_embedding(model, tokens, noise, schedule, target_rms=target_rms)
    low = int(torch.argmin(first.loss_before))
    assert res.iterations[low] == 0
    with torch.no_grad():
        ctx0, _ = model.encode(tokens)
    torch.testing.assert_close(res.context[low], ctx0[low])
    high = 1 - low
    assert 1 <= res.iterations[high] <= 10
    assert res.loss_after[high] <= res.target_raw or res.iterations[high] == 10


# ---- prompt edits --------------------------------------------------------------------------------

def test_prompt_edits_remove_replace_and_insert(setup):
    from engine.mitigation.prompt_edits import edit_prompts, nearest_same_kind
    vocab, model, tokens, schedule = setup
    # rank: the extra token first in prompt 0, "edema" first in prompt 1
    ranked = [[5, 0, 1, 2, 3, 4], [4, 0, 1, 2, 3, 5]]
    assert vocab.tokens[int(tokens[0, 5])] == "tok0001" and vocab.tokens[int(tokens[1, 4])] == "edema"
    removed = edit_prompts(model, vocab, tokens, ranked, method="remove")
    assert removed[0].edited == "frontal AP chest x-ray, female, 60s: pleural effusion"
    assert removed[1].edited == "frontal PA chest x-ray, male, 30s: uncertain cardiomegaly"

    replaced = edit_prompts(model, vocab, tokens, ranked, method="replace", known_triggers=[vocab.id_of("tok0000")])
    new0 = replaced[0].changes[0]["replacement"]
    assert new0 == "tok0002"           # the only extra token that is neither trigger nor tok0001 itself
    new1 = replaced[1].changes[0]["replacement"]
    assert vocab.kind_of(new1) == "finding" and new1 not in PROMPTS[1].replace("uncertain cardiomegaly", "")
    # nearest by cosine of the model's token embeddings, brute force over same-kind candidates:
    table = model.encoder.token_embedding.weight.detach()
    e = table[vocab.id_of("edema")]
    present = {vocab.id_of(t) for t in ("edema",)} | set(tokens[1].tolist())
    cands = [i for i in vocab.ids_of_kind("finding") if i not in present]
    best = max(cands, key=lambda i: float(torch.nn.functional.cosine_similarity(table[i], e, dim=0)))
    assert vocab.tokens[best] == new1
    assert nearest_same_kind(model, vocab, vocab.id_of("edema"), present | {best}) != best
    for ed in removed + replaced:
        assert vocab.decode(vocab.encode(ed.edited)) == ed.edited

    inserted = edit_prompts(model, vocab, tokens, ranked, method="random", insert=2, seed=3,
                            known_triggers=[vocab.id_of("tok0000"), vocab.id_of("tok0002")])
    for ed, row in zip(inserted, tokens):
        before = set(row.tolist()) - {PAD_ID}
        after = set(vocab.encode(ed.edited)) - {PAD_ID}
        added = after - before
        assert before <= after and len(added) == 2
        assert all(vocab.token_kinds[i] in ("finding", "uncertain", "extra") for i in added)
        assert not added & {vocab.id_of("tok0000"), vocab.id_of("tok0002"), vocab.id_of("tok0001")}
    with pytest.raises(ValueError):
        edit_prompts(model, vocab, tokens, ranked, method="shuffle")


# ---- Fréchet distance ----------------------------------------------------------------------------

def test_frechet_distance_closed_forms():
    import numpy as np
    import scipy.linalg

    from engine.audit.frechet import feature_statistics, frechet_distance, frechet_distance_features
    # Diagonal covariances: d = |mu_a - mu_b|^2 + sum (sqrt(a_i) - sqrt(b_i))^2
    mu_a, mu_b = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    va, vb = np.array([1.0, 4.0, 0.25]), np.array([4.0, 1.0, 0.25])
    expected = 1 + 0 + 4 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0
    assert abs(frechet_distance(mu_a, np.diag(va), mu_b, np.diag(vb)) - expected) < 1e-10
    # Non-commuting covariances against the textbook sqrtm(S_a S_b) formula (scipy).
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    sa, sb = a @ a.T + 0.1 * np.eye(4), b @ b.T + 0.1 * np.eye(4)
    ref = float(np.sum((mu_a[:1] - mu_b[:1]) ** 2)) + np.trace(sa + sb - 2 * scipy.linalg.sqrtm(sa @ sb).real)
    got = frechet_distance(np.r_[mu_a[:1], 0, 0, 0], sa, np.r_[mu_b[:1], 0, 0, 0], sb)
    assert abs(got - ref) < 1e-8
    # Same distribution -> 0 (up to sampling); identical samples -> exactly 0; rank-deficient is fine.
    x = rng.normal(size=(5, 16))
    assert frechet_distance_features(x, x) < 1e-8
    mu, cov = feature_statistics(x)
    assert cov.shape == (16, 16) and np.allclose(cov, np.cov(x, rowvar=False))
    with pytest.raises(ValueError):
        frechet_distance_features(x[:1], x)
