"""The fast evaluation path changes no result: the uint8 preprocessing, the test-image cache,
and bf16 autocast."""
import os

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

import clip_model
import data
import eval as evaluation
import tiny_world as tw
from conftest import SMALL, make_small_clip

CPU = torch.device("cpu")
PX = SMALL["image_resolution"]  # the small CLIP's side in pixels
# OpenAI's normalisation (openai/CLIP clip.py, _transform), written out: not our copy of it
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def jpeg_set(folder, n=6):
    """n generated JPEGs of different sizes and aspect ratios (one grey, one RGBA PNG)."""
    rng, paths = np.random.default_rng(0), []
    for i in range(n):
        w, h = 40 + 13 * i, 30 + 7 * (n - i)
        img = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        img = img.resize((w, h), Image.BICUBIC)
        img = img.convert("L") if i == 1 else img.convert("RGBA") if i == 2 else img
        paths.append(str(folder / f"{i}.{'png' if i == 2 else 'jpg'}"))
        img.save(paths[-1])
    return data.ImageSet(paths, list(range(n)))


def test_preprocess_normalize_and_cache_equal_torchvision_bitwise(tmp_path):
    """normalize(preprocess(image)), from the file or from the uint8 cache, is exactly the tensor
    of torchvision's Resize, CenterCrop, ToTensor, Normalize (OpenAI's transform)."""
    for images, R in ((jpeg_set(tmp_path), 24), (tw.tasks(1, test_per_class=2)[0].test, tw.RES)):
        images.transform = clip_model.preprocess(False, R)
        cached = images.cached("x", str(tmp_path / "cache"))
        reference = transforms.Compose([
            transforms.Resize(R, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(R), transforms.ToTensor(),
            transforms.Normalize(OPENAI_MEAN, OPENAI_STD)])
        for i in range(len(images)):
            (x, y), (z, _) = cached[i], images[i]
            assert x.dtype == torch.uint8 and x.shape == (3, R, R) and y == images.labels[i]
            assert torch.equal(x, z)
            image = images.images[i]
            image = Image.fromarray(image) if isinstance(image, np.ndarray) else Image.open(image)
            assert torch.equal(clip_model.normalize(x[None])[0], reference(image.convert("RGB")))


def test_cached_evaluation_gives_identical_features_and_accuracy(tmp_path):
    """fp32: image features from the cache equal those from decoding, bit for bit, so accuracy
    is identical."""
    model, tasks = make_small_clip(), tw.tasks(1, test_per_class=6)
    data.prepare(tasks, PX)
    plain = [evaluation.image_features(model.encode_image, t.test, CPU, 16, 0)[0] for t in tasks]
    row = evaluation.evaluate(model, tasks, False, CPU, 16, 0)
    data.prepare(tasks, PX, str(tmp_path), 2)
    assert all(isinstance(t.test, data.CachedImages) for t in tasks)
    cached = [evaluation.image_features(model.encode_image, t.test, CPU, 16, 2)[0] for t in tasks]
    assert all(torch.equal(a, b) for a, b in zip(plain, cached))
    assert evaluation.evaluate(model, tasks, False, CPU, 16, 2) == row


def test_cache_is_built_once_and_keyed_by_the_images(tmp_path):
    """A second run reuses the file; other images or another resolution get their own file; no
    temporary file is left."""
    task = tw.tasks(1, test_per_class=2)[0]
    task.test.transform = clip_model.preprocess(False, tw.RES)
    first = task.test.cached("shapes", str(tmp_path))
    stamp = os.stat(first.path).st_mtime_ns
    again = task.test.cached("shapes", str(tmp_path))
    assert again.path == first.path and os.stat(first.path).st_mtime_ns == stamp
    other = data.ImageSet(task.test.images[::-1].copy(), task.test.labels[::-1],
                          task.test.transform)
    assert other.cached("shapes", str(tmp_path)).path != first.path
    task.test.transform = clip_model.preprocess(False, 16)
    assert task.test.cached("shapes", str(tmp_path)).path != first.path
    stored = np.load(first.path, mmap_mode="r")
    assert stored.dtype == np.uint8 and stored.shape == (len(task.test), 3, tw.RES, tw.RES)
    assert all(f.endswith(".npy") for f in os.listdir(tmp_path))


def _ridge(x, y, lam=0.1):
    eye = torch.eye(x.shape[1], dtype=x.dtype)
    return torch.linalg.solve(x.T @ x + lam * x.pow(2).sum(1).mean() * eye, x.T @ y)


@torch.no_grad()
def fitted_clip(tasks):
    """A small random CLIP whose two projections are fitted in closed form (ridge) so that each
    image's feature points at its class prompt's: predictions spread over the classes."""
    model = make_small_clip()
    width = model.visual.proj.shape[0]  # both towers of the small CLIP are this wide
    model.visual.proj = torch.nn.Parameter(torch.eye(width))  # features before the projections
    model.text_projection = torch.nn.Parameter(torch.eye(width))
    prompts = [t.templates[0].format(c) for t in tasks for c in t.classnames]
    z = model.encode_text(clip_model.tokenize(prompts)).double()
    x = torch.cat([model.encode_image(clip_model.normalize(torch.stack([img for img, _ in t.test])))
                   for t in tasks]).double()
    offsets = data.union_offsets(tasks)
    y = torch.cat([torch.tensor(t.test.labels) + o for t, o in zip(tasks, offsets)])
    targets = torch.randn(len(z), 64, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(0))
    model.ln_final.bias -= z.mean(0).float()  # centred features: a well-conditioned fit
    model.text_projection = torch.nn.Parameter(_ridge(z - z.mean(0), targets).float())
    model.visual.ln_post.bias -= x.mean(0).float()
    model.visual.proj = torch.nn.Parameter(_ridge(x - x.mean(0), targets[y]).float())
    return model


def test_bf16_evaluation_agrees_with_fp32():
    """bf16 autocast evaluation of a non-degenerate model: accuracy within 0.5 pp of fp32, over
    90% same predictions."""
    tasks = tw.tasks(1, test_per_class=40)
    data.prepare(tasks, PX)
    model = fitted_clip(tasks)
    preds = {}
    for amp in (False, True):
        with torch.autocast("cpu", torch.bfloat16, enabled=amp):
            feats = [evaluation.image_features(model.encode_image, t.test, CPU, 256, 0)[0]
                     for t in tasks]
            texts = [evaluation.class_features(model, t.classnames, t.templates, CPU)
                     for t in tasks]
        preds[amp] = torch.cat([(f @ t.T).argmax(-1) for f, t in zip(feats, texts)])
    labels = torch.cat([torch.tensor(t.test.labels) for t in tasks])
    acc32, acc16 = [100 * (preds[a] == labels).float().mean().item() for a in (False, True)]
    chance = 100 * np.mean([1 / len(t.classnames) for t in tasks])
    assert acc32 > 2 * chance and len(set(preds[False].tolist())) >= 8  # not degenerate
    assert abs(acc32 - acc16) <= 0.5
    assert (preds[False] == preds[True]).float().mean() > 0.9
