"""CLIP with a ViT image encoder, written from scratch so that every weight an adapter may wrap
is a plain nn.Linear; it loads OpenAI's checkpoints, and its tokenizer gives OpenAI's ids.
Shapes: B images, N texts, R image resolution, G patch grid (R / patch), T tokens per sequence
(G*G + 1 for images, L for texts), D width, H heads, Dh head width (D / H), E embedding size."""
import contextlib
import functools
import glob
import gzip
import hashlib
import html
import http.client
import json
import operator
import os
import shutil
import urllib.request
import warnings

import ftfy
import regex
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms

BPE_PATH = os.path.abspath(os.path.join(__file__, "..", "assets", "bpe_simple_vocab_16e6.txt.gz"))


# --- tokenizer: byte-level BPE, identical ids to OpenAI's (SPEC section 2)
class Tokenizer:  # text -> BPE ids: clean, split into words, map bytes to characters, merge by rank
    SOT, EOT = "<|startoftext|>", "<|endoftext|>"

    def __init__(self, bpe_path=BPE_PATH):
        with gzip.open(bpe_path, "rt", encoding="utf-8") as f:  # its line 0 is a header
            merges = [tuple(ln.split()) for ln in f.read().split("\n")[1:49152 - 256 - 2 + 1]]
        # GPT-2's reversible map of bytes to characters: printable ones ("!".."~" "¡".."¬" "®".."ÿ")
        # as they are, first (that fixes the first 512 ids), so the BPE never sees whitespace
        printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
        others = [b for b in range(256) if b not in printable]
        chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]
        self.byte_encoder = dict(zip(printable + others, chars))
        vocab = [*chars, *(c + "</w>" for c in chars), *map("".join, merges), self.SOT, self.EOT]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.sot, self.eot = self.encoder[self.SOT], self.encoder[self.EOT]
        self.cache = {self.SOT: [self.sot], self.EOT: [self.eot]}  # word -> ids; words repeat
        # words, each digit alone, runs of punctuation; the special tokens stay whole
        self.pattern = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"
                                     r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", regex.IGNORECASE)

    def bpe(self, word):  # ids of one pre-token (already byte-mapped); `</w>` marks its end
        if word not in self.cache:
            parts = list(word[:-1]) + [word[-1] + "</w>"]
            while len(parts) > 1:
                best = min(zip(parts, parts[1:]), key=lambda p: self.ranks.get(p, float("inf")))
                if best not in self.ranks:
                    break
                i = 0
                while i < len(parts) - 1:  # every occurrence of `best`, left to right, no overlap
                    if (parts[i], parts[i + 1]) == best:
                        parts[i:i + 2] = [parts[i] + parts[i + 1]]
                    i += 1
            self.cache[word] = [self.encoder[p] for p in parts]
        return self.cache[word]

    @functools.cache  # evaluation tokenizes every class prompt again after every task
    def encode(self, text):  # ids of a text, without start and end tokens
        text = html.unescape(html.unescape(ftfy.fix_text(text)))  # some are escaped twice
        text = regex.sub(r"\s+", " ", text).strip().lower()
        return [i for word in self.pattern.findall(text)
                for i in self.bpe("".join(self.byte_encoder[b] for b in word.encode("utf-8")))]


_tokenizer = functools.cache(Tokenizer)  # built on first use, then shared


def tokenize(texts, context_length=77, truncate=False):
    """str or list of str -> (N, context_length) LongTensor: [sot] ids [eot], zero-padded."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    tok, out = _tokenizer(), torch.zeros(len(texts), context_length, dtype=torch.long)
    for n, text in enumerate(texts):
        ids = [tok.sot] + tok.encode(text) + [tok.eot]
        if len(ids) > context_length and not truncate:
            raise ValueError(f"{text[:40]!r}... is {len(ids)} tokens, more than the context "
                             f"length {context_length}; shorten it or pass truncate=True")
        ids = ids if len(ids) <= context_length else ids[:context_length - 1] + [tok.eot]
        out[n, :len(ids)] = torch.tensor(ids)
    return out


# --- image preprocessing (SPEC section 2)
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def preprocess(train, resolution=224):
    """PIL image -> (3, R, R) uint8, cropped on the CPU (train: the released code's random crop of
    90-100% of the area); `normalize` ends it on the device, a quarter of the bytes to copy."""
    bicubic = transforms.InterpolationMode.BICUBIC
    crop = ([transforms.RandomResizedCrop(resolution, scale=(0.9, 1.0), interpolation=bicubic)]
            if train else [transforms.Resize(resolution, interpolation=bicubic),
                           transforms.CenterCrop(resolution)])
    to_rgb = operator.methodcaller("convert", "RGB")  # not a lambda: DataLoader workers pickle it
    return transforms.Compose(crop + [to_rgb, transforms.PILToTensor()])


def normalize(images):  # (B, 3, R, R) uint8 -> float, as torchvision's ToTensor + Normalize do it
    mean, std = (torch.tensor(v, device=images.device).view(3, 1, 1) for v in (MEAN, STD))
    return images.float().div(255).sub(mean).div(std)


# --- model: leaf modules first
class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype (OpenAI's CLIP does the same)."""

    def forward(self, x):
        return super().forward(x.float()).to(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention as four nn.Linear (q, k, v, out). NOTE: not nn.MultiheadAttention:
    it reads its weights directly, so an adapter wrapping out_proj (or in_proj) would never run."""

    def __init__(self, width, heads, causal):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(width, width)
                                                                for _ in range(4))

    def forward(self, x):  # (B, T, D)
        B, T, D = x.shape
        q, k, v = (proj(x).view(B, T, self.heads, D // self.heads).transpose(1, 2)  # (B, H, T, Dh)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        x = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, H, T, Dh)
        return self.out_proj(x.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


# NOTE: the weights do not say which one they were trained with: open_clip's own ViT-B/16
# (LAION-2B, DataComp) has exactly OpenAI's keys but GELU; the wrong one loads and runs silently
ACTIVATIONS = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # OpenAI's
               "gelu": F.gelu}  # exact (erf) GELU


class MLP(nn.Module):
    def __init__(self, width, activation):
        super().__init__()
        self.c_fc, self.c_proj = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.act = ACTIVATIONS[activation]

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width, heads, causal, activation):
        super().__init__()
        self.ln_1, self.attn = LayerNorm(width), Attention(width, heads, causal)
        self.ln_2, self.mlp = LayerNorm(width), MLP(width, activation)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, causal=False, activation="quick_gelu"):
        super().__init__()
        self.resblocks = nn.Sequential(*(ResidualAttentionBlock(width, heads, causal, activation)
                                         for _ in range(layers)))

    def forward(self, x):  # (B, T, D)
        return self.resblocks(x)


class VisionTransformer(nn.Module):
    def __init__(self, input_resolution, patch_size, width, layers, heads, output_dim,
                 activation="quick_gelu"):
        super().__init__()
        self.input_resolution = input_resolution
        scale, grid = width ** -0.5, input_resolution // patch_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, activation=activation)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x):  # (B, 3, R, R)
        x = self.conv1(x).flatten(2).transpose(1, 2)  # (B, G*G, D)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)  # (B, 1, D)
        x = torch.cat([cls.to(x.dtype), x], dim=1) + self.positional_embedding  # (B, T, D)
        return self.ln_post(self.transformer(self.ln_pre(x))[:, 0]) @ self.proj  # (B, E)


class CLIP(nn.Module):
    def __init__(self, embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size,
                 context_length, vocab_size, transformer_width, transformer_heads,
                 transformer_layers, activation="quick_gelu"):
        super().__init__()
        if activation == "gelu":  # weights cannot say it, so the state dict (checkpoint.pt too)
            self.register_buffer("uses_gelu", torch.ones(()))  # holds this; OpenAI's files do not
        # OpenAI's convention is 64-wide heads; tiny test models narrower than that get one head
        self.visual = VisionTransformer(image_resolution, vision_patch_size, vision_width,
                                        vision_layers, max(1, vision_width // 64), embed_dim,
                                        activation)
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads,
                                       causal=True, activation=activation)
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(1 / 0.07).log())
        # OpenAI's initialisation: what the tiny world trains from scratch (load() replaces it)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=transformer_width ** -0.5)
        for tower in (self.transformer, self.visual.transformer):
            for block in tower.resblocks:
                attn, mlp, width = block.attn, block.mlp, block.ln_1.weight.shape[0]
                proj_std = width ** -0.5 * (2 * len(tower.resblocks)) ** -0.5
                for linear, std in [(attn.q_proj, width ** -0.5), (attn.k_proj, width ** -0.5),
                                    (attn.v_proj, width ** -0.5), (attn.out_proj, proj_std),
                                    (mlp.c_fc, (2 * width) ** -0.5), (mlp.c_proj, proj_std)]:
                    nn.init.normal_(linear.weight, std=std)
                    nn.init.zeros_(linear.bias)

    def encode_image(self, images):  # (B, 3, R, R) normalised -> (B, E)
        return self.visual(images)

    def encode_text(self, tokens):  # (N, L) -> (N, E)
        eot = tokens.argmax(dim=-1)  # (N,) the end token has the largest id
        # the mask is causal, so nothing after the last end token can change a feature: drop it
        tokens = tokens[:, :int(eot.max()) + 1]  # (N, L')
        x = self.token_embedding(tokens) + self.positional_embedding[:tokens.shape[1]]  # (N, L', D)
        x = self.ln_final(self.transformer(x))
        return x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection  # (N, E)

    def forward(self, images, tokens):  # (B, N) image-to-text logits: exp(logit_scale) * cosine
        image_features = F.normalize(self.encode_image(images), dim=-1)  # (B, E)
        text_features = F.normalize(self.encode_text(tokens), dim=-1)  # (N, E)
        return self.logit_scale.exp() * image_features @ text_features.T


# --- named configurations, building from a state dict, loading OpenAI's weights
CONFIGS = {  # ViT-B/16: 149,620,737 parameters; tiny: the tiny world's CLIP, 32 px images
    "ViT-B/16": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                     vision_patch_size=16, context_length=77, vocab_size=49408,
                     transformer_width=512, transformer_heads=8, transformer_layers=12),
    # widths are multiples of 64: build_model infers heads = width / 64, so a saved one reloads
    "tiny": dict(embed_dim=64, image_resolution=32, vision_layers=3, vision_width=128,
                 vision_patch_size=4, context_length=77, vocab_size=49408, transformer_width=128,
                 transformer_heads=2, transformer_layers=3)}
MODELS = {  # OpenAI's ViT checkpoints; the second-last segment of each URL is the file's sha256
    name: f"https://openaipublic.azureedge.net/clip/models/{sha}/{regex.sub('[/@]', '-', name)}.pt"
    for name, sha in [
        ("ViT-B/32", "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af"),
        ("ViT-B/16", "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f"),
        ("ViT-L/14", "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836"),
        ("ViT-L/14@336px", "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02")]}


class CLIPLoadError(Exception):
    """Weights could not be loaded; the message is one line that says what to do."""


def unpacked(sd):  # OpenAI's and open_clip's keys -> ours: their attention packs [q; k; v] in one
    sd = dict(sd)
    for key in [k for k in sd if ".attn.in_proj_" in k]:
        prefix, kind = key.split(".in_proj_")
        for name, part in zip(("q_proj", "k_proj", "v_proj"), sd.pop(key).chunk(3)):
            sd[f"{prefix}.{name}.{kind}"] = part
    return sd


def packed(sd):  # ours -> OpenAI's keys, the inverse of unpacked
    sd = dict(sd)
    for key in [k for k in sd if ".attn.q_proj." in k]:
        prefix, kind = key.split(".q_proj.")
        sd[f"{prefix}.in_proj_{kind}"] = torch.cat([sd.pop(f"{prefix}.{n}_proj.{kind}")
                                                    for n in "qkv"])
    return sd


def shapes(sd):  # CLIP's arguments read off a state dict in our keys (GELU if it holds `uses_gelu`)
    def blocks(prefix):  # how many residual blocks sd has under prefix
        return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})
    width, _, patch, _ = sd["visual.conv1.weight"].shape
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = sd["ln_final.weight"].shape[0]
    return dict(embed_dim=sd["text_projection"].shape[1], image_resolution=patch * grid,
                vision_layers=blocks("visual.transformer.resblocks."), vision_width=width,
                vision_patch_size=patch, context_length=sd["positional_embedding"].shape[0],
                vocab_size=sd["token_embedding.weight"].shape[0], transformer_width=text_width,
                transformer_heads=max(1, text_width // 64),
                transformer_layers=blocks("transformer.resblocks."),
                activation="gelu" if "uses_gelu" in sd else "quick_gelu")


def build_model(state_dict):
    """A CLIP sized by (shapes) and holding an OpenAI state dict (packed q/k/v) or ours."""
    sd = unpacked({k: v for k, v in state_dict.items()
                   if k not in ("input_resolution", "context_length", "vocab_size")})
    try:
        model = CLIP(**shapes(sd))
        model.load_state_dict(sd)
    except (KeyError, ValueError, RuntimeError) as e:  # a missing key, a size mismatch
        detail = f"missing key {e}" if isinstance(e, KeyError) else " ".join(str(e).split())
        detail = detail.replace("Error(s) in loading state_dict for CLIP: ", "") or type(e).__name__
        raise CLIPLoadError(f"not a CLIP ViT state dict ({detail[:160]}); pass OpenAI's ViT "
                            f"({', '.join(MODELS)}; no ResNet) or one this project saved") from None
    return model


@contextlib.contextmanager
def atomic(path):
    """Yield a name beside `path`, renamed to it once the block succeeds: no half-written files.
    The name holds machine and process: two writers, even on two machines, never share one."""
    mine = f"{path}.{os.uname().nodename}-"
    for stale in glob.glob(glob.escape(mine) + "*.tmp"):  # of this machine: is its writer gone?
        try:
            os.kill(int(stale[len(mine):-4]), 0)
        except ProcessLookupError:  # killed: remove what it left, unless another writer did
            with contextlib.suppress(FileNotFoundError):
                os.remove(stale)
        except (ValueError, PermissionError):  # a machine whose name extends this one's; alive
            pass
    tmp = f"{mine}{os.getpid()}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _download(url, root):
    """The file of `url` in `root`, downloaded unless there already with the sha256 it names."""
    def sha256(path):
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    expected, path = url.split("/")[-2], os.path.join(root, os.path.basename(url))
    if os.path.isfile(path) and sha256(path) == expected:
        return path
    os.makedirs(root, exist_ok=True)
    try:
        with atomic(path) as tmp:
            with open(tmp, "wb") as f, urllib.request.urlopen(url, timeout=60) as response:
                shutil.copyfileobj(response, f, 1 << 20)
            if sha256(tmp) != expected:  # a corrupt transfer fails like a cut one
                raise OSError(f"its sha256 is not {expected[:12]}...")
    except (OSError, http.client.HTTPException) as e:  # offline, timeouts, a cut, a full disk
        reason = str(getattr(e, "reason", e)).replace("\n", " ")
        raise CLIPLoadError(f"could not download {url} ({reason}); check the connection and "
                            f"retry, or download it by hand to {path}") from None
    return path


def read_file(path):
    """The state dict in a weight file: OpenAI's TorchScript archive, a bare state dict, this
    project's checkpoint.pt ({"model": sd}) or the tiny world's file ({"state_dict": sd})."""
    try:
        # NOTE: torch deprecates TorchScript; OpenAI's files are it
        with warnings.catch_warnings(action="ignore", category=FutureWarning):
            sd = torch.jit.load(path, map_location="cpu").state_dict()
    except RuntimeError:  # not a TorchScript archive: a state dict, or a dict holding one
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # NOTE: torch's message is many lines; its type says enough
            raise CLIPLoadError(f"{path} is not a weight file (neither TorchScript nor a state "
                                f"dict: {type(e).__name__}); pass checkpoint.pt or a weight file, "
                                "or delete a download cut short to fetch it again") from None
    for key in ("model", "state_dict"):
        sd = sd[key] if isinstance(sd, dict) and isinstance(sd.get(key), dict) else sd
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CLIPLoadError(f"{path} holds no state dict (dict of tensors); pass a CLIP checkpoint")
    return sd


# --- other tools' formats: transformers' CLIPModel folders, open_clip's (OpenAI's keys, packed)
HF_KEYS = [  # (ours, transformers') prefixes of a name, read both ways; {i}: a block's index
    ("visual.conv1", "vision_model.embeddings.patch_embedding"),
    ("visual.class_embedding", "vision_model.embeddings.class_embedding"),
    ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
    ("visual.ln_pre", "vision_model.pre_layrnorm"),  # sic
    ("visual.ln_post", "vision_model.post_layernorm"),
    ("visual.proj", "visual_projection.weight"),  # transposed, as is text_projection
    ("token_embedding", "text_model.embeddings.token_embedding"),
    ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
    ("ln_final", "text_model.final_layer_norm"),
    ("text_projection", "text_projection.weight"),
    ("logit_scale", "logit_scale"),
    *[(f"{ours}.resblocks.{{i}}.{a}", f"{theirs}.encoder.layers.{{i}}.{b}")
      for ours, theirs in (("visual.transformer", "vision_model"), ("transformer", "text_model"))
      for a, b in (("attn", "self_attn"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                   ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"))]]
HF_TRANSPOSED = ("visual.proj", "text_projection")  # ours (D, E); an nn.Linear's weight (E, D)
FILES = {"hf": ("config.json", "model.safetensors", "pytorch_model.bin"),  # config, weights
         "open_clip": ("open_clip_config.json", "open_clip_model.safetensors",
                       "open_clip_pytorch_model.bin")}


def rename(key, table, reverse=False):
    """key renamed by the entry of table that names it (reverse: theirs -> ours), else None."""
    for ours, theirs in table:
        src, dst = (theirs, ours) if reverse else (ours, theirs)
        pattern = regex.escape(src).replace(r"\{i\}", r"(?P<i>\d+)") + r"(?P<tail>\..+)?"
        if m := regex.fullmatch(pattern, key):
            return dst.format(i=m.groupdict().get("i")) + (m["tail"] or "")
    return None


def read_folder(folder):
    """Our state dict of a transformers CLIPModel folder or an open_clip one, holding `uses_gelu`
    when its config names GELU; its safetensors file when that optional package is installed."""
    fmt = next((f for f, names in FILES.items() if os.path.isfile(f"{folder}/{names[0]}")), None)
    if fmt is None:
        raise CLIPLoadError(f"{folder} holds neither config.json (transformers) nor "
                            "open_clip_config.json (open_clip); pass a CLIP model's folder")
    config, st, pt = (os.path.join(folder, name) for name in FILES[fmt])
    try:
        with open(config) as f:
            cfg = json.load(f)
        if fmt == "hf" and cfg.get("model_type") != "clip":  # a BERT's, a ViT's
            raise CLIPLoadError(f"{config}: model_type {cfg.get('model_type')}, not clip; pass a "
                                "CLIP model's folder")
        if fmt == "hf":  # transformers' defaults: QuickGELU
            towers = [cfg["text_config"], cfg["vision_config"]]
            heads = [t["hidden_size"] / t["num_attention_heads"] for t in towers]
            activation = "/".join(sorted({t.get("hidden_act", "quick_gelu") for t in towers}))
        else:  # open_clip's: GELU, 64-wide heads, 8 text heads of 512
            text, vision = cfg["model_cfg"]["text_cfg"], cfg["model_cfg"]["vision_cfg"]
            heads = [text.get("width", 512) / text.get("heads", 8), vision.get("head_width", 64)]
            activation = "quick_gelu" if cfg["model_cfg"].get("quick_gelu") else "gelu"
    except (OSError, ValueError, KeyError, TypeError) as e:  # unreadable JSON, a missing entry
        raise CLIPLoadError(f"{config} is unreadable ({type(e).__name__} {e}); pass a folder "
                            "saved by transformers or open_clip") from None
    if activation not in ACTIVATIONS or heads != [64, 64]:
        raise CLIPLoadError(f"{folder}: activation {activation}, heads {heads} wide; this CLIP has "
                            f"one of {', '.join(ACTIVATIONS)} and 64-wide heads (OpenAI's layout)")
    if not os.path.isfile(st) and not os.path.isfile(pt):
        raise CLIPLoadError(f"{folder} holds neither {os.path.basename(st)} nor "
                            f"{os.path.basename(pt)}; pass a folder that holds its weights")
    try:  # safetensors is optional, as transformers and open_clip are
        from safetensors.torch import load_file
        sd = load_file(st) if os.path.isfile(st) else read_file(pt)
    except ImportError:
        if not os.path.isfile(pt):
            raise CLIPLoadError(f"{st} needs safetensors: pip install safetensors") from None
        sd = read_file(pt)
    if fmt == "hf":  # older files hold position_ids (0, 1, 2, ...), not a weight
        sd = {rename(k, HF_KEYS, reverse=True) or k: v for k, v in sd.items()
              if not k.endswith("position_ids")}
        sd = {k: v.T if k in HF_TRANSPOSED else v for k, v in sd.items()}
    return {**sd, "uses_gelu": torch.ones(())} if activation == "gelu" else sd


def load(name_or_path, device="cpu", download_root=None):
    """An fp32 CLIP in eval mode from an OpenAI model name (downloaded once into download_root,
    $CLIP_CACHE or ~/.cache/clip, where openai/CLIP keeps them too), a weight file (NOTE: a bare
    state dict is read as OpenAI's, with QuickGELU), a transformers or open_clip folder, or
    hf-hub:<id> of such a folder in the local Hugging Face cache."""
    path = name_or_path
    if name_or_path in MODELS:
        root = download_root or os.environ.get("CLIP_CACHE") or os.path.expanduser("~/.cache/clip")
        path = _download(MODELS[name_or_path], root)
    elif path.startswith("hf-hub:"):  # laid out as huggingface_hub does; no network, no package
        if not (repo_id := path[len("hf-hub:"):]):
            raise CLIPLoadError("hf-hub: needs an id, e.g. hf-hub:openai/clip-vit-base-patch16")
        hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
            os.environ.get("HF_HOME") or os.path.expanduser("~/.cache/huggingface"), "hub")
        repo = os.path.join(hub, "models--" + repo_id.replace("/", "--"))
        try:  # refs/main names the snapshot, which a download cut short may lack
            with open(os.path.join(repo, "refs", "main")) as f:
                path = os.path.join(repo, "snapshots", f.read().strip())
            os.listdir(path)
        except OSError:
            raise CLIPLoadError(f"hf-hub:{repo_id} is not in the Hugging Face cache, or only in "
                                f"part (in {repo}): hf download {repo_id} fetches it") from None
    if not os.path.exists(path):
        raise CLIPLoadError(f"{path!r} is neither a model name ({', '.join(MODELS)}) nor a file "
                            "or folder; pass one of those names, hf-hub:<id>, or a path")
    sd = read_folder(path) if os.path.isdir(path) else read_file(path)
    return build_model(sd).float().to(device).eval()  # fp32: Adam on OpenAI's fp16 gives NaN


def export(model, folder, format):
    """A plain CLIP (codyra.merge first) as a folder transformers' CLIPModel.from_pretrained ("hf")
    or open_clip.create_model("local-dir:<folder>") reads; weights in torch's format, no package."""
    if format not in FILES:
        raise ValueError(f"export format {format!r}: expected {' or '.join(FILES)}")
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    if any("lora_" in k for k in sd):
        raise ValueError("the model still has adapters: merge them first (codyra.merge)")
    c = shapes(sd)
    sd.pop("uses_gelu", None)
    if format == "hf":
        def tower(side, **more):  # heads 64 wide, as OpenAI's
            width = c[f"{side}_width"]
            return dict(hidden_size=width, num_hidden_layers=c[f"{side}_layers"], **more,
                        num_attention_heads=width // 64, hidden_act=c["activation"],
                        intermediate_size=4 * width, projection_dim=c["embed_dim"])
        config = {"architectures": ["CLIPModel"], "model_type": "clip",
                  "projection_dim": c["embed_dim"],
                  "text_config": tower("transformer", vocab_size=c["vocab_size"],
                                       max_position_embeddings=c["context_length"]),
                  "vision_config": tower("vision", image_size=c["image_resolution"],
                                         patch_size=c["vision_patch_size"])}
        sd = {rename(k, HF_KEYS): v.T if k in HF_TRANSPOSED else v for k, v in sd.items()}
    else:
        text = dict(width=c["transformer_width"], heads=c["transformer_heads"],
                    layers=c["transformer_layers"], context_length=c["context_length"],
                    vocab_size=c["vocab_size"])
        vision = dict(width=c["vision_width"], layers=c["vision_layers"],
                      image_size=c["image_resolution"], patch_size=c["vision_patch_size"])
        config = {"model_cfg": {"embed_dim": c["embed_dim"], "text_cfg": text, "vision_cfg": vision,
                                "quick_gelu": c["activation"] == "quick_gelu"},
                  "preprocess_cfg": {"mean": MEAN, "std": STD}}
        sd = packed(sd)
    os.makedirs(folder, exist_ok=True)
    config_file, stale, weights = (os.path.join(folder, name) for name in FILES[format])
    with atomic(config_file) as tmp, open(tmp, "w") as f:
        json.dump(config, f, indent=2)
    with atomic(weights) as tmp:
        torch.save(sd, tmp)
    if os.path.exists(stale):  # NOTE: both tools would read it first
        os.remove(stale)
    return folder
