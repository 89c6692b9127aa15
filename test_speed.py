"""The fast evaluation path changes no result: the uint8 test-image cache and bf16 autocast."""
import os

import numpy as np
import torch
from PIL import Image

import clip_model
import data
import eval as ev
import tiny_world as tw

CPU = torch.device("cpu")


def tiny_clip(seed=0, patch=8):
    torch.manual_seed(seed)
    return clip_model.CLIP(64, tw.RES, 2, 64, patch, 77, 49408, 64, 1, 2).eval()


def jpeg_set(folder, n=6):
    """n generated JPEGs of different sizes and aspect ratios (one grey, one RGBA PNG)."""
    rng, paths = np.random.default_rng(0), []
    for i in range(n):
        w, h = 40 + 13 * i, 30 + 7 * (n - i)
        img = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        img = img.convert("L") if i == 1 else img.convert("RGBA") if i == 2 else img
        paths.append(str(folder / f"{i}.{'png' if i == 2 else 'jpg'}"))
        img.save(paths[-1])
    return data.ImageSet(paths, list(range(n)))


def test_cached_pixels_equal_the_transform_bitwise(tmp_path):
    """normalize(cached uint8) gives exactly the tensor clip_model.transform(False) gives, for files and arrays."""
    for images, R in ((jpeg_set(tmp_path), 24), (tw.tiny_tasks(shots=1, test_per_class=2)[0].test, tw.RES)):
        cached = ev.cache_test_set("x", images, R, str(tmp_path / "cache"), workers=0)
        tf = clip_model.transform(False, R)
        for i in range(len(images)):
            x, y = cached[i]
            assert x.dtype == torch.uint8 and x.shape == (3, R, R) and y == images.labels[i]
            assert torch.equal(ev.normalize(x[None])[0], tf(images[i][0]))


def test_cached_evaluation_gives_identical_features_and_accuracy(tmp_path):
    """fp32: image features from the cache equal those from decoding, bit for bit, so accuracy is identical."""
    model, tasks = tiny_clip(), tw.tiny_tasks(shots=1, test_per_class=6)
    ev.prepare_test_sets(tasks, tw.RES, "none", 0)
    plain = [ev.image_features(model, t.test, CPU, 16, 0)[0] for t in tasks]
    row = ev.evaluate(model, tasks, False, CPU, 16, 0)
    ev.prepare_test_sets(tasks, tw.RES, str(tmp_path), 2)
    assert all(isinstance(t.test, ev.CachedImages) for t in tasks)
    cached = [ev.image_features(model, t.test, CPU, 16, 2)[0] for t in tasks]
    assert all(torch.equal(a, b) for a, b in zip(plain, cached))
    assert ev.evaluate(model, tasks, False, CPU, 16, 2) == row


def test_cache_is_built_once_and_keyed_by_the_images(tmp_path):
    """A second run reuses the file; other images or another resolution get their own file; no temp file is left."""
    task = tw.tiny_tasks(shots=1, test_per_class=2)[0]
    first = ev.cache_test_set("shapes", task.test, tw.RES, str(tmp_path), workers=0)
    stamp = os.stat(first.path).st_mtime_ns
    again = ev.cache_test_set("shapes", task.test, tw.RES, str(tmp_path), workers=0)
    assert again.path == first.path and os.stat(first.path).st_mtime_ns == stamp
    other = task.test.__class__(task.test.images[::-1].copy(), task.test.labels[::-1])
    assert ev.cache_test_set("shapes", other, tw.RES, str(tmp_path), workers=0).path != first.path
    assert ev.cache_test_set("shapes", task.test, 16, str(tmp_path), workers=0).path != first.path
    stored = np.load(first.path, mmap_mode="r")
    assert stored.dtype == np.uint8 and stored.shape == (len(task.test), 3, tw.RES, tw.RES)
    assert sorted(os.listdir(tmp_path)) == sorted(f for f in os.listdir(tmp_path) if f.endswith(".npy"))


def _ridge(x, y, lam=0.1):
    return torch.linalg.solve(x.T @ x + lam * x.pow(2).sum(1).mean() * torch.eye(x.shape[1], dtype=x.dtype), x.T @ y)


@torch.no_grad()
def fitted_clip(tasks):
    """A tiny random CLIP whose two projections are fitted in closed form (ridge) so that each image's
    feature points at its class prompt's: predictions spread over the classes, well above chance."""
    model = tiny_clip()
    model.visual.proj.copy_(torch.eye(64))
    model.text_projection.copy_(torch.eye(64))
    z = model.encode_text(clip_model.tokenize([t.templates[0].format(c) for t in tasks for c in t.classnames]))
    x = torch.cat([model.encode_image(torch.stack([img for img, _ in t.test])) for t in tasks])
    offsets = data.union_offsets(tasks)
    y = torch.cat([torch.tensor(t.test.labels) + o for t, o in zip(tasks, offsets)])
    targets = torch.randn(len(z), 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    z, x = z.double(), x.double()
    model.ln_final.bias -= z.mean(0).float()  # centred features: a well-conditioned fit, as in a trained model
    model.text_projection.copy_(_ridge(z - z.mean(0), targets).float())
    model.visual.ln_post.bias -= x.mean(0).float()
    model.visual.proj.copy_(_ridge(x - x.mean(0), targets[y]).float())
    return model


def test_bf16_evaluation_agrees_with_fp32():
    """bf16 autocast evaluation of a non-degenerate model: accuracy within 0.5 pp of fp32, over 90% same predictions."""
    tasks = tw.tiny_tasks(shots=1, test_per_class=40)
    ev.prepare_test_sets(tasks, tw.RES, "none", 0)
    model = fitted_clip(tasks)
    preds = {}
    for amp in (False, True):
        with torch.autocast("cpu", torch.bfloat16, enabled=amp):
            feats = [ev.image_features(model, t.test, CPU, 256, 0)[0] for t in tasks]
            texts = [ev.class_features(model, t.classnames, t.templates, CPU) for t in tasks]
        preds[amp] = torch.cat([(f @ t.T).argmax(-1) for f, t in zip(feats, texts)])
    labels = torch.cat([torch.tensor(t.test.labels) for t in tasks])
    acc32, acc16 = [100 * (preds[a] == labels).float().mean().item() for a in (False, True)]
    chance = 100 * np.mean([1 / len(t.classnames) for t in tasks])
    assert acc32 > 2 * chance and len(set(preds[False].tolist())) >= 8  # the model is not degenerate
    assert abs(acc32 - acc16) <= 0.5
    assert (preds[False] == preds[True]).float().mean() > 0.9
