"""Run train.py for several methods and seeds on one setting; print the mean and standard deviation
of every metric (zero-shot row above, train.py --routing's rows below), each dataset's accuracy, the
operating point beside the paper's. A finished run (--out/<method>-seed<seed>) is read, an
interrupted one resumed: stop it at will. Each run's output goes to train.log in its folder.

    python compare.py                                  # tiny world: codyra, lora, full x seeds 0-2
    python compare.py --setting xtail --data-dir ~/data --devices cuda:0,cuda:1 -- --iterations 500
"""
import argparse
import importlib.util
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time

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
p.add_argument("--devices", help="run one train.py per device at once, e.g. cuda:0,cuda:1 or "
               "cpu,cpu, each with its share of the cores (default: one run at a time)")
p.add_argument("--commands", action="store_true", help="print the train.py command of each run "
               "not finished, one a line, and start none (for a cluster: docs/sweeps.md)")
p.add_argument("extra", nargs="*", help="arguments for every train.py run, after --")
args = p.parse_args()
methods, seeds = args.methods.split(","), args.seeds.split(",")
if not set(methods) <= {"codyra", "lora", "full"} or len(set(methods)) < len(methods):
    p.error(f"--methods {args.methods}: choose distinct ones among codyra, lora, full")
if not all(s.isdigit() for s in seeds):
    p.error(f"--seeds {args.seeds}: expected comma-separated whole numbers >= 0, like 0,1,2")
seeds, devices = [int(s) for s in seeds], (args.devices or "").split(",")  # "": train.py's own
own = {"--method": "--methods", "--seed": "--seeds", "--out": "--out", "--resume": "--out",
       "--overwrite": "--out", "--setting": "--setting", "--data-dir": "--data-dir",
       **({"--device": "--devices"} if args.devices else {})}  # what names or places a run
for a in (a.split("=")[0] for a in args.extra if a.startswith("--") and len(a) > 2):
    if flag := next((f for f in own if f.startswith(a)), None):  # train.py takes --meth too
        p.error(f"{a} after --: compare.py sets {flag} of each run; use its own {own[flag]}")
folder = os.path.dirname(os.path.abspath(args.plot or "."))  # checked now, not after the runs
if args.plot and (os.path.isdir(args.plot) or not os.access(folder, os.W_OK)):
    p.error(f"--plot {args.plot}: cannot write a file there; create its folder or choose another")
if args.plot and importlib.util.find_spec("matplotlib") is None:
    p.error("--plot needs matplotlib: pip install matplotlib")


def results(method, seed):  # a run's results.json ({} before it starts)
    path = os.path.join(args.out, f"{method}-seed{seed}", "results.json")
    return json.load(open(path)) if os.path.exists(path) else {}


share = str(max(1, (os.cpu_count() or 1) // len(devices)))  # a run's cores: threads, --workers
todo = []  # (run, its folder, its train.py command) of each run not finished
for method, seed in [(m, s) for m in methods for s in seeds if "metrics" not in results(m, s)]:
    out = os.path.join(args.out, f"{method}-seed{seed}")
    todo.append((f"{method} seed {seed}", out, [
        sys.executable, os.path.join(os.path.dirname(__file__), "train.py"), "--setting",
        args.setting, "--data-dir", args.data_dir, "--method", method, "--seed", str(seed), "--out",
        out, "--resume" if os.path.exists(f"{out}/checkpoint.pt") else "--overwrite",
        *["--workers", share] * bool(args.devices), *args.extra]))  # a --workers there wins
if args.commands:  # for a cluster's scheduler: docs/sweeps.md
    sys.exit(print(*(shlex.join(cmd) for *_, cmd in todo), sep="\n") if todo else None)
# --- the runs, one a device at a time, each one's output in its train.log
env = {"OMP_NUM_THREADS": share, **os.environ} if args.devices else None  # a set one wins
running, failed = {}, 0  # process -> (run, command, log, device)
signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill`: as Ctrl-C
try:
    while todo or running:
        while todo and devices:  # the next run on a free device
            (run, out, cmd), device = todo.pop(0), devices.pop(0)
            cmd += ["--device", device] * bool(device)
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "train.log"), "a") as log:  # the run holds its own copy
                print(f"{time.strftime('%F %T')} $ {shlex.join(cmd)}", file=log, flush=True)
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
                running[proc] = run, cmd, log.name, device
            print(f"{time.strftime('%T')} started {run}{' on ' + device if device else ''}, "
                  f"output in {log.name}", flush=True)
        time.sleep(0.5)
        for proc in [q for q in running if q.poll() is not None]:  # finished or failed
            run, cmd, log, device = running.pop(proc)
            devices.append(device)
            why = proc.returncode and f"exit {proc.returncode}, {open(log).readlines()[-1]}"
            print(time.strftime("%T"), f"failed {run} ({why.strip()})\n  $ {shlex.join(cmd)}"
                  if why else f"finished {run}", flush=True)
            failed += bool(why)
except KeyboardInterrupt:  # the runs stop too, keeping their finished tasks (atomic writes)
    for proc in running:  # NOTE: SIGTERM, as a run started in the background ignores SIGINT
        proc.terminate()
        proc.wait()
    sys.exit("\ninterrupted: the same command resumes every unfinished run")
if failed:
    sys.exit(f"error: {failed} run(s) failed (above); the others are kept: fix it and rerun")
runs = {m: [results(m, s) for s in seeds] for m in methods}  # method -> each seed's results.json
first, every = runs[methods[0]][0], [r for m in methods for r in runs[m]]
T, held = len(first["datasets"]), first.get("holdout", {})  # tasks; the datasets never trained


def mean_std(values, sign=""):
    if not values or None in values:  # Transfer or forgetting of a single task
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0
    return f"{statistics.mean(values):{sign}5.1f} ± {spread:3.1f}"


def forgetting(acc):  # mean drop from right after learning a task to the end (all but the last)
    return statistics.mean(acc[t][t] - acc[-1][t] for t in range(len(acc) - 1)) if acc[1:] else None


def row(label, cells, kept=""):
    return f"{label:<10}" + "".join(f"{c:>14}" for c in cells) + f"{kept:>16}"


def held_out(rs, key="last"):  # mean accuracy on the datasets never trained (Table 4)
    return mean_std([statistics.mean(r["holdout"][key]) for r in rs
                     if r.get("holdout", {}).get(key)])


def cells(rs):  # Transfer, Average, Last, learned (the diagonal: plasticity), forgetting
    learned = [statistics.mean(r["acc"][t][t] for t in range(len(r["acc"]))) for r in rs]
    return [mean_std([r["metrics"][k]["mean"] for r in rs]) for k in ("transfer", "average", "last")
            ] + [mean_std(learned), mean_std([forgetting(r["acc"]) for r in rs])]


def per_seed(method, fn, tasks=False):  # fn of each seed's run (tasks: of its tasks', averaged)
    return [statistics.mean(map(fn, r["analysis"])) if tasks else fn(r)
            for r in runs.get(method, [])]


def ratio(a, b):  # CoDyRA's value over LoRA's, with both
    if not a or not b or None in a + b:  # a method not run; forgetting of a single task
        return "-"
    a, b = statistics.mean(a), statistics.mean(b)
    return f"{f'{a / b:.2f}' if b else '-'} ({a:.2f} / {b:.2f})"


print(f"\n{args.setting}: mean ± std over seeds {args.seeds} (accuracy %)")
print(row("method", ("Transfer", "Average", "Last", "learned", "forgetting", "held-out"),
          "ranks kept") + "  used/task")  # parameters a task's update uses (Table 7)
if "zero_shot" in first:  # the pretrained model, the same in every run: as if it were every row
    zero = {"acc": [first["zero_shot"]] * T, "metrics": first["zero_shot_metrics"]}
    values = cells([zero])[:4] + ["-", held_out([first], "zero_shot")]
    print(row("zero-shot", [v.replace(" ± 0.0", " " * 6) for v in values]))  # one model: no spread
routers = sorted({name for r in every for name in r.get("routed", {})})
for method in methods:
    ranks = [a["ranks"]["mean"] for r in runs[method] for a in r["analysis"] if a.get("ranks")]
    kept = f"{statistics.mean(ranks):.1f} of {runs[method][0]['args']['rank']}" if ranks else "-"
    used = statistics.mean(a["used_parameters"] for r in runs[method] for a in r["analysis"]) / 1e6
    print(row(method, cells(runs[method]) + [held_out(runs[method])], kept) + f"{used:9.3f}M")
    for name in routers:  # the second rows: each test image to the model of its routed domain
        if routed := [r["routed"][name] for r in runs[method] if name in r.get("routed", {})]:
            print(row(f" + {name}", cells(routed)))
for name in (n for n in routers if n != "oracle"):  # how often the router was right
    summaries = [r["routed"][name]["routing_summary"] for r in every if name in r.get("routed", {})]
    print(f"{name} routing, all runs: seen domains routed right "
          f"{mean_std([x['seen'] for x in summaries])} %, unseen ones recognised "
          f"{mean_std([x['unseen'] for x in summaries if x['unseen'] is not None])} %")
print("\nper dataset: zero-shot, then each method's accuracy right after learning it -> at the end")
print(f"{'':<10}{'zero-shot':>10}" + "".join(f"{m:>22}" for m in methods))
for j, name in enumerate(first["datasets"]):
    line = [f"{mean_std([r['acc'][j][j] for r in runs[m]])} -> "
            f"{statistics.mean(r['acc'][-1][j] for r in runs[m]):4.1f}" for m in methods]
    zero = f"{first['zero_shot'][j]:.1f}" if "zero_shot" in first else "-"
    print(f"{name[:9]:<10}{zero:>10}" + "".join(f"{c:>22}" for c in line))
for j, name in enumerate(held.get("datasets", [])):  # never trained
    line = [f"(held out) -> {statistics.mean(r['holdout']['last'][j] for r in runs[m]):4.1f}"
            for m in methods]
    zero = f"{held['zero_shot'][j]:.1f}" if "zero_shot" in held else "-"
    print(f"{name[:9]:<10}{zero:>10}" + "".join(f"{c:>22}" for c in line))
# --- the operating point: this run's statistics beside the paper's on X-TAIL (ViT-B/16): Table 1
# and the authors' project page; the ratios are what a miniature can hope to match
PAPER = {"ranks": 8.3, "update": {"codyra": 3.22, "lora": 7.44},
         "forgetting": {"codyra": 1.87, "lora": 14.86},
         "transfer": {"codyra": 63.2 - 62.4, "lora": 61.8 - 62.4},
         "last": {"codyra": 79.2 - 58.5, "lora": 59.4 - 58.5}}
stats = [("mean ranks kept of 16", f"{PAPER['ranks']}",
          mean_std(per_seed("codyra", lambda a: a["ranks"]["mean"], True)))]
for key, fn, tasks in (("update", lambda a: a["update"]["total"], True),
                       ("forgetting", lambda r: forgetting(r["acc"]), False)):
    label = "per-task ||dW||_F" if tasks else key  # the paper's CoDyRA / LoRA, then fn's
    stats.append((f"{label}, codyra / lora", ratio([PAPER[key]["codyra"]], [PAPER[key]["lora"]]),
                  ratio(*(per_seed(m, fn, tasks) for m in ("codyra", "lora")))))
stats += [(f"per-task ||dW||_F / ||W_pre||_F (%), {m}", "-", mean_std(per_seed(
    m, lambda a: 100 * (a["update"].get("relative") or float("nan")), True))) for m in methods]
for key, method in [(k, m) for k in ("transfer", "last") for m in methods if "zero_shot" in first]:
    zero, paper = first["zero_shot_metrics"][key]["mean"], PAPER[key].get(method)
    here = None if zero is None else [r["metrics"][key]["mean"] - zero for r in runs[method]]
    stats.append((f"{key.title()} minus zero-shot, {method}",  # None: Transfer of a single task
                  "-" if paper is None else f"{paper:+.1f}", mean_std(here, "+")))
print(f"\noperating point: the paper (X-TAIL, ViT-B/16) and this comparison ({args.setting}, "
      f"seeds {args.seeds})")
for label, paper, here in [("", "paper", "here")] + stats:
    print(f"{label:<44}{paper:>22}{here:>22}")
if args.plot:  # one panel per domain: its accuracy after every task, each method's band of seeds
    import matplotlib.pyplot as plt
    plt.switch_backend("Agg")  # files only, no display needed
    fig, axes = plt.subplots(1, T, figsize=(2.6 * T, 2.8), sharey=True, squeeze=False)
    steps = range(T + 1)  # 0: before the first task (zero-shot), t: after task t
    for j, (ax, name) in enumerate(zip(axes[0], first["datasets"])):
        for k, method in enumerate(methods):
            seeds_at = list(zip(*([r.get("zero_shot", r["acc"][0])[j]] + [a[j] for a in r["acc"]]
                                  for r in runs[method])))  # per step, the seeds' accuracies
            ax.plot(steps, [statistics.mean(c) for c in seeds_at], color=f"C{k}", label=method)
            ax.fill_between(steps, [min(c) for c in seeds_at], [max(c) for c in seeds_at],
                            color=f"C{k}", alpha=0.2, lw=0)
        if "zero_shot" in first:
            ax.axhline(first["zero_shot"][j], color="k", ls="--", lw=1, label="zero-shot")
        ax.axvspan(j + 0.5, j + 1.5, color="0.9", zorder=0)  # the task that learns this domain
        ax.set(title=name, xlabel="after task", xticks=steps)
    axes[0][0].set_ylabel("accuracy (%)")
    axes[0][-1].legend(fontsize=7)
    fig.savefig(args.plot, dpi=110, bbox_inches="tight")
    print(f"wrote {args.plot}")
