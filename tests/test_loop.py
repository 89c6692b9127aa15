"""loop.steps, the steps of one task: what each step is given (its prompts, the earlier classes'
prompts, its images in a (seed, task) order) and the state it trains in, on the small CLIP."""
import argparse
from unittest import mock

import numpy as np
import pytest
import torch

import clip_model
import codyra
import data
import loop
from conftest import SMALL, make_small_clip

TEMPLATES = ["a photo of a {}.", "art of the {}."]


def toy_task():
    """Two classes, eight random 16 px images, two prompt templates (training takes the first)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, SMALL["image_resolution"], SMALL["image_resolution"], 3))
    train = data.ImageSet(images.astype(np.uint8), [i % 2 for i in range(8)],
                          clip_model.preprocess(True, SMALL["image_resolution"]))
    return data.Task("toy", ["cat", "dog"], TEMPLATES, train, None)


def hyper(**changes):  # train.py's flags that loop.steps reads
    return argparse.Namespace(**{**dict(method="codyra", lr=1e-3, weight_decay=0.0, seed=5,
                                        iterations=3, batch_size=4, dense_ratio=0.0,
                                        kappa_max=0.01, workers=0), **changes})


@pytest.mark.parametrize("t", [0, 3])
def test_each_step_gets_the_first_prompts_the_earlier_ones_and_a_seeded_order(t):
    """Every loss sees the classes' FIRST template, the earlier classes' prompts as given, and
    batches drawn by a generator seeded with seed + 1000 * t (the order depends on both alone)."""
    model, task = make_small_clip(), toy_task()
    codyra.inject(model, 2)
    earlier = torch.nn.functional.normalize(torch.randn(3, SMALL["embed_dim"]), dim=-1)
    seen, losses, loss = [], [], loop.contrastive_loss
    batches = task.train.batches

    def recorded_batches(*args, shuffle=None, **kwargs):
        seen.append(("seed", shuffle.initial_seed()))
        return batches(*args, shuffle=shuffle, **kwargs)

    def recorded_loss(img, txt, labels, scale, earlier=None):
        losses.append(earlier)
        return loss(img, txt, labels, scale, earlier)
    tokenize = clip_model.tokenize

    def recorded_tokenize(texts):
        seen.append(("prompts", texts))
        return tokenize(texts)
    with mock.patch.object(task.train, "batches", recorded_batches), \
            mock.patch.object(loop, "contrastive_loss", recorded_loss), \
            mock.patch.object(clip_model, "tokenize", recorded_tokenize):
        steps = list(loop.steps(model, task, task.train, hyper(), t, earlier))
    assert ("prompts", ["a photo of a cat.", "a photo of a dog."]) in seen
    assert ("seed", 5 + 1000 * t) in seen
    assert len(steps) == 3 and len(losses) == 3 and all(e is earlier for e in losses)


def test_steps_train_a_model_left_in_eval_mode():
    """A model handed over in eval mode trains in train mode (dropout and the like would act)."""
    model, task = make_small_clip(), toy_task()
    codyra.inject(model, 2)
    for _ in loop.steps(model.eval(), task, task.train, hyper(iterations=1)):
        assert model.training


def test_lora_never_thresholds_and_codyra_does():
    """--method lora yields tau 0 and keeps every g; codyra's tau follows threshold_schedule."""
    for method in ("codyra", "lora"):
        model, task = make_small_clip(), toy_task()
        codyra.inject(model, 2)
        taus = [tau for _, _, tau in loop.steps(model, task, task.train, hyper(method=method))]
        if method == "lora":
            assert taus == [0.0] * 3 and all(m.lora_g.ne(0).all() for _, m in
                                             codyra.adapters(model))
        else:
            assert taus == [codyra.threshold_schedule(i, 3, 0.0, 0.01) for i in range(3)]
