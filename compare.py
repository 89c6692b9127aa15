"""Run train.py for several methods and seeds on one setting and print one table: mean and
standard deviation of Transfer, Average, Last, the accuracy right after learning each task, the
forgetting since, the held-out datasets' accuracy at the end and the ranks CoDyRA kept, with the
zero-shot row above and each method's routed second rows (train.py --routing) below it; then
each dataset's zero-shot, right-after-learning and final accuracy. A finished run
(--out/<method>-seed<seed>) is read, an interrupted one resumed: stop and start it at will.

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
    if not values or None in values:  # Transfer or forgetting of a single task
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0
    return f"{statistics.mean(values):5.1f} ± {spread:3.1f}"


def learned(acc):
    """Mean accuracy on each task right after learning it: the diagonal (plasticity)."""
    return statistics.mean(acc[t][t] for t in range(len(acc)))


def forgetting(acc):
    """Mean drop from right after learning a task to the end of the sequence (all but the last)."""
    return statistics.mean(acc[t][t] - acc[-1][t] for t in range(len(acc) - 1)) if acc[1:] else None


def row(label, cells, kept=""):
    return f"{label:<10}" + "".join(f"{c:>14}" for c in cells) + f"{kept:>16}"


def held_out(runs, key="last"):  # mean accuracy on the datasets never trained (Table 4)
    values = [statistics.mean(r["holdout"][key]) for r in runs if r.get("holdout", {}).get(key)]
    return mean_std(values) if values else "-"


def cells(matrices, metrics):  # Transfer, Average, Last, learned, forgetting over the seeds
    means = [mean_std([m[k]["mean"] for m in metrics]) for k in ("transfer", "average", "last")]
    return means + [mean_std([fn(acc) for acc in matrices]) for fn in (learned, forgetting)]


print(f"\n{args.setting}: mean ± std over seeds {args.seeds} (accuracy %)")
print(row("method", ("Transfer", "Average", "Last", "learned", "forgetting", "held-out"),
          "ranks kept") + "  used/task")  # parameters a task's update uses (Table 7)
first = results[methods[0], seeds[0]]
if "zero_shot" in first:  # the pretrained model, the same in every run: as if it were every row
    zero = [first["zero_shot"]] * len(first["datasets"])
    values = cells([zero], [first["zero_shot_metrics"]])[:4] + ["-", held_out([first], "zero_shot")]
    print(row("zero-shot", [v.replace(" ± 0.0", " " * 6) for v in values]))  # one model: no spread
routers = sorted({name for r in results.values() for name in r.get("routed", {})})
for method in methods:
    runs = [results[method, s] for s in seeds]
    ranks = [a["ranks"]["mean"] for r in runs for a in r["analysis"] if a.get("ranks")]
    kept = f"{statistics.mean(ranks):.1f} of {runs[0]['args']['rank']}" if ranks else "-"
    used = statistics.mean(a["used_parameters"] for r in runs for a in r["analysis"]) / 1e6
    print(row(method, cells([r["acc"] for r in runs], [r["metrics"] for r in runs])
              + [held_out(runs)], kept) + f"{used:9.3f}M")
    for name in routers:  # the second rows: each test image to the model of its routed domain
        routed = [r["routed"][name] for r in runs if name in r.get("routed", {})]
        if routed:
            print(row(f" + {name}", cells([x["acc"] for x in routed],
                                          [x["metrics"] for x in routed])))
for name in (n for n in routers if n != "oracle"):  # how often the router was right
    summaries = [r["routed"][name]["routing_summary"] for r in results.values()
                 if name in r.get("routed", {})]
    unseen = [x["unseen"] for x in summaries if x["unseen"] is not None]
    seen = mean_std([x["seen"] for x in summaries])
    print(f"{name} routing, all runs: seen domains routed right {seen} %, unseen ones recognised "
          f"{mean_std(unseen) if unseen else '-'} %")

print("\nper dataset: zero-shot, then each method's accuracy right after learning it -> at the end")
print(f"{'':<10}{'zero-shot':>10}" + "".join(f"{m:>22}" for m in methods))
for j, name in enumerate(first["datasets"]):
    line = []
    for runs in ([results[m, s] for s in seeds] for m in methods):
        end = statistics.mean(r["acc"][-1][j] for r in runs)
        line.append(f"{mean_std([r['acc'][j][j] for r in runs])} -> {end:4.1f}")
    zero = f"{first['zero_shot'][j]:.1f}" if "zero_shot" in first else "-"
    print(f"{name[:9]:<10}{zero:>10}" + "".join(f"{c:>22}" for c in line))
for j, name in enumerate(first.get("holdout", {}).get("datasets", [])):  # never trained
    zero = f"{first['holdout']['zero_shot'][j]:.1f}" if "zero_shot" in first["holdout"] else "-"
    ends = [statistics.mean(results[m, s]["holdout"]["last"][j] for s in seeds) for m in methods]
    line = [f"(held out) -> {end:4.1f}" for end in ends]
    print(f"{name[:9]:<10}{zero:>10}" + "".join(f"{c:>22}" for c in line))
