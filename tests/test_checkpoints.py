"""Checkpoints in and out (docs/checkpoints.md): transformers' and open_clip's folders load to the
function those libraries compute, export writes folders they read, hf-hub: names come from the
local cache. transformers, safetensors and open_clip are test-only (requirements-test.txt)."""
import json
import os
import sys

import pytest
import torch

import open_clip  # test-only, as are transformers and safetensors
from open_clip.model import CLIP as OpenCLIP, CLIPTextCfg, CLIPVisionCfg
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel

import analysis
import clip_model
import codyra
import eval as evaluation
import tiny_world

TINY = clip_model.CONFIGS["tiny"]
PROMPTS = ["a photo of a dog.", "it's 2024"]


def perturbed(model, seed=0):
    """model with noise on every weight: inits leave biases at 0 and LayerNorms at 1, which would
    hide a swapped or missing bias."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def tiny_clip(activation):
    torch.manual_seed(0)
    return perturbed(clip_model.CLIP(**TINY, activation=activation))


def assert_same_features(ours, image_features, text_features, resolution):
    """ours gives the reference's image and text features to 1e-4."""
    torch.manual_seed(1)
    images, tokens = torch.randn(2, 3, resolution, resolution), clip_model.tokenize(PROMPTS)
    with torch.no_grad():
        for a, b in ((ours.encode_image(images), image_features(images)),
                     (ours.encode_text(tokens), text_features(tokens))):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def transformers_features(hf):
    return (lambda x: hf.get_image_features(pixel_values=x).pooler_output,
            lambda t: hf.get_text_features(input_ids=t).pooler_output)


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def one_line_error(call, *words):
    with pytest.raises(clip_model.CLIPLoadError) as info:
        call()
    assert "\n" not in str(info.value) and all(w in str(info.value) for w in words), info.value

# -----------------------------------------------------------------------------
# in: other tools' folders


def b16_transformers_folder(path):
    """A transformers CLIPModel of ViT-B/16's widths, patch, resolution and vocabulary (2 blocks
    per tower instead of 12: every tensor shape is B/16's), QuickGELU, saved with save_pretrained
    (model.safetensors)."""
    def tower(width, **more):
        return dict(hidden_size=width, intermediate_size=4 * width, num_attention_heads=width // 64,
                    num_hidden_layers=2, hidden_act="quick_gelu", **more)
    torch.manual_seed(0)
    config = CLIPConfig(text_config=tower(512, max_position_embeddings=77, vocab_size=49408),
                        vision_config=tower(768, image_size=224, patch_size=16), projection_dim=512)
    hf = perturbed(CLIPModel(config))
    hf.save_pretrained(path)
    return hf


def test_transformers_folder_gives_transformers_features(tmp_path):
    """A B/16-shaped transformers CLIPModel folder loads to its get_image_features and
    get_text_features to 1e-4."""
    hf = b16_transformers_folder(tmp_path)
    assert_same_features(clip_model.load(str(tmp_path)), *transformers_features(hf), 224)


def test_open_clip_gelu_folder_gives_open_clip_features(tmp_path):
    """An open_clip ViT-B-16-shaped folder (2 blocks per tower) whose config names no QuickGELU
    loads with GELU and gives open_clip's features to 1e-4 (QuickGELU would miss by far more)."""
    cfg = json.load(open(os.path.join(os.path.dirname(open_clip.__file__), "model_configs",
                                      "ViT-B-16.json")))
    cfg["vision_cfg"]["layers"] = cfg["text_cfg"]["layers"] = 2
    torch.manual_seed(0)
    ref = perturbed(OpenCLIP(cfg["embed_dim"], CLIPVisionCfg(**cfg["vision_cfg"]),
                             CLIPTextCfg(**cfg["text_cfg"])))
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    save_file(ref.state_dict(), tmp_path / "open_clip_model.safetensors")
    ours = clip_model.load(str(tmp_path))
    assert_same_features(ours, ref.encode_image, ref.encode_text, 224)


def test_safetensors_only_folder_without_the_package(tmp_path, monkeypatch):
    """A folder holding only model.safetensors, without the safetensors package, is one line that
    says pip install safetensors."""
    clip_model.export(tiny_clip("quick_gelu"), str(tmp_path), "hf")
    (tmp_path / "pytorch_model.bin").rename(tmp_path / "model.safetensors")  # a name is enough
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import safetensors: ImportError
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    one_line_error(lambda: clip_model.load(str(tmp_path)), "pip install safetensors")


def test_hf_hub_name_resolves_in_the_local_cache(tmp_path, monkeypatch):
    """hf-hub:<id> loads the snapshot refs/main names in $HF_HOME/hub, laid out as
    huggingface_hub lays it out."""
    repo = tmp_path / "hub" / "models--someone--tiny-clip"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    clip_model.export(tiny_clip("gelu"), str(repo / "snapshots" / "0123abcd"), "open_clip")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert_same_state(clip_model.load("hf-hub:someone/tiny-clip"), tiny_clip("gelu"))


def test_hf_hub_name_missing_from_the_cache_is_one_line(tmp_path, monkeypatch):
    """An hf-hub:<id> not in the cache is one line that names the folder it looked in."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    one_line_error(lambda: clip_model.load("hf-hub:someone/absent"),
                   str(tmp_path / "models--someone--absent"))

# -----------------------------------------------------------------------------
# out: export


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_export_reads_back_in_transformers(activation, tmp_path):
    """export(..., "hf") writes a folder CLIPModel.from_pretrained reads to our features, 1e-4."""
    ours = tiny_clip(activation)
    hf = CLIPModel.from_pretrained(clip_model.export(ours, str(tmp_path), "hf")).eval()
    assert_same_features(ours, *transformers_features(hf), TINY["image_resolution"])


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_export_reads_back_in_open_clip(activation, tmp_path):
    """export(..., "open_clip") writes a folder open_clip.create_model reads to our features."""
    ours = tiny_clip(activation)
    ref = open_clip.create_model(f"local-dir:{clip_model.export(ours, str(tmp_path), 'open_clip')}")
    assert_same_features(ours, ref.eval().encode_image, ref.encode_text, TINY["image_resolution"])


@pytest.mark.parametrize("fmt", ["hf", "open_clip"])
@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_tiny_clip_round_trips(fmt, activation, tmp_path):
    """The tiny CLIP exported and loaded again has the same weights and activation."""
    ours = tiny_clip(activation)
    back = clip_model.load(clip_model.export(ours, str(tmp_path), fmt))
    assert_same_state(back, ours)
    assert back.visual.transformer.resblocks[0].mlp.act is clip_model.ACTIVATIONS[activation]


def test_a_gelu_checkpoint_stays_gelu(tmp_path):
    """A GELU model's state dict saved as train.py saves it loads back with GELU, not as OpenAI's
    (its `uses_gelu` entry)."""
    torch.save({"model": tiny_clip("gelu").state_dict(), "task": 1}, tmp_path / "checkpoint.pt")
    back = clip_model.load(str(tmp_path / "checkpoint.pt"))
    assert back.transformer.resblocks[0].mlp.act is clip_model.ACTIVATIONS["gelu"]


def test_export_refuses_adapters(tmp_path):
    """A model with adapters is refused (the export is plain CLIP: merge first)."""
    with pytest.raises(ValueError, match="merge"):
        clip_model.export(codyra.inject(tiny_clip("quick_gelu"), 2), str(tmp_path), "hf")


def test_eval_export_writes_the_checkpoint(small_weights, tmp_path, monkeypatch, capsys):
    """python eval.py --model CKPT --export open_clip FOLDER writes the checkpoint's weights."""
    monkeypatch.setattr(sys, "argv", ["eval.py", "--model", small_weights,
                                      "--export", "open_clip", str(tmp_path / "oc")])
    evaluation.main()
    assert_same_state(clip_model.load(str(tmp_path / "oc")), clip_model.load(small_weights))
    monkeypatch.setattr(sys, "argv", ["eval.py", "--export", "onnx", str(tmp_path / "x")])
    with pytest.raises(SystemExit):
        evaluation.main()
    assert "--export onnx: expected hf or open_clip" in capsys.readouterr().err


def test_eval_export_of_a_missing_model_leaves_no_folder(tmp_path, monkeypatch, capsys):
    """--export with a --model that cannot load: one line, and the folder it made is gone (one
    that was there before stays)."""
    (tmp_path / "there").mkdir()
    for folder in ("new", "there"):
        monkeypatch.setattr(sys, "argv", ["eval.py", "--model", str(tmp_path / "missing.pt"),
                                          "--export", "hf", str(tmp_path / folder)])
        with pytest.raises(SystemExit, match="missing.pt"):
            evaluation.main()
    assert os.listdir(tmp_path) == ["there"]

# -----------------------------------------------------------------------------
# the shipped tiny CLIP


def test_eval_exports_the_shipped_tiny_clip_by_name(tmp_path, monkeypatch):
    """python eval.py --model tiny --export hf FOLDER writes the shipped tiny CLIP."""
    monkeypatch.setattr(sys, "argv", ["eval.py", "--model", "tiny", "--export", "hf",
                                      str(tmp_path / "hf")])
    evaluation.main()
    assert_same_state(clip_model.load(str(tmp_path / "hf")), tiny_world.pretrained())


def shipped_weights():
    """assets/tiny_clip.pt's tensors read by hand, in fp32: the file holds {"recipe", "made_on",
    "state_dict": fp16 tensors in our own keys (q_proj, k_proj, v_proj: no packed in_proj)}."""
    raw = torch.load(tiny_world.SHIPPED, map_location="cpu", weights_only=True)["state_dict"]
    assert all(w.dtype == torch.float16 for w in raw.values())
    return {k: w.float() for k, w in raw.items()}


def test_shipped_tiny_clip_loads():
    """clip_model.load reads assets/tiny_clip.pt to the file's own fp16 numbers, read here with
    torch.load: the same keys, every tensor equal."""
    sd, raw = clip_model.load(tiny_world.SHIPPED).state_dict(), shipped_weights()
    assert sd.keys() == raw.keys()
    for key in raw:
        torch.testing.assert_close(sd[key], raw[key], rtol=0, atol=0, msg=key)


def test_analysis_compares_a_checkpoint_with_the_shipped_tiny_clip(tmp_path, monkeypatch,
                                                                   capsys):
    """python analysis.py CHECKPOINT assets/tiny_clip.pt prints the drift of all adapted linears
    (q, k, v, out, c_fc, c_proj of both towers) stacked: ||W_B - W_A||_F and its share of
    ||W_A||_F, as recomputed here from the two files."""
    a = tiny_clip("quick_gelu").state_dict()
    torch.save({"model": a}, tmp_path / "checkpoint.pt")
    monkeypatch.setattr(sys, "argv", ["analysis.py", str(tmp_path / "checkpoint.pt"),
                                      tiny_world.SHIPPED])
    analysis.main()
    b = {k: w for k, w in shipped_weights().items() if ".resblocks." in k and w.dim() == 2}
    assert len(b) == 6 * (TINY["vision_layers"] + TINY["transformer_layers"])  # the linears
    drift = sum(float((b[k].double() - a[k].double()).norm()) ** 2 for k in b) ** 0.5
    base = sum(float(a[k].double().norm()) ** 2 for k in b) ** 0.5
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith(f"||W_B - W_A||_F {drift:.3g} ({100 * drift / base:.2g}% of "), line


def export_with(monkeypatch, capsys, *argv):
    """python eval.py --model tiny --export hf <argv>: the exit status and the stderr lines."""
    monkeypatch.setattr(sys, "argv", ["eval.py", "--model", "tiny", "--export", "hf", *argv])
    try:
        evaluation.main()
        status = 0
    except SystemExit as e:
        status = e.code
    return status, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_export_keeps_another_model_without_overwrite(tmp_path, monkeypatch, capsys):
    """--export into a folder holding another model's files is refused in one line asking for
    --overwrite, and leaves them; a FOLDER that is '', a file or cannot be made: one line naming
    --export. With --overwrite the export replaces the model."""
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "bert"}')
    (other / "model.safetensors").write_bytes(b"another model's weights")
    status, err = export_with(monkeypatch, capsys, str(other))
    assert status == 2 and len(err) == 1 and "--overwrite" in err[0], err
    assert (other / "model.safetensors").read_bytes() == b"another model's weights"
    assert json.loads((other / "config.json").read_text()) == {"model_type": "bert"}
    (tmp_path / "file").write_text("x")
    for folder in ("", str(tmp_path / "file"), "/proc/codyra-export"):
        status, err = export_with(monkeypatch, capsys, folder)
        assert status == 2 and len(err) == 1 and err[0].startswith("error: --export"), err
    assert export_with(monkeypatch, capsys, str(other), "--overwrite")[0] == 0
    assert sorted(os.listdir(other)) == ["config.json", "pytorch_model.bin"]
    assert_same_state(clip_model.load(str(other)), tiny_world.pretrained())


def test_a_bert_folder_an_empty_hub_id_and_a_cut_download_say_so(tmp_path, monkeypatch):
    """A transformers folder of another model_type (a BERT's config), hf-hub: without an id, an
    hf-hub entry whose refs/main names a snapshot a cut download left out, and a results.json
    given as weights: one line each that says what it is."""
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert", "hidden_size": 768}')
    one_line_error(lambda: clip_model.load(str(tmp_path / "bert")), "model_type bert, not clip")
    one_line_error(lambda: clip_model.load("hf-hub:"), "needs an id")
    repo = tmp_path / "hub" / "models--someone--cut"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    one_line_error(lambda: clip_model.load("hf-hub:someone/cut"), "only in part", str(repo))
    (tmp_path / "results.json").write_text('{"acc": [[50.0]]}')
    one_line_error(lambda: clip_model.load(str(tmp_path / "results.json")), "not a weight file",
                   "checkpoint.pt")
