"""Tests for codyra.py: the layer, placement, proximal step, schedule and merge. It stays beside
codyra.py so that whoever copies the method can copy its tests; tiny random-init models."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import clip_model
import codyra

# -----------------------------------------------------------------------------
# helpers


def tiny_clip(seed=0):
    """A random CLIP of the tiny world's shape (the tests in tests/ share the same one)."""
    torch.manual_seed(seed)
    return clip_model.CLIP(**clip_model.CONFIGS["tiny"]).eval()


def clip_batch(seed=0, images=4):
    """Random images (B, 3, 32, 32), three class prompts, and a label per image."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(images, 3, 32, 32, generator=g)
    tokens = clip_model.tokenize(["a photo of a circle.", "a red square.", "three small stars."])
    return x, tokens, torch.randint(0, len(tokens), (images,), generator=g)


def train(model, loss_fn, steps=5, tau=0.1, lr=1e-2):
    """A few AdamW steps on the trainable parameters, each followed by the proximal step."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model).backward()
        opt.step()
        codyra.proximal_step(model, tau)


def clip_loss(batch):
    x, tokens, labels = batch
    return lambda model: F.cross_entropy(model(x, tokens), labels)


def shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}

# -----------------------------------------------------------------------------
# the layer and the operator


def test_injection_preserves_base_output():
    """Right after inject (B = 0) the model computes exactly what the base model computes."""
    model = tiny_clip()
    x, tokens, _ = clip_batch()
    with torch.no_grad():
        before = model(x, tokens)
        after = codyra.inject(model, 4)(x, tokens)
    assert len(codyra.rank_stats(model)) == 2 * 3 * 6  # both encoders, 3 blocks, six linears each
    assert torch.equal(before, after)


def test_vit_b16_trainable_parameter_count():
    """ViT-B/16, rank 16, all six layer types in both encoders: 4,425,984 trainable parameters,
    only adapters."""
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = clip_model.CLIP(**clip_model.CONFIGS["ViT-B/16"])
    codyra.inject(model, 16, where=codyra.clip_placement("both"))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == 4_425_984
    assert len(trainable) == 144 * 3
    assert all(isinstance(model.get_submodule(n.rpartition(".")[0]), codyra.CoDyRALinear)
               for n in trainable)
    # adapters follow the base weight
    assert all(p.device.type == "meta" for n, p in trainable.items())


def test_soft_threshold_hand_values():
    """S_tau on hand-computed values, incl. tau < |x| < 2 tau (shrunk here, zeroed by the released
    code)."""
    x = torch.tensor([-0.3, -0.15, -0.1, -0.05, 0.0, 0.05, 0.1, 0.15, 0.3])
    want = torch.tensor([-0.2, -0.05, 0.0, 0.0, 0.0, 0.0, 0.0, 0.05, 0.2])
    assert torch.allclose(codyra.soft_threshold(x, 0.1), want, atol=1e-7)
    assert torch.equal(codyra.soft_threshold(x, 0.0), x)


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

# -----------------------------------------------------------------------------
# merge and the task sequence


def test_merge_keeps_logits_and_restores_architecture():
    """After training with thresholding, merge keeps the logits (1e-5) and gives a never-injected
    state dict."""
    model, batch = tiny_clip(), clip_batch()
    codyra.inject(model, 4)
    train(model, clip_loss(batch))
    active = sum(codyra.rank_stats(model).values())
    assert 0 < active < 24 * 4  # some ranks pruned, some kept: merge really drops ranks
    with torch.no_grad():
        before = model(*batch[:2])
        codyra.merge(model)
        after = model(*batch[:2])
    assert torch.allclose(before, after, atol=1e-5, rtol=0)
    assert not any(isinstance(m, codyra.CoDyRALinear) for m in model.modules())
    assert shapes(model) == shapes(tiny_clip())
    merged = {k: v.clone() for k, v in model.state_dict().items()}
    codyra.merge(model)  # idempotent
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in merged.items())


def test_second_task_starts_from_merged_weights():
    """inject-train-merge twice: task 2 starts from task 1's merged weights and adds its own
    B diag(g) A."""
    model, batch = tiny_clip(), clip_batch()
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    codyra.inject(model, 4)
    train(model, clip_loss(batch))
    codyra.merge(model)
    w1 = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(not torch.allclose(w1[k], w0[k]) for k in w0)  # task 1 did move the weights
    with torch.no_grad():
        merged_logits = model(*batch[:2])
        codyra.inject(model, 4)
        assert torch.equal(model(*batch[:2]), merged_logits)  # fresh adapters on top of task 1
    assert all(not m.lora_B.any() for _, m in codyra.adapters(model))
    train(model, clip_loss(clip_batch(seed=1)))
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
    assert len(pick("both")) == 24
    assert pick("text", ("c_fc",)) == ["transformer.resblocks.0.mlp.c_fc",
                                       "transformer.resblocks.11.mlp.c_fc"]
    assert all(n.startswith("visual.") and ".attn." in n
               for n in pick("vision", ("q", "k", "v", "out")))
    assert len(pick("vision", ("q", "k", "v", "out"))) == 8


@pytest.mark.parametrize("args", [("image",), ("both", ("q", "o")), ("both", ())])
def test_clip_placement_rejects_bad_arguments(args):
    """An unknown encoder, an unknown layer type or an empty layer list is a ValueError, not a
    silent no-op."""
    with pytest.raises(ValueError):
        codyra.clip_placement(*args)


def test_inject_refuses_to_wrap_twice():
    """A model that already has adapters cannot be injected again (merge first)."""
    model = codyra.inject(nn.Sequential(nn.Linear(4, 4)), 2)
    with pytest.raises(RuntimeError, match="merge"):
        codyra.inject(model, 2)


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
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 3))
    model, x, y = make(), torch.randn(32, 8), torch.randint(0, 3, (32,))
    codyra.inject(model, 8)
    train(model, lambda m: F.cross_entropy(m(x), y))
    with torch.no_grad():
        before = model(x)
        codyra.merge(model)
        assert torch.allclose(model(x), before, atol=1e-6)
    assert [type(m) for m in model] == [nn.Linear, nn.GELU, nn.Linear]
    assert shapes(model) == shapes(make())


def test_torchvision_vit_and_multihead_attention_guard():
    """torchvision's ViT: inject refuses MHA's out_proj (read directly); excluding it, the recipe
    works."""
    from torchvision.models import VisionTransformer
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
