"""Tests for codyra.py: the layer, placement, proximal step, schedule and merge. It stays beside
codyra.py so that whoever copies the method can copy its tests: they need only torch and pytest
(the CLIP-specific ones are in tests/test_codyra_clip.py); tiny random-init models."""
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import codyra

# -----------------------------------------------------------------------------
# helpers


def mlp(seed=0):
    """A small random MLP: two nn.Linear layers to adapt."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 3))


def train(model, loss_fn, steps=5, tau=0.1, lr=1e-2):
    """A few AdamW steps on the trainable parameters, each followed by the proximal step."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model).backward()
        opt.step()
        codyra.proximal_step(model, tau)


def shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}

# -----------------------------------------------------------------------------
# the layer and the operator


def test_layer_initialisation_and_rank_check():
    """A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) (kaiming_uniform with a = sqrt(5): gain sqrt(2 / 6) x
    sqrt(3 / d_in)), B = 0, g ~ N(0, 1), the base frozen; rank 1 is the smallest allowed."""
    torch.manual_seed(0)
    layer = codyra.CoDyRALinear(nn.Linear(100, 3), rank=2000)
    assert 0.999 * 0.1 < layer.lora_A.abs().max() <= 0.1  # 200,000 draws reach the bound
    assert not layer.lora_B.any()
    assert abs(layer.lora_g.mean()) < 0.1 and 0.9 < layer.lora_g.std() < 1.1
    assert not any(p.requires_grad for p in layer.base.parameters())
    assert codyra.CoDyRALinear(nn.Linear(2, 2), rank=1).lora_g.shape == (1,)
    with pytest.raises(ValueError, match="^rank must be >= 1, got 0$"):
        codyra.CoDyRALinear(nn.Linear(2, 2), rank=0)


def test_soft_threshold_hand_values():
    """S_tau on hand-computed values, incl. tau < |x| < 2 tau (shrunk here, zeroed by the released
    code)."""
    x = torch.tensor([-0.3, -0.15, -0.1, -0.05, 0.0, 0.05, 0.1, 0.15, 0.3])
    want = torch.tensor([-0.2, -0.05, 0.0, 0.0, 0.0, 0.0, 0.0, 0.05, 0.2])
    assert torch.allclose(codyra.soft_threshold(x, 0.1), want, atol=1e-7)
    assert torch.equal(codyra.soft_threshold(x, 0.0), x)


def test_proximal_step_soft_thresholds_every_adapter():
    """proximal_step applies S_tau to the g of every adapter, nested ones too: tau < |g| < 2 tau
    shrinks (the released code zeroes it), |g| <= tau becomes exactly 0, tau = 0 changes nothing."""
    model = codyra.inject(nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.Linear(3, 3))), 4)
    (_, first), (_, second) = codyra.adapters(model)
    g1, g2 = torch.tensor([0.3, -0.15, 0.1, -0.05]), torch.tensor([-0.3, 0.15, -0.1, 0.0])
    with torch.no_grad():
        first.lora_g.copy_(g1)
        second.lora_g.copy_(g2)
    A, B = first.lora_A.clone(), first.lora_B.clone()
    codyra.proximal_step(model, 0.0)
    assert torch.equal(first.lora_g, g1) and torch.equal(second.lora_g, g2)
    codyra.proximal_step(model, 0.1)
    assert first.lora_g.tolist() == pytest.approx([0.2, -0.05, 0.0, 0.0], abs=1e-7)
    assert second.lora_g.tolist() == pytest.approx([-0.2, 0.05, 0.0, 0.0], abs=1e-7)
    assert first.lora_g[2:].tolist() == [0.0, 0.0] and second.lora_g[2:].tolist() == [0.0, 0.0]
    assert torch.equal(first.lora_A, A) and torch.equal(first.lora_B, B)  # only g is thresholded


@pytest.mark.parametrize("dense_ratio", [0.5, 0.7])
def test_threshold_schedule(dense_ratio):
    """tau is 0 through the dense phase, then rises monotonically in 50 levels to exactly
    kappa_max."""
    T, kappa = 500, 0.005
    taus = [codyra.threshold_schedule(i, T, dense_ratio, kappa) for i in range(T)]
    dense = int(dense_ratio * T)
    assert all(t == 0 for t in taus[:dense + 1])
    # the released code's np.linspace(0, kappa, 50)[1]
    assert taus[dense + 1] == pytest.approx(kappa / 49)
    assert all(a <= b for a, b in zip(taus, taus[1:]))
    assert taus[-1] == kappa and len(set(taus)) == 50


def test_threshold_schedule_short_task_still_reaches_kappa_max():
    """With fewer sparse iterations than levels, tau still rises monotonically to kappa_max."""
    taus = [codyra.threshold_schedule(i, 40, 0.5, 0.005) for i in range(40)]
    assert all(t == 0 for t in taus[:21]) and taus[21] > 0
    assert all(a <= b for a, b in zip(taus, taus[1:])) and taus[-1] == 0.005


@pytest.mark.parametrize("dense_ratio, iterations, want", [
    (0.33, 10, [0, 0, 0, 0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.6]),    # 3.3: dense phase 0 .. 3
    (0.37, 10, [0, 0, 0, 0, 0, 0.24, 0.36, 0.48, 0.6, 0.6]),   # 3.7: dense phase 0 .. 4
    (0.29, 100, [0] * 30 + [0.6 * 2 / 49, 0.6 * 3 / 49]),      # 28.999999999999996: 0 .. 29
])
def test_threshold_schedule_when_dense_phase_is_not_whole(dense_ratio, iterations, want):
    """dense = dense_ratio * iterations rounded to the nearest whole iteration (the released code
    compares floats: it thresholds from iteration 4 for 3.7 and from 29 for 0.29 * 100). By hand:
    one level a step (S // L = 1), iteration i >= dense + 1 counts i - dense + 1 levels of
    linspace(0, kappa, L), L = min(50, S), S = iterations - dense; tau = kappa * that / (L - 1)."""
    taus = [codyra.threshold_schedule(i, iterations, dense_ratio, 0.6) for i in range(len(want))]
    assert taus == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("levels, want", [(5, [0.25, 0.5, 0.5, 0.75, 0.75, 1, 1, 1, 1]),
                                          (2, [1] * 9)])
def test_threshold_schedule_with_few_levels(levels, want):
    """levels = 5, 10 sparse steps: one level of linspace(0, 1, 5) at every multiple of 10 // 5 = 2
    from dense = 10 on (10 counts: step 11 is at level 1); levels = 2: [0, 1], step 11 is at 1."""
    taus = [codyra.threshold_schedule(i, 20, 0.5, 1.0, levels) for i in range(20)]
    assert taus == pytest.approx([0] * 11 + want, abs=1e-12)


def test_zero_importance_rank_contributes_nothing():
    """A rank with g = 0 contributes nothing: perturbing its row of A or column of B keeps the
    output."""
    torch.manual_seed(0)
    layer = codyra.CoDyRALinear(nn.Linear(8, 6), rank=4)
    x = torch.randn(5, 8)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_g[1] = 0
        before = layer(x)
        layer.lora_A[1] += 10
        layer.lora_B[:, 1] += 10
        assert torch.equal(layer(x), before)
        layer.lora_A[2] += 10  # a live rank does contribute (so the check above can fail)
        assert not torch.allclose(layer(x), before)

def test_used_parameters_counts_kept_ranks_by_hand():
    """used_parameters = kept ranks x (d_in + d_out + 1), summed over adapters: 2 x 9 + 3 x 8."""
    model = codyra.inject(nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2)), 4)
    with torch.no_grad():
        model[0].lora_g.copy_(torch.tensor([0.0, 1.0, 0.0, -2.0]))
        model[1].lora_g.copy_(torch.tensor([0.5, 0.0, -0.1, 3.0]))
    assert codyra.used_parameters(model) == 2 * (3 + 5 + 1) + 3 * (5 + 2 + 1)


# -----------------------------------------------------------------------------
# merge and the task sequence


def test_second_task_starts_from_merged_weights():
    """inject-train-merge twice: task 2 starts from task 1's merged weights and adds its own
    B diag(g) A."""
    model, x = mlp(), torch.randn(32, 8)
    loss = lambda y: lambda m: F.cross_entropy(m(x), y)
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    codyra.inject(model, 4)
    train(model, loss(torch.arange(32) % 3))
    codyra.merge(model)
    w1 = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(not torch.allclose(w1[k], w0[k]) for k in w0)  # task 1 did move the weights
    with torch.no_grad():
        merged = model(x)
        codyra.inject(model, 4)
        assert torch.equal(model(x), merged)  # fresh adapters on top of task 1
    assert all(not m.lora_B.any() for _, m in codyra.adapters(model))
    train(model, loss(torch.arange(32) // 11))
    deltas = {n + ".weight": (m.lora_B * m.lora_g) @ m.lora_A for n, m in codyra.adapters(model)}
    codyra.merge(model)
    w2 = model.state_dict()
    for k, delta in deltas.items():
        assert torch.allclose(w2[k], w1[k] + delta, atol=1e-6)
    # nothing else moved
    assert all(torch.equal(w2[k], v) for k, v in w1.items() if k not in deltas)

# -----------------------------------------------------------------------------
# placement and guards


def test_clip_placement_selects_encoder_and_layer_types():
    """clip_placement matches exactly the requested encoders and layer types of the CLIP naming."""
    names = [f"{enc}.{i}.{layer}"
             for enc in ("visual.transformer.resblocks", "transformer.resblocks")
             for i in (0, 11) for layer in codyra.CLIP_LAYERS.values()]
    names += ["visual.proj", "visual.conv1", "text_projection",
              "visual.transformer.resblocks.0.ln_1"]
    pick = lambda *a: sorted(n for n in names if codyra.clip_placement(*a)(n))
    assert len(pick("both")) == 24 and pick() == pick("both")  # the default: everything
    assert pick("text", ("c_fc",)) == ["transformer.resblocks.0.mlp.c_fc",
                                       "transformer.resblocks.11.mlp.c_fc"]
    assert all(n.startswith("visual.") and ".attn." in n
               for n in pick("vision", ("q", "k", "v", "out")))
    assert len(pick("vision", ("q", "k", "v", "out"))) == 8


LAYERS = "q, k, v, out, c_fc, c_proj"


@pytest.mark.parametrize("args, message", [
    (("image",), "encoders must be 'vision', 'text' or 'both', got 'image'"),
    (("both", ("q", "o")), f"layers must be a non-empty subset of {LAYERS}; got ['q', 'o']"),
    (("both", ()), f"layers must be a non-empty subset of {LAYERS}; got []"),
])
def test_clip_placement_rejects_bad_arguments(args, message):
    """An unknown encoder, an unknown layer type or an empty layer list is a ValueError naming
    what is allowed, not a silent no-op."""
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        codyra.clip_placement(*args)


def test_inject_refuses_to_wrap_twice():
    """A model that already has adapters cannot be injected again (merge first)."""
    model = codyra.inject(nn.Sequential(nn.Linear(4, 4)), 2)
    message = "model already has adapters; merge(model) before injecting new ones"
    with pytest.raises(RuntimeError, match=f"^{re.escape(message)}$"):
        codyra.inject(model, 2)


def test_inject_refuses_an_out_proj_that_multihead_attention_reads_directly():
    """nn.MultiheadAttention never calls its out_proj: inject says so, names it, wraps nothing."""
    model = nn.TransformerEncoderLayer(d_model=8, nhead=2)
    message = ("self_attn.out_proj: nn.MultiheadAttention reads this weight directly, so an "
               "adapter there would never run; exclude it with `where`")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        codyra.inject(model, 2)
    assert not codyra.adapters(model)


def test_adapters_follow_base_dtype_and_freeze_by_type():
    """Adapters take the base weight's dtype; everything but the adapters is frozen, whatever its
    name."""
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model.add_module("lora_like_name", nn.Linear(2, 2))  # a name with 'lora_' in it is still frozen
    codyra.inject(model.double(), 2, where=lambda n: n != "lora_like_name")
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == [f"{i}.lora_{x}" for i in (0, 2) for x in "ABg"]

# -----------------------------------------------------------------------------
# not CLIP


def test_small_mlp():
    """Inject, train, threshold and merge a plain MLP: same outputs after merge, plain nn.Linear
    again."""
    model, x, y = mlp(), torch.randn(32, 8), torch.randint(0, 3, (32,))
    codyra.inject(model, 8)
    train(model, lambda m: F.cross_entropy(m(x), y))
    with torch.no_grad():
        before = model(x)
        codyra.merge(model)
        assert torch.allclose(model(x), before, atol=1e-6)
    assert [type(m) for m in model] == [nn.Linear, nn.GELU, nn.Linear]
    assert shapes(model) == shapes(mlp())


def test_torchvision_vit_and_multihead_attention_guard():
    """torchvision's ViT: inject refuses MHA's out_proj (read directly); excluding it, the recipe
    works."""
    VisionTransformer = pytest.importorskip("torchvision.models").VisionTransformer
    torch.manual_seed(0)
    make = lambda: VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2,
                                     hidden_dim=32, mlp_dim=64, num_classes=5)
    model, x, y = make(), torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="out_proj"):
        codyra.inject(model, 4)
    assert not codyra.adapters(model)  # the refusal left the model untouched
    codyra.inject(model, 4, where=lambda name: not name.endswith("self_attention.out_proj"))
    assert sorted(codyra.rank_stats(model)) == ["encoder.layers.encoder_layer_0.mlp.0",
                                                "encoder.layers.encoder_layer_0.mlp.3",
                                                "heads.head"]
    train(model, lambda m: F.cross_entropy(m(x), y), tau=0.05)
    model.eval()
    with torch.no_grad():
        before = model(x)
        codyra.merge(model)
        assert torch.allclose(model(x), before, atol=1e-5)
    assert shapes(model) == shapes(make())
