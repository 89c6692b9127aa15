"""Shared by the tests in this folder: the project root on sys.path, and one small CLIP."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import clip_model  # noqa: E402

# "a CLIP" for the tests that need no particular shape: 16 px images in 8 px patches (5 tokens a
# picture against the tiny world's 65), two blocks per tower, 64 wide (a multiple of 64:
# build_model infers heads = width / 64, so a saved one reloads). The tests of the tiny world's
# own model keep clip_model.CONFIGS["tiny"].
SMALL = dict(clip_model.CONFIGS["tiny"], embed_dim=32, image_resolution=16, vision_layers=2,
             vision_width=64, vision_patch_size=8, transformer_width=64, transformer_heads=1,
             transformer_layers=2)


def make_small_clip(seed=0):
    """A random CLIP of the SMALL shape, in eval mode."""
    torch.manual_seed(seed)
    return clip_model.CLIP(**SMALL).eval()


@pytest.fixture
def small_clip():
    return make_small_clip()


@pytest.fixture(scope="session")
def small_weights(tmp_path_factory):
    """The path of a saved random small CLIP: stands in for pretrained weights in script tests."""
    path = tmp_path_factory.mktemp("weights") / "small.pt"
    torch.save(make_small_clip().state_dict(), path)
    return str(path)
