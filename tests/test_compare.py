"""compare.py: choices refused before any run; the table, the operating point and the figure."""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def compare(*argv):
    return subprocess.run([sys.executable, os.path.join(HERE, "compare.py"), *argv], cwd=HERE,
                          capture_output=True, text=True, timeout=600)


def test_a_method_it_cannot_run_is_refused_before_any_run(tmp_path):
    """--methods foo and --seeds x give one line and start no train.py."""
    for flags in (["--methods", "codyra,foo"], ["--seeds", "0,x"]):
        out = compare(*flags, "--out", str(tmp_path))
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and "error:" in out.stderr
        assert not os.listdir(tmp_path)


def test_two_methods_print_the_operating_point_and_plot(small_weights, tmp_path):
    """Two tiny runs: the side-by-side with the paper's statistics and a PNG figure."""
    png = tmp_path / "curves.png"
    out = compare("--methods", "codyra,lora", "--seeds", "0", "--out", str(tmp_path),
                  "--plot", str(png), "--", "--model", small_weights, "--datasets",
                  "shapes,digits", "--iterations", "4", "--batch-size", "4", "--rank", "2",
                  "--workers", "0", "--holdout", "none", "--routing", "none")
    assert out.returncode == 0, out.stderr
    lines = {line[:44].strip(): line[44:].split() for line in out.stdout.splitlines()}
    assert lines["mean ranks kept of 16"][0] == "8.3"
    assert lines["forgetting, codyra / lora"][:4] == ["0.13", "(1.87", "/", "14.86)"]
    assert lines["Last minus zero-shot, codyra"][0] == "+20.7"
    assert lines["per-task ||dW||_F, codyra / lora"][-1] != "-"  # measured here
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_single_task_prints_dashes_for_what_it_lacks(small_weights, tmp_path):
    """One task has no Transfer and no forgetting: '-' there, the table still ends (was a crash)."""
    out = compare("--methods", "codyra", "--seeds", "0", "--out", str(tmp_path), "--",
                  "--model", small_weights, "--datasets", "shapes", "--iterations", "2",
                  "--batch-size", "4", "--rank", "2", "--workers", "0", "--holdout", "none",
                  "--routing", "none")
    assert out.returncode == 0, out.stderr
    lines = {line[:44].strip(): line[44:].split() for line in out.stdout.splitlines()}
    assert lines["Transfer minus zero-shot, codyra"] == ["+0.8", "-"]
    assert lines["forgetting, codyra / lora"][-1] == "-"
