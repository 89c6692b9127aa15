"""Shared by the tests in this folder: the project root on sys.path, one small CLIP, and scripts
run in this process."""
import atexit
import contextlib
import gc
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback
import warnings
from unittest import mock

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
if "PYTEST_XDIST_WORKER" in os.environ:  # one thread a worker (and a script it starts): two on
    os.environ["OMP_NUM_THREADS"] = "1"  # two shared cores stall each other at every barrier
    torch.set_num_threads(1)
# the suite never reads or writes its user's caches or home: this process and every script it
# starts get a home of their own, removed at exit; CACHE, the test images of a session's scripts
HOME = tempfile.mkdtemp(prefix="codyra-tests-home-")
atexit.register(shutil.rmtree, HOME, ignore_errors=True)
os.environ.update(HOME=HOME, XDG_CACHE_HOME=os.path.join(HOME, ".cache"),
                  CLIP_CACHE=os.path.join(HOME, "clip"), HF_HOME=os.path.join(HOME, "hf"),
                  TORCH_HOME=os.path.join(HOME, "torch"), MPLCONFIGDIR=os.path.join(HOME, "mpl"))
CACHE = os.path.join(HOME, "eval-cache")

import clip_model  # noqa: E402
import data  # noqa: E402
import tiny_world  # noqa: E402

# "a CLIP" for the tests that need no particular shape: 16 px images in 8 px patches (5 tokens a
# picture against the tiny world's 65), two blocks per tower, 64 wide (a multiple of 64:
# build_model infers heads = width / 64, so a saved one reloads). The tests of the tiny world's
# own model keep clip_model.CONFIGS["tiny"].
SMALL = dict(clip_model.CONFIGS["tiny"], embed_dim=32, image_resolution=16, vision_layers=2,
             vision_width=64, vision_patch_size=8, transformer_width=64, transformer_heads=1,
             transformer_layers=2)


LONGEST = ["test_notebook", "test_compare", "test_train", "test_faults", "test_bench"]  # seconds


def pytest_collection_modifyitems(items):
    """The longest test files first, so that the workers finish together: xdist's own order (the
    most tests first) started the notebook's single 100 s test last, alone on one core."""
    rank = {name: i for i, name in enumerate(LONGEST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(LONGEST)))


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


_drawn, _generate = {}, tiny_world.generate  # (domain, per class, generator state) -> images


def draw_once(name, per_class, rng, train):
    """tiny_world.generate, each set drawn once a session: its images are a function of the
    generator's state, and drawing them costs seconds at every tiny run."""
    key = (name, per_class, repr(rng.bit_generator.state))
    if key not in _drawn:
        drawn = _generate(name, per_class, rng, train)
        _drawn[key] = drawn.images, drawn.labels
    return data.ImageSet(*_drawn[key], clip_model.preprocess(train, tiny_world.RES))


def run_script(script, *argv, cwd=ROOT):
    """`python <script> <argv>` in cwd, in this process: a CompletedProcess with
    the exit status, stdout and stderr (a traceback, warnings) that the command would give. A new
    interpreter spends seconds importing torch and torchvision; this one has them, and the tiny
    world's images (draw_once). Runs that are killed or interrupted keep a process of their own."""
    path, out, err = os.path.join(ROOT, script), io.StringIO(), io.StringIO()
    with open(path) as f:
        code = compile(f.read(), path, "exec")
    scope, status = {"__name__": "__main__", "__file__": path}, 0
    saved = sys.argv, os.getcwd(), signal.getsignal(signal.SIGINT)
    gc.collect()  # what earlier tests left open warns now, not in this script's stderr
    sys.argv = [path, *map(str, argv)]
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                warnings.catch_warnings(), mock.patch.object(tiny_world, "generate", draw_once):
            warnings.simplefilter("default")  # as a fresh interpreter shows them: on stderr
            warnings.showwarning = lambda *w: sys.stderr.write(warnings.formatwarning(*w[:4]))
            try:
                exec(code, scope)
            except SystemExit as e:  # sys.exit("error: ...") prints its text and exits with 1
                status = e.code if isinstance(e.code, int) or e.code is None else 1
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
            except Exception:  # noqa: BLE001  what the interpreter would print
                traceback.print_exc()
                status = 1
    finally:
        sys.argv = saved[0]
        os.chdir(saved[1])
        signal.signal(signal.SIGINT, saved[2])
        scope.clear()
        gc.collect()  # closes what the script left open: its --out lock above all
    return subprocess.CompletedProcess([script, *argv], status or 0, out.getvalue(),
                                       err.getvalue())
