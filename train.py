"""Continual learning of CLIP with CoDyRA: learn each task of a setting in turn, merge the
surviving ranks into the weights, evaluate on every dataset, print the paper's tables.
`python train.py`: the offline tiny world (CPU, minutes); the paper's runs: README.md, --help."""
import copy
import json
import math
import os
import pathlib
import signal
import sys
import time

import torch

import analysis
import clip_model
import codyra
import data
import eval as evaluation
import loop
import rail
import routing

RUNTIME_FLAGS = {"resume", "overwrite", "device", "workers", "cache_dir", "plot", "out",
                 "data_dir", "eval_batch_size", "no_zero_shot"}  # the rest define the run
recipe_help = {key: "default: the setting's, " + ", ".join(  # as data.RECIPES states them
    f"{r[key]} {s}" for s, r in data.RECIPES.items()) for key in data.RECIPES["tiny"]}
p, groups = evaluation.parser("CoDyRA: learn a setting's tasks in turn, print the paper's tables.")
groups["data"].add_argument("--shots", type=int, help="images per class; " + recipe_help["shots"])
group = p.add_argument_group("adapter")
group.add_argument("--method", choices=["codyra", "lora", "full", "frozen"], default="codyra",
                   help="codyra: LoRA + rank selection; lora: without; full; frozen: --head alone")
group.add_argument("--rank", type=int, default=16, help="LoRA rank r per adapted matrix")
group.add_argument("--encoders", choices=["vision", "text", "both"], default="both",
                   help="encoders to adapt")
group.add_argument("--layers", default="q,k,v,out,c_fc,c_proj", help="linear types to adapt")
group.add_argument("--kappa-max", type=float, help="final soft-threshold tau (absolute units "
                   "of g); " + recipe_help["kappa_max"])
group.add_argument("--dense-ratio", type=float, help="fraction of iterations before "
                   "thresholding starts; " + recipe_help["dense_ratio"])
group = p.add_argument_group("optimisation")
group.add_argument("--iterations", type=int, help="steps per task; " + recipe_help["iterations"])
group.add_argument("--batch-size", type=int, help="images per step; " + recipe_help["batch_size"])
group.add_argument("--lr", type=float, help="peak learning rate, cosine to 0 in every task; "
                   + recipe_help["lr"] + "; --method full: " + recipe_help["lr_full"][9:])
group.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
group = p.add_argument_group("evaluation")
group.add_argument("--routing", choices=["ae", "oracle", "none"], help="the second rows (Tables "
                   "1-2, docs/benchmarks.md#second-rows): ae (default): domain-wise auto-encoders "
                   "and the oracle's row; oracle: that row alone; none: neither (frozen's default)")
group.add_argument("--head", choices=["rail-primal", "rail-dual"], help="RAIL's head (Table 5)")
group.add_argument("--rail-width", type=int, help="RAIL-Primal's D; " + recipe_help["rail_width"])
group.add_argument("--no-zero-shot", action="store_true",
                   help="skip the evaluation before the first task (the zero-shot row)")
group = groups["system"]
group.add_argument("--resume", action="store_true", help="continue the run in --out")
group.add_argument("--plot", action="store_true", help="write figures into --out (matplotlib)")
args = p.parse_args()
evaluation.check_arguments(p, args, args.method)
args.routing = args.routing or ("none" if args.method == "frozen" else "ae")
if args.rail_width is not None and args.head != "rail-primal":  # RAIL-Dual has no width
    p.error(f"--rail-width {args.rail_width}: only --head rail-primal has a width")
recipe = data.RECIPES[args.setting]  # where no flag is given; --method full: its lr_full
for key in ("shots", "dense_ratio", "iterations", "batch_size", "lr", "kappa_max", "rail_width"):
    if getattr(args, key) is None:
        setattr(args, key, recipe["lr_full" if (key, args.method) == ("lr", "full") else key])
for keys, ok, want in ((("shots", "rank", "iterations", "batch_size", "rail_width"),
                        lambda v: v >= 1, ">= 1"),
                       (("dense_ratio",), lambda v: 0 <= v <= 1, "in [0, 1]"),  # NaN fails each
                       (("kappa_max", "weight_decay"), lambda v: 0 <= v < math.inf, "finite, >= 0"),
                       (("lr",), lambda v: 0 < v < math.inf, "finite and > 0")):
    if bad := [k for k in keys if not ok(getattr(args, k))]:
        p.error(f"--{bad[0].replace('_', '-')} {getattr(args, bad[0])}: expected {want}")
if args.method == "frozen" and (args.head is None or args.plot):
    p.error("--method frozen trains nothing: give it a --head, and no --plot (zero-shot: eval.py)")
try:
    placement = codyra.clip_placement(args.encoders, tuple(args.layers.split(",")))
except ValueError as e:
    p.error(str(e))
results_path, ckpt_path = (os.path.join(args.out, f) for f in ("results.json", "checkpoint.pt"))
if any(map(os.path.exists, (results_path, ckpt_path))) and not (args.resume or args.overwrite):
    p.error(f"{args.out} holds another run: --resume continues it, --overwrite replaces it")
if args.resume and not os.path.exists(ckpt_path):
    p.error(f"--resume: no checkpoint at {ckpt_path}")
if args.resume and os.path.exists(results_path) and "metrics" in json.loads(  # left as it is
        pathlib.Path(results_path).read_text()):
    p.exit(0, f"the run in {args.out} is finished ({results_path}); nothing to do\n")
if args.plot and not analysis.can_plot():
    p.error("--plot needs matplotlib: pip install matplotlib")
# --- data and model
device = evaluation.pick_device(args.device, args.precision)
autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")
began = time.time()
tasks, holdout, model = evaluation.load_setting(args, args.shots)  # all checked now, not at task 9
if args.rank > (narrowest := min(min(m.weight.shape) for n, m in model.named_modules()
                                 if isinstance(m, torch.nn.Linear) and placement(n))):
    p.error(f"--rank {args.rank} exceeds the narrowest adapted layer ({narrowest})")
lock = evaluation.claim(args.out)  # one run at a time in --out, for the life of this process
pretrained = analysis.weights(model.to(device), placement)  # W_pre, for every task's drift
# the auto-encoders' pretrained image tower, copied before --resume loads (ViT-B/16: 344 MB fp32)
frozen = copy.deepcopy(model.visual).requires_grad_(False).eval() if args.routing == "ae" else None
union, truth = args.eval_style == "union", [s.test.labels for s in tasks]  # union: X-TAIL's
results = {"setting": args.setting, "datasets": [t.name for t in tasks], "args": vars(args),
           "tasks": [t.describe() for t in tasks], "classes": [len(t.classnames) for t in tasks],
           "acc": [], "analysis": [], "seconds": [], "setup_seconds": time.time() - began,
           "routed": {name: {"acc": [], "routing_accuracy": []} for name in
                      {"ae": ["ae", "oracle"], "oracle": ["oracle"]}.get(args.routing, [])},
           "holdout": {"datasets": [t.name for t in holdout]},
           **({"rail": {"variant": args.head, "acc": []}} if args.head else {})}
state = routing.new_state()  # what the routed rows look up, kept in the checkpoint
head = args.head and (rail.Dual(device=device) if args.head == "rail-dual" else rail.Primal(
    model.text_projection.shape[1], args.rail_width, seed=args.seed, device=device))
if args.resume:  # the weights and results of the finished tasks
    try:  # p.error's SystemExit passes the except below
        saved = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        changed = ["--" + k.replace("_", "-") for k, v in saved["results"]["args"].items()
                   if k not in RUNTIME_FLAGS and vars(args).get(k) != v and not (k == "model" and
                   args.setting == "tiny" and {v, args.model} <= {None, "tiny"})]  # tiny's default
        if changed:  # a resumed run must be the same experiment; only how it runs may change
            p.error(f"--resume: {', '.join(changed)} differ from the run in {args.out}; pass the "
                    "same values, or start a new run elsewhere")
        if saved["results"].get("tasks") != results["tasks"]:  # edited folders
            p.error(f"--resume: the tasks in {args.data_dir} differ from the run in {args.out} "
                    "(names, classes, prompts or sizes); restore them, or start a new run")
        model.load_state_dict(saved["model"])
        results.update({k: v for k, v in saved["results"].items() if k != "args"})
        state = saved.get("routing", state)
        if head:  # the same sums in the same order: the same head
            head.added = saved["rail"]
    except Exception as e:  # truncated, not this project's, or --model's shapes changed
        sys.exit(f"error: --resume: cannot continue from {ckpt_path} ({type(e).__name__}: "
                 f"{' '.join(str(e).split())[:150]}); start again with --overwrite")
    if results["routed"] and len(state["predictions"]) != len(results["acc"]):
        p.error(f"--resume: the run in {args.out} kept no predictions to route; --routing none")
    print(f"resuming after task {len(results['acc'])}/{len(tasks)} from {ckpt_path}")
results["environment"] = evaluation.environment(device)
signal.signal(signal.SIGINT, lambda *_: sys.exit(f"\ninterrupted: {args.out} holds " + (  # a line
    "finished tasks; --resume continues" if results["acc"] else "no finished task: start again")))


def lap(times, phase, began):
    """Note a phase's seconds, and on CUDA its peak memory (MB), in `times`; returns now."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        times[phase + "_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    times[phase] = time.time() - began
    return time.time()


def evaluate(into, key, sets, union=False, keep=None):
    """into[key]: one row (eval.evaluate) of the current model on `sets`, its seconds beside."""
    began = time.time()
    with autocast:
        into[key] = evaluation.evaluate(model, sets, union, device, args.eval_batch_size,
                                        args.workers, keep=keep)
    into[key + "_seconds"] = time.time() - began


def learn(t, task, train_set, times):
    """One task (SPEC section 1): inject fresh adapters, train, merge; (report, factors)."""
    began = time.time()
    with autocast:  # the earlier classes' prompts, fixed during this task (no gradient)
        earlier = torch.cat([evaluation.class_features(
            model, s.classnames, s.templates[:1], device) for s in tasks[:t]]) if t else None
    began = lap(times, "text", began)
    torch.manual_seed(args.seed + 1000 * t)
    if args.method == "full":  # every weight but the temperature
        model.requires_grad_(True).logit_scale.requires_grad_(False)
    else:
        codyra.inject(model, args.rank, where=placement)
    start, stepping = analysis.snapshot(model, placement), time.time()  # |g| at init: who survives
    for it, loss, tau in loop.steps(model, task, train_set, args, t, earlier, device, autocast):
        if (it + 1) % max(1, args.iterations // 5) == 0:  # five progress lines per task
            ranks, seconds = codyra.rank_stats(model), time.time() - stepping
            rank = f"ranks {sum(ranks.values()) / len(ranks):.1f}/{args.rank} | " if ranks else ""
            print(f"task {t + 1}/{len(tasks)} {task.name} | it {it + 1}/{args.iterations} | "
                  f"loss {loss.item():.3f} | tau {tau:.4f} | {rank}"
                  f"{(it + 1) * args.batch_size / seconds:.0f} img/s", flush=True)
    lap(times, "steps", stepping)
    if not torch.isfinite(loss):  # a NaN or inf loss ruins the weights: keep the saved ones
        sys.exit(f"error: task {t + 1} ({task.name}): the loss became {loss.item()}; lower --lr "
                 f"(the tasks before are saved in {args.out}: --resume)")
    report = analysis.task_report(model, start, pretrained)  # needs the adapters: before merge
    update = {n: (B.cpu(), A.cpu()) for n, (B, A) in codyra.factors(model).items()}
    codyra.merge(model)  # W0 <- W0 + B diag(g) A: the next task starts from these weights
    lap(times, "train", began)
    return report, update


# --- the sequence: per task, train fresh adapters and merge them, evaluate (row t), save
keep = {}
if not (args.no_zero_shot or "zero_shot" in results or results["acc"]):  # the paper's first row
    evaluate(results, "zero_shot", tasks, union, keep)
    if holdout:  # Table 4's first row: each held-out dataset among its own classes
        evaluate(results["holdout"], "zero_shot", holdout)
    print(evaluation.format_matrix([], results["datasets"], results["zero_shot"]))
test_features = keep.get("features") if frozen is not None else None  # the zero-shot pass's
for t in range(len(results["acc"]), len(tasks)):
    task, times = tasks[t], {}
    train_set = task.train.decoded(args.workers)  # JPEGs decoded once a task
    report, update = (None, {}) if args.method == "frozen" else learn(t, task, train_set, times)
    keep, began = {}, time.time()
    with autocast:
        row = evaluation.evaluate(model, tasks, union, device, args.eval_batch_size, args.workers,
                                  times, keep)
    began = lap(times, "eval", began)
    state["predictions"].append(keep["predictions"])
    if frozen is not None:  # auto-encoders' features: the zero-shot pass's, else the frozen copy's
        with autocast:
            test_features = test_features or [evaluation.image_features(
                frozen, s.test, device, args.eval_batch_size, args.workers)[0] for s in tasks]
            torch.manual_seed(args.seed + 1000 * t + 1)  # the crops and the auto-encoder's init
            feats = evaluation.image_features(frozen, train_set, device, args.eval_batch_size, 0)[0]
        routing.add_domain(state, feats, test_features)  # feats: one crop of each image
    routing.add_rows(results["routed"], state, t, truth)
    began = lap(times, "routing", began)
    if head:  # RAIL's head learns this task (one crop an image, today's encoder); tests: fused
        torch.manual_seed(args.seed + 1000 * t + 2)  # the crops
        with autocast:
            train = evaluation.image_features(model.eval().encode_image, train_set, device,
                                              args.eval_batch_size, 0)
        rail.add_row(results["rail"], head, train, keep, truth, union, model.logit_scale.exp())
        began = lap(times, "rail", began)
    for key, value in (("acc", row), ("analysis", report), ("seconds", times)):
        results[key].append(value)
    try:  # the checkpoint first (it holds the results too), then the readable copy; atomic
        if update:  # this task's surviving ranks: any model of the sequence can be rebuilt
            with clip_model.atomic(os.path.join(args.out, f"factors-task{t + 1}.pt")) as tmp:
                torch.save(update, tmp)
        with clip_model.atomic(ckpt_path) as tmp:
            torch.save({"model": model.state_dict(), "task": t + 1, "results": results,
                        "routing": state, "rail": head and head.added}, tmp)
        lap(times, "checkpoint", began)  # in results.json; the checkpoint's copy cannot hold it
        evaluation.write_json(results_path, results)
    except (OSError, RuntimeError) as e:  # a full disk: the files of the task before stay whole
        sys.exit(f"error: cannot save task {t + 1} in {args.out} ({' '.join(str(e).split())[:100]}"
                 "); free some space, then continue with --resume")
    print(evaluation.format_matrix(results["acc"], results["datasets"], results.get("zero_shot")))
    for name, routed in results["routed"].items():  # the routed rows so far, under the matrix
        got, right = routed["acc"][-1], routed["routing_accuracy"][-1]
        print(evaluation.format_row(f"{name}:", got + [sum(got) / len(got)]) +
              f"   routed right {sum(right) / len(right):.0f}%")
    if report:
        print(analysis.format_report(report))
    if args.plot:
        analysis.plot(results, args.out)
# --- report
if holdout and "last" not in results["holdout"]:  # Table 4: after the whole sequence
    evaluate(results["holdout"], "last", holdout)
results["metrics"] = evaluation.compute_metrics(results["acc"])
if "zero_shot" in results:  # the paper's zero-shot row: the pretrained model as every row
    results["zero_shot_metrics"] = evaluation.compute_metrics([results["zero_shot"]])
print(f"\n{args.method} on {args.setting}: accuracy (%) after the whole sequence")
print(evaluation.format_table(results["metrics"], results["datasets"],
                              results.get("zero_shot_metrics")))
for name, block in {**results["routed"], **({"rail": results["rail"]} if head else {})}.items():
    block["metrics"] = evaluation.compute_metrics(block["acc"])  # the second rows, under the first
    if name == "rail":  # the same evaluations, each test image through RAIL's fusion
        print(f"with RAIL's head ({args.head}), fused with the zero-shot probabilities")
    else:
        got = block["routing_summary"] = routing.summary(block["routing_accuracy"])
        print(f"routed by {routing.ROUTERS[name]}: seen domains routed right {got['seen']:.1f}%"
              + ("" if got["unseen"] is None else f", unseen ones recognised {got['unseen']:.1f}%"))
    print(evaluation.format_table(block["metrics"], results["datasets"]).split("\n", 1)[1])
if holdout:
    print("\nhold-out datasets, never trained (Table 4): accuracy (%), each among its own classes")
    held, rows = results["holdout"], (("zero-shot", "zero_shot"), (f"after {len(tasks)}", "last"))
    print(evaluation.format_rows(held["datasets"], [(label, held[key]) for label, key in rows
                                                    if key in held], "hold-out"))
if args.method != "frozen":  # nothing trained
    used = " ".join(f"{r['used_parameters'] / 1e6:.3g}M" for r in results["analysis"])
    print(f"parameters used per task (Table 7; kept ranks x (d_in + d_out + 1)): {used}")
if args.method in ("codyra", "lora"):
    kept = " ".join(f"{r['ranks']['mean']:.1f}" for r in results["analysis"])
    print(f"mean active rank per task: {kept}  (of {args.rank})")
evaluation.write_json(results_path, results)
print(f"wrote {results_path}")
