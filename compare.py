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
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys

p = argparse.ArgumentParser(description="Run train.py for several methods and seeds, and print "
                                        "the mean and standard deviation of every metric.")
p.error = lambda message: p.exit(2, f"error: {message} (see --help)\n")  # one line
p.add_argument("--setting", default="tiny", help="setting passed to train.py")
p.add_argument("--data-dir", default="data", help="dataset folder passed to train.py")
p.add_argument("--methods", default="codyra,lora,full", help="comma-separated train.py methods")
p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
p.add_argument("--out", default="runs/compare", help="folder holding one subfolder per run")
p.add_argument("--plot", metavar="PNG", help="also draw each domain's accuracy after every task, "
               "one line per method (mean, min-max band over the seeds), into this file")
p.add_argument("extra", nargs="*", help="arguments for every train.py run, after --")
args = p.parse_args()
methods, seeds = args.methods.split(","), args.seeds.split(",")
if not set(methods) <= {"codyra", "lora", "full"} or len(set(methods)) < len(methods):
    p.error(f"--methods {args.methods}: choose distinct ones among codyra, lora, full")
if not all(s.isdigit() for s in seeds):
    p.error(f"--seeds {args.seeds}: expected comma-separated whole numbers >= 0, like 0,1,2")
seeds = [int(s) for s in seeds]
if args.plot and importlib.util.find_spec("matplotlib") is None:
    p.error("--plot needs matplotlib: pip install matplotlib")

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


def mean_std(values, sign=""):
    if not values or None in values:  # Transfer or forgetting of a single task
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0
    return f"{statistics.mean(values):{sign}5.1f} ± {spread:3.1f}"


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

# --- the operating point: this run's statistics beside the paper's on X-TAIL (ViT-B/16): Table 1
# and the authors' project page; the ratios are what a miniature can hope to match
PAPER = {"ranks": 8.3, "update": {"codyra": 3.22, "lora": 7.44},
         "forgetting": {"codyra": 1.87, "lora": 14.86},
         "transfer": {"codyra": 63.2 - 62.4, "lora": 61.8 - 62.4},
         "last": {"codyra": 79.2 - 58.5, "lora": 59.4 - 58.5}}


def per_seed(method, fn):  # fn(results) of each seed's run of a method
    return [fn(results[method, s]) for s in seeds] if method in methods else None


def task_mean(key):  # a per-task analysis value, averaged over the tasks of a run
    return lambda r: statistics.mean(key(a) for a in r["analysis"])


def ratio(a, b):  # CoDyRA's value over LoRA's, with both
    if a is None or b is None or None in a + b:  # forgetting of a single task
        return "-"
    a, b = statistics.mean(a), statistics.mean(b)
    return f"{f'{a / b:.2f}' if b else '-'} ({a:.2f} / {b:.2f})"


print(f"\noperating point: the paper (X-TAIL, ViT-B/16) and this comparison ({args.setting}, "
      f"seeds {args.seeds})")
print(f"{'':<44}{'paper':>22}{'here':>22}")
def codyra_over_lora(key, fn):  # (the paper's ratio of PAPER[key], this comparison's of fn)
    return (ratio([PAPER[key]["codyra"]], [PAPER[key]["lora"]]),
            ratio(*(per_seed(m, fn) for m in ("codyra", "lora"))))


stats = [("mean ranks kept of 16", f"{PAPER['ranks']}",
          mean_std(per_seed("codyra", task_mean(lambda a: a["ranks"]["mean"])) or [None])),
         ("per-task ||dW||_F, codyra / lora",
          *codyra_over_lora("update", task_mean(lambda a: a["update"]["total"]))),
         ("forgetting, codyra / lora",
          *codyra_over_lora("forgetting", lambda r: forgetting(r["acc"])))]
for method in methods:
    stats.append((f"per-task ||dW||_F / ||W_pre||_F (%), {method}", "-", mean_std(
        per_seed(method, task_mean(lambda a: 100 * (a["update"].get("relative") or math.nan))))))
for key, label in (("transfer", "Transfer"), ("last", "Last")):
    for method in methods if "zero_shot" in first else ():
        zero, paper = first["zero_shot_metrics"][key]["mean"], PAPER[key].get(method)
        here = per_seed(method, lambda r: r["metrics"][key]["mean"])
        stats.append((f"{label} minus zero-shot, {method}", "-" if paper is None else
                      f"{paper:+.1f}", "-" if zero is None else  # Transfer of a single task
                      mean_std([x - zero for x in here], "+")))
for label, paper, here in stats:
    print(f"{label:<44}{paper:>22}{here:>22}")

if args.plot:  # one panel per domain: its accuracy after every task, each method's band of seeds
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    names = first["datasets"]
    fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names), 2.8), sharey=True,
                             squeeze=False)
    steps = range(len(names) + 1)  # 0: before the first task (zero-shot), t: after task t
    for j, (ax, name) in enumerate(zip(axes[0], names)):
        for k, method in enumerate(methods):
            curves = [[r.get("zero_shot", r["acc"][0])[j]] + [row[j] for row in r["acc"]]
                      for r in (results[method, s] for s in seeds)]
            ax.plot(steps, [statistics.mean(c) for c in zip(*curves)], color=f"C{k}",
                    label=method)
            ax.fill_between(steps, [min(c) for c in zip(*curves)], [max(c) for c in zip(*curves)],
                            color=f"C{k}", alpha=0.2, lw=0)
        if "zero_shot" in first:
            ax.axhline(first["zero_shot"][j], color="k", ls="--", lw=1, label="zero-shot")
        ax.axvspan(j + 0.5, j + 1.5, color="0.9", zorder=0)  # the task that learns this domain
        ax.set_xticks(list(steps), ["0"] + [str(t) for t in steps[1:]])
        ax.set(title=name, xlabel="after task")
    axes[0][0].set_ylabel("accuracy (%)")
    axes[0][-1].legend(fontsize=7)
    fig.savefig(args.plot, dpi=110, bbox_inches="tight")
    print(f"wrote {args.plot}")
