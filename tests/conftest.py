"""Shared by the tests in this folder: the project root on sys.path, and one tiny CLIP."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import clip_model  # noqa: E402


def make_tiny_clip(seed=0):
    """A random CLIP of the tiny world's shape (clip_model.CONFIGS["tiny"]), in eval mode."""
    torch.manual_seed(seed)
    return clip_model.CLIP(**clip_model.CONFIGS["tiny"]).eval()


@pytest.fixture
def tiny_clip():
    return make_tiny_clip()


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """The path of a saved random tiny CLIP: stands in for pretrained weights in script tests."""
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.save(make_tiny_clip().state_dict(), path)
    return str(path)
