"""Run train.py for several methods and seeds on one setting and print one table: mean and
standard deviation of Transfer, Average, Last, the accuracy right after learning each task, the
forgetting since, and the ranks CoDyRA kept. A finished run (--out/<method>-seed<seed>) is read,
an interrupted one resumed, so this can be stopped and started again.

    python compare.py                                  # tiny world: codyra, lora, full x seeds 0-2
    python compare.py --setting xtail --data-dir ~/data --seeds 8 -- --iterations 500
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

p = argparse.ArgumentParser(description="Run train.py for several methods and seeds, and print "
                                        "the mean and standard deviation of every metric.")
p.add_argument("--setting", default="tiny", help="setting passed to train.py")
p.add_argument("--data-dir", default="data", help="dataset folder passed to train.py")
p.add_argument("--methods", default="codyra,lora,full", help="comma-separated train.py methods")
p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
p.add_argument("--out", default="runs/compare", help="folder holding one subfolder per run")
p.add_argument("extra", nargs="*", help="arguments for every train.py run, after --")
args = p.parse_args()
methods, seeds = args.methods.split(","), [int(s) for s in args.seeds.split(",")]

results = {}
for method in methods:
    for seed in seeds:
        out = os.path.join(args.out, f"{method}-seed{seed}")
        path = os.path.join(out, "results.json")
        if not (os.path.exists(path) and "metrics" in json.load(open(path))):
            again = os.path.exists(os.path.join(out, "checkpoint.pt"))
            cmd = [sys.executable, "train.py", "--setting", args.setting, "--data-dir",
                   args.data_dir, "--method", method, "--seed", str(seed), "--out", out,
                   "--resume" if again else "--overwrite", *args.extra]
            print("$ " + " ".join(cmd[1:]), flush=True)
            if subprocess.run(cmd, cwd=os.path.dirname(os.path.abspath(__file__)),
                              stdout=subprocess.DEVNULL).returncode:
                sys.exit(f"error: {method} seed {seed} failed; rerun its command above to see why")
        results[method, seed] = json.load(open(path))


def mean_std(values):
    spread = statistics.stdev(values) if len(values) > 1 else 0
    return f"{statistics.mean(values):5.1f} ± {spread:3.1f}"


def learned(acc):
    """Mean accuracy on each task right after learning it: the diagonal (plasticity)."""
    return statistics.mean(acc[t][t] for t in range(len(acc)))


def forgetting(acc):
    """Mean drop from right after learning a task to the end of the sequence (all but the last)."""
    return statistics.mean(acc[t][t] - acc[-1][t] for t in range(len(acc) - 1))


def row(label, cells, kept=""):
    return f"{label:<10}" + "".join(f"{c:>14}" for c in cells) + f"{kept:>18}"


print(f"\n{args.setting}: mean ± std over seeds {args.seeds} (accuracy %)")
columns = ("Transfer", "Average", "Last", "learned", "forgetting")
print(row("method", columns, "mean rank kept"))
first = results[methods[0], seeds[0]]
if "zero_shot" in first:  # the pretrained model, the same in every run: as if it were every row
    zero = [first["zero_shot"]] * len(first["datasets"])
    print(row("zero-shot", [f"{first['zero_shot_metrics'][m]['mean']:5.1f}      "
                            for m in ("transfer", "average", "last")]
              + [f"{learned(zero):5.1f}      ", "-"]))
for method in methods:
    runs = [results[method, s] for s in seeds]
    cells = [mean_std([r["metrics"][m]["mean"] for r in runs])
             for m in ("transfer", "average", "last")]
    cells += [mean_std([fn(r["acc"]) for r in runs]) for fn in (learned, forgetting)]
    ranks = [a["ranks"]["mean"] for r in runs for a in r["analysis"] if a.get("ranks")]
    kept = f"{statistics.mean(ranks):.1f} of {runs[0]['args']['rank']}" if ranks else "-"
    print(row(method, cells, kept))

print("\nper dataset: zero-shot, then each method's accuracy right after learning it -> at the end")
print(f"{'':<10}{'zero-shot':>10}" + "".join(f"{m:>22}" for m in methods))
for j, name in enumerate(first["datasets"]):
    cells = []
    for runs in ([results[m, s] for s in seeds] for m in methods):
        end = statistics.mean(r["acc"][-1][j] for r in runs)
        cells.append(f"{mean_std([r['acc'][j][j] for r in runs])} -> {end:4.1f}")
    zero = f"{first['zero_shot'][j]:.1f}" if "zero_shot" in first else "-"
    print(f"{name[:9]:<10}{zero:>10}" + "".join(f"{c:>22}" for c in cells))
