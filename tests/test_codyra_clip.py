"""codyra.py on this project's CLIP: injection in every linear, the ViT-B/16 adapter count, and
merge restoring the architecture. The method's own tests (torch only) are in ../test_codyra.py."""
import torch
import torch.nn.functional as F

import clip_model
import codyra


def tiny_clip(seed=0):
    """A random CLIP of the tiny world's shape."""
    torch.manual_seed(seed)
    return clip_model.CLIP(**clip_model.CONFIGS["tiny"]).eval()


def clip_batch(seed=0, images=4):
    """Random images (B, 3, 32, 32), three class prompts, and a label per image."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(images, 3, 32, 32, generator=g)
    tokens = clip_model.tokenize(["a photo of a circle.", "a red square.", "three small stars."])
    return x, tokens, torch.randint(0, len(tokens), (images,), generator=g)


def shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


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


def test_merge_keeps_logits_and_restores_architecture():
    """After training with thresholding, merge keeps the logits (1e-5) and gives a never-injected
    state dict."""
    model, batch = tiny_clip(), clip_batch()
    codyra.inject(model, 4)
    x, tokens, labels = batch
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(5):  # a few AdamW steps, each followed by the proximal step
        opt.zero_grad()
        F.cross_entropy(model(x, tokens), labels).backward()
        opt.step()
        codyra.proximal_step(model, 0.1)
    gs = [m.lora_g for _, m in codyra.adapters(model)]
    zeros = sum(int((g == 0).sum()) for g in gs)
    assert zeros > 0 and zeros < sum(g.numel() for g in gs)  # merge drops some ranks, keeps some
    assert sum(codyra.rank_stats(model).values()) == sum(g.numel() for g in gs) - zeros
    with torch.no_grad():
        before = model(x, tokens)
        codyra.merge(model)
        after = model(x, tokens)
    assert torch.allclose(before, after, atol=1e-5, rtol=0)
    assert not any(isinstance(m, codyra.CoDyRALinear) for m in model.modules())
    assert shapes(model) == shapes(tiny_clip())
    merged = {k: v.clone() for k, v in model.state_dict().items()}
    codyra.merge(model)  # idempotent
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in merged.items())
