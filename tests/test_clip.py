"""clip_model.py against open_clip (test-only dependency) as an independent reference: same
random weights -> same features; OpenAI's file formats; OpenAI's token ids; one-line load errors."""
import hashlib
import json
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from torchvision import transforms

import open_clip  # test-only: the independent reference (requirements-test.txt)
from open_clip.model import CLIP as OpenCLIP, CLIPTextCfg, CLIPVisionCfg

import clip_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY, B16 = clip_model.CONFIGS["tiny"], clip_model.CONFIGS["ViT-B/16"]
PROMPTS = ["a photo of a dog.", "a photo of a 707-320, a type of aircraft.", "it's 2024"]


class Holder(torch.nn.Module):  # a TorchScript module that only holds tensors
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def write_openai_archive(sd, path):
    """Write a CLIP state dict as OpenAI ships theirs (clip_model.load reads both alike): a
    TorchScript archive of fp16 tensors, q, k and v packed into in_proj, three integer entries.
    Returns the state dict it wrote."""
    sd = dict(sd)
    for q in [k for k in sd if ".q_proj." in k]:
        prefix, kind = q.split(".q_proj.")
        sd[f"{prefix}.in_proj_{kind}"] = torch.cat([sd.pop(f"{prefix}.{x}_proj.{kind}")
                                                    for x in "qkv"])
    sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    grid = round((len(sd["visual.positional_embedding"]) - 1) ** 0.5)  # patches per side
    sd.update(input_resolution=torch.tensor(grid * sd["visual.conv1.weight"].shape[-1]),
              context_length=torch.tensor(len(sd["positional_embedding"])),
              vocab_size=torch.tensor(len(sd["token_embedding.weight"])))
    holder = Holder()
    for key, value in sd.items():
        *parents, leaf = key.split(".")
        module = holder
        for name in parents:
            if not hasattr(module, name):
                module.add_module(name, Holder())
            module = getattr(module, name)
        module.register_buffer(leaf, value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript: deprecated, OpenAI's format
        torch.jit.save(torch.jit.script(holder), path)
    return sd


def reference_pair(cfg, seed=0):
    """(open_clip model, OpenAI-format state dict, our model built from it), same random weights."""
    torch.manual_seed(seed)
    ref = OpenCLIP(cfg["embed_dim"], quick_gelu=True,  # OpenAI's weights use QuickGELU
                   vision_cfg=CLIPVisionCfg(layers=cfg["vision_layers"], width=cfg["vision_width"],
                                            patch_size=cfg["vision_patch_size"],
                                            image_size=cfg["image_resolution"]),
                   text_cfg=CLIPTextCfg(context_length=cfg["context_length"],
                                        vocab_size=cfg["vocab_size"],
                                        width=cfg["transformer_width"],
                                        heads=cfg["transformer_heads"],
                                        layers=cfg["transformer_layers"])).eval()
    sd = ref.state_dict()  # open_clip's ViT keeps OpenAI's key names (packed in_proj included)
    with torch.no_grad():  # its init leaves biases at 0 and LayerNorms at 1: perturb every vector
        for v in sd.values():
            if v.dim() <= 1:
                v.add_(0.1 * torch.randn_like(v))
    return ref, sd, clip_model.build_model(sd).eval()


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def assert_same_outputs(ours, ref, images, tokens):
    with torch.no_grad():
        assert rel_err(ours.encode_image(images), ref.encode_image(images)) < 1e-5
        assert rel_err(ours.encode_text(tokens), ref.encode_text(tokens)) < 1e-5
        # open_clip returns normalised features and exp(logit_scale)
        img, txt, scale = ref(images, tokens)
        assert rel_err(ours(images, tokens), scale * img @ txt.T) < 1e-5


@pytest.fixture(scope="module")
def tiny():
    return reference_pair(TINY)


@pytest.fixture(scope="module")
def b16():
    return reference_pair(B16)

# -----------------------------------------------------------------------------
# the model


def test_tiny_clip_matches_open_clip(tiny):
    """A tiny CLIP gives open_clip's image features, text features and logits to 1e-5 relative."""
    ref, _, ours = tiny
    torch.manual_seed(1)
    assert_same_outputs(ours, ref, torch.randn(3, 3, 32, 32), clip_model.tokenize(PROMPTS))


def test_vit_b16_matches_open_clip(b16):
    """The full ViT-B/16 shape gives open_clip's outputs to 1e-5 relative on a batch of two."""
    ref, _, ours = b16
    torch.manual_seed(1)
    assert_same_outputs(ours, ref, torch.randn(2, 3, 224, 224), clip_model.tokenize(PROMPTS[:2]))


def test_vit_b16_parameter_count(b16):
    """ViT-B/16 built from a state dict has the parameters of OpenAI's, 149,620,737."""
    assert sum(p.numel() for p in b16[2].parameters()) == 149_620_737


def test_attention_is_four_linears(tiny):
    """Every attention and MLP weight is a plain nn.Linear under the contract's names (what
    adapters wrap)."""
    names = {n for n, m in tiny[2].named_modules() if isinstance(m, nn.Linear)}
    for tower, layers in (("visual.transformer", 3), ("transformer", 3)):
        for i in range(layers):
            for leaf in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj",
                         "mlp.c_fc", "mlp.c_proj"):
                names.remove(f"{tower}.resblocks.{i}.{leaf}")
    assert names == set() and not any(isinstance(m, nn.MultiheadAttention)
                                      for m in tiny[2].modules())


def test_cutting_text_changes_no_feature(tiny):
    """Text features are the same whether the batch is cut to its longest prompt or run at full
    length."""
    ours = tiny[2]
    full = clip_model.tokenize("x " * 100, truncate=True)  # a 77-token prompt: nothing can be cut
    tokens = clip_model.tokenize(PROMPTS)
    with torch.no_grad():
        cut, uncut = (ours.encode_text(tokens),
                      ours.encode_text(torch.cat([tokens, full]))[:len(PROMPTS)])
    assert rel_err(cut, uncut) < 1e-6

# -----------------------------------------------------------------------------
# loading


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_openai_archive_loads_like_the_state_dict(tiny, tmp_path):
    """OpenAI's format (TorchScript, fp16, extra integer entries) loads to the model its state
    dict gives."""
    sd16 = write_openai_archive(tiny[1], tmp_path / "ViT-tiny.pt")
    torch.save(sd16, tmp_path / "plain.pt")
    from_archive = clip_model.load(str(tmp_path / "ViT-tiny.pt"))
    from_plain = clip_model.load(str(tmp_path / "plain.pt"))
    assert_same_state(from_archive, from_plain)
    assert_same_state(from_archive, clip_model.build_model(sd16))
    assert not from_archive.training and all(p.dtype == torch.float32
                                             for p in from_archive.parameters())


def test_project_checkpoints_round_trip(tiny, tmp_path):
    """A state dict of this project (q/k/v split), bare or under "model", loads back to the same
    model."""
    torch.save(tiny[2].state_dict(), tmp_path / "bare.pt")
    torch.save({"model": tiny[2].state_dict(), "task": 3, "results": {"acc": [[1.0]]}},
               tmp_path / "ckpt.pt")
    assert_same_state(clip_model.load(str(tmp_path / "bare.pt")), tiny[2])
    assert_same_state(clip_model.load(str(tmp_path / "ckpt.pt")), tiny[2])


def test_download_lands_verified_in_the_cache(tiny, tmp_path, monkeypatch):
    """A model name downloads its file into the cache once, and a later load reuses it."""
    torch.save(tiny[2].state_dict(), tmp_path / "weights.pt")
    payload = (tmp_path / "weights.pt").read_bytes()
    url = f"file://{tmp_path}/weights.pt#/{hashlib.sha256(payload).hexdigest()}/tiny.pt"
    monkeypatch.setitem(clip_model.MODELS, "tiny", url)
    assert_same_state(clip_model.load("tiny", download_root=str(tmp_path / "cache")), tiny[2])
    assert os.listdir(tmp_path / "cache") == ["tiny.pt"]
    os.remove(tmp_path / "weights.pt")  # the source is gone: the cached file must serve
    assert_same_state(clip_model.load("tiny", download_root=str(tmp_path / "cache")), tiny[2])


def one_line_error(call, *words):
    with pytest.raises(clip_model.CLIPLoadError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message
    return message


def test_wrong_sha256_leaves_no_file(tmp_path, monkeypatch):
    """A download whose sha256 differs from the URL's raises one line and leaves nothing in the
    cache."""
    (tmp_path / "weights.pt").write_bytes(b"not the weights")
    monkeypatch.setitem(clip_model.MODELS, "tiny",
                        f"file://{tmp_path}/weights.pt#/{'0' * 64}/tiny.pt")
    one_line_error(lambda: clip_model.load("tiny", download_root=str(tmp_path / "cache")), "sha256")
    assert os.listdir(tmp_path / "cache") == []


def test_offline_download(tmp_path, monkeypatch):
    """A download that cannot reach its URL raises one line that says where to put the file by
    hand."""
    monkeypatch.setitem(clip_model.MODELS, "tiny",
                        f"file://{tmp_path}/nowhere.pt#/{'0' * 64}/tiny.pt")
    one_line_error(lambda: clip_model.load("tiny", download_root=str(tmp_path / "cache")),
                   "could not download", str(tmp_path / "cache" / "tiny.pt"))


@pytest.mark.parametrize("fmt", ["archive", "state dict"])
def test_truncated_file(tiny, tmp_path, fmt):
    """A file cut short, TorchScript or state dict, raises one line."""
    path = tmp_path / "w.pt"
    write_openai_archive(tiny[1], path) if fmt == "archive" else torch.save(tiny[1], path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    one_line_error(lambda: clip_model.load(str(path)), "truncated")


def test_non_clip_files(tmp_path):
    """A text file, a non-CLIP state dict and an unknown name each raise one line."""
    (tmp_path / "notes.txt").write_text("hello")
    one_line_error(lambda: clip_model.load(str(tmp_path / "notes.txt")), "neither")
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "linear.pt")
    one_line_error(lambda: clip_model.load(str(tmp_path / "linear.pt")), "missing",
                   "visual.conv1.weight")
    one_line_error(lambda: clip_model.load("ViT-B/17"), "ViT-B/16")


def test_resnet_checkpoint_is_refused():
    """A ResNet CLIP state dict is refused with one line naming the ViT models."""
    sd = {"visual.layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1),
          "text_projection": torch.zeros(512, 1024)}
    one_line_error(lambda: clip_model.build_model(sd), "ResNet", "ViT-B/16")


def test_missing_keys_are_named(tiny):
    """A state dict missing a block weight raises one line that names it."""
    sd = {k: v for k, v in tiny[1].items() if k != "transformer.resblocks.1.mlp.c_fc.weight"}
    one_line_error(lambda: clip_model.build_model(sd), "transformer.resblocks.1.mlp.c_fc.weight")

# -----------------------------------------------------------------------------
# tokenizer and preprocessing


GOLDEN = {  # SPEC section 2, from OpenAI's tokenizer
    "a diagram": [49406, 320, 22697, 49407],
    "a photo of a dog.": [49406, 320, 1125, 539, 320, 1929, 269, 49407],
    'a photo of the number: "7".': [49406, 320, 1125, 539, 518, 2842, 281, 257, 278, 2811, 49407],
    "a photo of a 707-320, a type of aircraft.": [49406, 320, 1125, 539, 320, 278, 271, 278, 268,
                                                  274, 273, 271, 267, 320, 3877, 539, 7706, 269,
                                                  49407],
    "Hello  World!!  &amp; café": [49406, 3306, 1002, 748, 261, 15304, 49407],
    "it's 2024": [49406, 585, 568, 273, 271, 273, 275, 49407],
}


def test_golden_ids():
    """SPEC's golden strings give OpenAI's ids, zero-padded to 77."""
    tokens = clip_model.tokenize(list(GOLDEN))
    assert tokens.shape == (len(GOLDEN), 77) and tokens.dtype == torch.long
    for row, ids in zip(tokens, GOLDEN.values()):
        assert row[:len(ids)].tolist() == ids and not row[len(ids):].any()


def reference_prompts():
    """Every listed class name in every template of its dataset (both settings), and every template
    with a few awkward names."""
    ref = json.load(open(os.path.join(ROOT, "assets", "classnames_templates.json")))
    mtil, xtail = ref["mtil"], ref["xtail"]
    prompts, templates = [], [t for d in mtil.values() if isinstance(d, dict)
                              for t in d["templates"]]
    for name, d in mtil.items():
        if isinstance(d, dict) and "classnames" in d:
            suffix = xtail[name].get("classname_suffix", "")
            prompts += [t.format(c) for c in d["classnames"] for t in d["templates"]]
            prompts += [xtail[name]["template"].format(c + suffix) for c in d["classnames"]]
    templates += [d["template"] for d in xtail.values() if isinstance(d, dict)]
    return prompts + [t.format(c) for t in templates
                      for c in ("São Paulo", "7 - seven", "black-and-white cat",
                                "A340-300", "2012 Acura TL Sedan", "F-16A/B")]  # digits alone


def test_class_prompts_match_open_clip():
    """Every class prompt of the reference file tokenizes to open_clip's (= OpenAI's) ids."""
    prompts = reference_prompts()
    assert len(prompts) > 3500
    assert torch.equal(clip_model.tokenize(prompts), open_clip.tokenize(prompts).long())


def test_text_cleaning_is_openais():
    """Text is cleaned as OpenAI's tokenizer does (ftfy, then html.unescape twice): mojibake,
    entities escaped twice, ligatures, full-width letters and curly quotes give open_clip's ids."""
    texts = ["a photo of a cafÃ©.", "salt &amp;amp; pepper", "&lt;b&gt;", "a ﬁsh", "ＡＢＣ",
             "don’t", "a photo of the Ã‰cole.", "a  \t photo\nof  a dog ",
             "1 < 2 &amp;amp; 3"]  # a literal "<": ftfy leaves the entities, both unescapes act
    ids = clip_model.tokenize(texts)
    assert torch.equal(ids, open_clip.tokenize(texts).long())
    assert torch.equal(ids[0], clip_model.tokenize("a photo of a café.")[0])  # not by accident


def test_truncation():
    """Too long a prompt raises one line, unless truncate=True: then 77 ids ending in the end
    token."""
    text = "a photo of " + "a very " * 60 + "big dog."
    with pytest.raises(ValueError) as info:
        clip_model.tokenize(text)
    assert "\n" not in str(info.value) and "truncate=True" in str(info.value)
    cut = clip_model.tokenize(text, truncate=True)
    assert cut.shape == (1, 77) and cut[0, -1].item() == 49407
    # open_clip always truncates this way
    assert torch.equal(cut, open_clip.tokenize([text]).long())
    assert clip_model.tokenize("a diagram", context_length=4).tolist() == [GOLDEN["a diagram"]]


# OpenAI's normalisation, as open_clip states it (open_clip.constants), not our copy of it
OPENAI_MEAN, OPENAI_STD = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD


def photo(size=(50, 30), mode="RGB"):
    """A non-uniform, non-square image: resizing, cropping and every channel show in its pixels."""
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8))
    return small.resize(size, Image.BILINEAR).convert(mode)


def test_normalisation_constants_are_openais():
    """MEAN and STD are OpenAI's CLIP statistics, as open_clip has them."""
    assert clip_model.MEAN == OPENAI_MEAN and clip_model.STD == OPENAI_STD


@pytest.mark.parametrize("train", [False, True])
def test_preprocess_then_normalize(train):
    """Any PIL image (grayscale, not square) becomes a (3, R, R) uint8 tensor, then normalised."""
    image = Image.new("L", (50, 30), color=128)
    x = clip_model.preprocess(train, resolution=24)(image)
    assert x.shape == (3, 24, 24) and x.dtype == torch.uint8
    assert torch.allclose(clip_model.normalize(x[None])[0],
                          (128 / 255 - torch.tensor(OPENAI_MEAN)[:, None, None])
                          / torch.tensor(OPENAI_STD)[:, None, None], atol=1e-5)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_test_preprocessing_is_openais_transform(mode):
    """normalize(preprocess(False)) of a non-square image equals torchvision's Resize (bicubic),
    CenterCrop, ToTensor, Normalize with OpenAI's constants: CLIP's test transform."""
    reference = transforms.Compose([
        transforms.Resize(24, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(24), transforms.ToTensor(),
        transforms.Normalize(OPENAI_MEAN, OPENAI_STD)])
    for size in ((50, 30), (30, 50)):
        image = photo(size, mode)
        ours = clip_model.normalize(clip_model.preprocess(False, 24)(image)[None])[0]
        assert torch.allclose(ours, reference(image.convert("RGB")), atol=1e-6)


def test_training_crop_is_90_to_100_percent_of_the_area():
    """preprocess(True) is torchvision's RandomResizedCrop of scale (0.9, 1.0) (the released
    code's), aspect 3/4..4/3, bicubic: the same crops under the same seeds."""
    reference = transforms.Compose([
        transforms.RandomResizedCrop(24, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3),
                                     interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.PILToTensor()])
    image, crops = photo((40, 36)), set()  # near square: 5:3 would leave only the fallback crop
    for seed in range(8):
        torch.manual_seed(seed)
        ours = clip_model.preprocess(True, 24)(image)
        torch.manual_seed(seed)
        assert torch.equal(ours, reference(image))
        crops.add(ours.numpy().tobytes())
    assert len(crops) > 4  # random: the crops differ from seed to seed
