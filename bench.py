"""Benchmark: what every FTT training step costs against plain training, on the device at hand.

    python bench.py --arch wrn16-1                      # CPU-sized (WRN-16-1, CIFAR-shaped images)
    python bench.py --arch preact18 --device cuda       # the GPU setting; add --compile to measure torch.compile
    python bench.py --arch preact18 --device cuda --compile --compile-mode reduce-overhead --row plain@attack

Each row times one kind of step, with the very functions ftt.py trains with (supervised_forward,
sad_forward, ssl_forward, descend, the augmentations): warm-up steps are dropped, then images/s is
taken over several timed windows and the median reported. Rows:
  plain@b        backbone forward + backward + SGD step, batch b (the labelled batch)
  plain@attack   the same at the attacker's batch (128), fed by the real pipeline: the backdoored model's training
  plain@b(1+mu)  the same at the SSL step's forward batch, the fair reference for the SSL row
  sad            Branched backbone + exits + eq. (7)'s labelled half, batch b; ratio to plain@b
  ssl            weak view (no grad) + strong view and labelled batch (with grad), eq. (7); counted in
                 unlabelled images; ratio to plain@b(1+mu)
  plain / ssl, pipeline vs in memory: fed from a uint8 dataset on the device through the augmentations
                 (the real pipeline) or from batches augmented once beforehand (in memory)
  predict@N      inference in eval mode as every evaluation runs it (harness.predictions), batch N: EVAL_BATCH, 1024
FLOPs are counted with torch.utils.flop_counter (convolutions and matmuls, forward and backward) on one
plain step; on CUDA the achieved FLOP/s is given as a share of the device's dense bf16 peak.
Each row also counts the host synchronisations of one step on CUDA (torch.cuda.set_sync_debug_mode):
a training step should have none. Output: a Markdown table on stdout and a JSON file (--json).
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
import warnings
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import ftt
import harness
from augment import random_crop_flip

# dense bf16 tensor-core peaks (vendor datasheets), by a substring of torch.cuda.get_device_name()
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="wrn16-1", help="backbone, as in ftt.py (default: %(default)s)")
    ap.add_argument("--shape", default="3,32,32", help="image C,H,W (default: CIFAR's %(default)s)")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64, help="labelled batch b (paper: 64)")
    ap.add_argument("--mu", type=int, default=7, help="unlabelled batch = mu b (FixMatch: 7)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--keep-memory", action=argparse.BooleanOptionalAction, default=True, help="as ftt.py's")
    ap.add_argument("--ssl-exits", default=ftt.Config.ssl_exits, choices=ftt.SSL_EXITS, help="as ftt.py's")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model of every row")
    ap.add_argument("--compile-mode", default="reduce-overhead", choices=("default", "reduce-overhead", "max-autotune"),
                    help="torch.compile's mode (reduce-overhead: CUDA graphs) (default: %(default)s)")
    ap.add_argument("--row", action="append", default=[], help="run only this row (repeatable; default: all)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per row (more with --compile)")
    ap.add_argument("--windows", type=int, default=5, help="timed windows per row; the median is reported")
    ap.add_argument("--steps", type=int, default=10, help="steps per timed window")
    ap.add_argument("--pool", type=int, default=4096, help="images in the synthetic uint8 dataset on the device")
    ap.add_argument("--json", default="", help="where the JSON goes (default: runs/bench-<device>-<arch>.json)")
    return ap.parse_args(argv)


def training_steps(cfg: ftt.Config, arch: str, shape: tuple, k: int, device: torch.device) -> dict:
    """One step of each training loop on random images of `shape`, for the start estimate (harness.estimate_run)."""
    model = ftt.build_backbone(arch, shape[0], k).to(device)
    model = model.to(memory_format=torch.channels_last) if cfg.channels_last else model
    net = ftt.Branched(model, shape, k).to(device)
    b, bu, ba = cfg.batch_size, cfg.mu * cfg.batch_size, cfg.attack_batch
    x = torch.randint(0, 256, (max(bu, ba, 256), *shape), dtype=torch.uint8, device=device)
    y = torch.randint(0, k, (len(x),), device=device)
    w = ftt.exit_weights(len(net.exits) + 1)
    return {"attack": (model, lambda m: harness.supervised_forward(m, random_crop_flip(x[:ba]), y[:ba], cfg, device)),
            "sad": (net, lambda m: ftt.sad_forward(m, ftt.weak_augment(x[:b]), y[:b], w, cfg, device)[0]),
            "ssl": (net, lambda m: ftt.ssl_forward(m, ftt.weak_augment(x[:b]), y[:b], ftt.weak_augment(x[:bu]),
                                                   ftt.strong_augment(x[:bu]), ftt.ssl_exit_weights(net, cfg), cfg,
                                                   device)[0]),
            "eval": (model, x[:256], y[:256])}  # images/s of evaluation from one batch of 256


def start_estimate(cfg: ftt.Config, p: dict, train_attacker: bool) -> dict:
    """ftt.main's start line, printed, from one timed step of each stage: p is loading.prepare's. -> the estimate."""
    k, device, counts = p["num_classes"], p["device"], p["counts"]
    steps_for = lambda arch: training_steps(cfg, arch, p["shape"], k, device)
    left = counts["unlabelled"] // k if cfg.ssl_pool == "drop-suspect" else 0  # about a class of the pool left out,
    back = left * (0.4 * (cfg.unlearn > 0) + 0.25 * (cfg.readmit != "none"))  # of it these rejoin (37-41%, 24-33%)
    expected = dict(counts, unlabelled=counts["unlabelled"] - left + int(back))
    est = harness.estimate_run(cfg, cfg.arch, expected, device, train_attacker, steps_for)
    print(harness.start_line(cfg, est, device, counts, train_attacker, steps_for), flush=True)
    return est


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def host_syncs(step, device: torch.device) -> int:
    """How many times one call of step() makes the host wait for the GPU, counted by CUDA's sync debug
    mode (each synchronising call warns once); 0 on CPU, where there is nothing to wait for."""
    if device.type != "cuda":
        return 0
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in seen)


def rate(step, images: int, device: torch.device, warmup: int, windows: int, steps: int) -> tuple[float, list[float]]:
    """Median images/s of step() over `windows` windows of `steps` calls, after `warmup` calls."""
    for _ in range(warmup):
        step()
    sync(device)
    per_window = []
    for _ in range(windows):
        t = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        per_window.append(images * steps / (time.perf_counter() - t))
    return statistics.median(per_window), per_window


def bench(args: argparse.Namespace) -> dict:
    device = harness.pick_device(args.device, args.keep_memory)
    c, h, w = (int(v) for v in args.shape.split(","))
    b, bu = args.batch, args.mu * args.batch
    cfg = ftt.Config(arch=args.arch, batch_size=b, mu=args.mu, channels_last=args.channels_last, ssl_exits=args.ssl_exits)
    torch.manual_seed(0)
    # a uint8 dataset on the device, as ftt.main holds its data
    pool_x = torch.randint(0, 256, (args.pool, c, h, w), dtype=torch.uint8, device=device)
    pool_y = torch.randint(0, args.classes, (args.pool,), device=device)
    draw = lambda n: torch.randint(0, args.pool, (n,), device=device)
    watch = harness.FiniteWatch(device)  # a non-finite loss is noted on the device and read once, at the end

    def model(branched: bool, compile: bool = args.compile):
        m = ftt.build_backbone(args.arch, c, args.classes).to(device)
        if branched:
            m = ftt.Branched(m, (c, h, w), args.classes).to(device)
        if args.channels_last:
            m = m.to(memory_format=torch.channels_last)
        m.train()
        opt = harness.sgd(m.parameters(), 0.01, cfg)
        sched = harness.cosine(opt, 10 ** 6)
        if compile:
            m.compile(mode=args.compile_mode)  # in place: the module keeps its attributes
        return m, opt, sched

    def plain_step(n: int, pipeline: bool = False):
        m, opt, sched = model(False)
        fixed = random_crop_flip(pool_x[:n]), pool_y[:n]

        def step():
            if pipeline:  # the real pipeline: gather from the uint8 pool, crop and flip
                idx = draw(n)
                xb, yb = random_crop_flip(pool_x[idx]), pool_y[idx]
            else:  # in memory
                xb, yb = fixed
            loss = harness.supervised_forward(m, xb, yb, cfg, device)
            watch.see(loss, 0)
            harness.descend(opt, sched, loss)
        return step

    def sad_step():
        net, opt, sched = model(True)
        weights = ftt.exit_weights(len(net.exits) + 1)

        def step():
            idx = draw(b)
            loss, _, _ = ftt.sad_forward(net, random_crop_flip(pool_x[idx]), pool_y[idx], weights, cfg, device)
            watch.see(loss, 0)
            harness.descend(opt, sched, loss)
        return step

    def ssl_step(pipeline: bool):
        net, opt, sched = model(True)
        weights = ftt.ssl_exit_weights(net, cfg)
        u = pool_x[:bu]
        fixed = (random_crop_flip(pool_x[bu:bu + b]), pool_y[bu:bu + b], random_crop_flip(u), ftt.strong_augment(u))

        def step():
            if pipeline:
                il, iu = draw(b), draw(bu)
                u = pool_x[iu]
                batch = random_crop_flip(pool_x[il]), pool_y[il], random_crop_flip(u), ftt.strong_augment(u)
            else:
                batch = fixed
            loss, _ = ftt.ssl_forward(net, *batch, weights, cfg, device)
            watch.see(loss, 0)
            harness.descend(opt, sched, loss)
        return step

    def predict_step(n: int):  # evaluation and the pool's readings, at harness.EVAL_BATCH and at 1024 beside it
        m = model(False)[0]
        return lambda: harness.predictions(m, pool_x[:n], device, args.channels_last, n)

    warm = args.warmup + (3 if args.compile else 0)
    timing = lambda step, n: rate(step, n, device, warm, args.windows, args.steps)
    rows = {}
    ba = cfg.attack_batch
    specs = [("plain@b", lambda: plain_step(b), b), ("plain@attack", lambda: plain_step(ba, pipeline=True), ba),
             ("plain@b(1+mu)", lambda: plain_step(b + bu), b + bu),
             ("plain@b(1+mu), pipeline", lambda: plain_step(b + bu, pipeline=True), b + bu),
             ("sad", sad_step, b), ("ssl, pipeline", lambda: ssl_step(True), bu),
             ("ssl, in memory", lambda: ssl_step(False), bu),
             *((f"predict@{n}", lambda n=n: predict_step(n), min(n, args.pool)) for n in (harness.EVAL_BATCH, 1024))]
    wanted = args.row
    unknown = set(wanted) - {name for name, _, _ in specs}
    if unknown:
        raise SystemExit(f"bench: --row: no row {sorted(unknown)}; rows: {'; '.join(name for name, _, _ in specs)}")
    for name, make, n in specs:
        if wanted and name not in wanted:
            continue
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        step = make()
        median, windows = timing(step, n)
        rows[name] = {"images_per_s": median, "windows": windows, "host_syncs_per_step": host_syncs(step, device)}
        if device.type == "cuda":
            rows[name]["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        print(f"  {name:<26} {median:9.1f} img/s  (windows: {', '.join(f'{v:.0f}' for v in windows)}; "
              f"host syncs per step: {rows[name]['host_syncs_per_step']})", flush=True)

    watch.check("bench", 0)
    # FLOPs of one plain step (forward + backward), per image
    m, opt, sched = model(False, compile=False)
    counter = FlopCounterMode(display=False)
    xb, yb = random_crop_flip(pool_x[:b]), pool_y[:b]
    with counter:
        harness.descend(opt, sched, harness.supervised_forward(m, xb, yb, cfg, device))
    flops_per_image = counter.get_total_flops() / b
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None) if device.type == "cuda" else None
    ips = lambda name: rows[name]["images_per_s"] if name in rows else None
    pairs = {"sad / plain@b": ("sad", "plain@b"), "plain@attack / plain@b": ("plain@attack", "plain@b"),
             "ssl (unlabelled) / plain@b(1+mu)": ("ssl, pipeline", "plain@b(1+mu)"),
             "ssl (unlabelled) / plain@b": ("ssl, pipeline", "plain@b"),
             "plain: pipeline / in memory": ("plain@b(1+mu), pipeline", "plain@b(1+mu)"),
             "ssl: pipeline / in memory": ("ssl, pipeline", "ssl, in memory"),
             f"predict@{harness.EVAL_BATCH} / predict@1024": (f"predict@{harness.EVAL_BATCH}", "predict@1024")}
    ratios = {k: ips(a) / ips(d) for k, (a, d) in pairs.items() if ips(a) and ips(d)}
    # the FLOP rate of the largest plain step measured (the 512-image one when it ran)
    plain_row = next((r for r in ("plain@b(1+mu)", "plain@b(1+mu), pipeline", "plain@attack", "plain@b") if r in rows), None)
    plain = ips(plain_row) or 0.0
    achieved = flops_per_image * plain
    report = {"device": str(device), "device_name": name, "threads": torch.get_num_threads(), "arch": args.arch,
              "shape": [c, h, w], "batch": b, "mu": args.mu, "channels_last": args.channels_last,
              "compile": args.compile, "amp": "bf16" if device.type == "cuda" else "none (fp32 on CPU)",
              "rows": rows, "ratios": ratios, "flops_per_image_train_step": flops_per_image,
              "achieved_flops_per_s_plain": achieved, "achieved_by": plain_row, "peak_bf16_flops_per_s": peak,
              "share_of_peak": achieved / peak if peak else None,
              "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
              "versions": harness.versions(), "date": time.strftime("%Y-%m-%d"), "settings": vars(args)}
    return report


def markdown(r: dict) -> str:
    lines = [f"{r['arch']} on {r['device_name']} ({r['device']}, {r['threads']} threads), images {tuple(r['shape'])}, "
             f"b {r['batch']}, mu {r['mu']}, channels_last {r['channels_last']}, compile {r['compile']}, AMP {r['amp']}, "
             f"{r['date']}", "", "| step | images/s (median) | host syncs per step | peak GPU memory GiB |",
             "|---|---|---|---|"]
    for name, row in r["rows"].items():
        mem = f"{row['peak_mem_gib']:.2f}" if "peak_mem_gib" in row else "-"
        lines.append(f"| {name} | {row['images_per_s']:.1f} | {row['host_syncs_per_step']} | {mem} |")
    lines += ["", "| ratio | value |", "|---|---|"] + [f"| {k} | {v:.2f} |" for k, v in r["ratios"].items()]
    share = f", {100 * r['share_of_peak']:.1f}% of the bf16 peak" if r["share_of_peak"] else ""
    rate = (f"; {r['achieved_by']} achieves {r['achieved_flops_per_s_plain'] / 1e12:.3f} TFLOP/s{share}"
            if r["achieved_by"] else "")
    lines += ["", f"Training-step FLOPs per image {r['flops_per_image_train_step'] / 1e9:.3f} GFLOP{rate}. "
                  f"Peak RSS {r['peak_rss_gib']:.1f} GiB."]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse(argv)
    print(f"bench: {args.arch}, images {args.shape}, b {args.batch}, mu {args.mu}", flush=True)
    r = bench(args)
    text = markdown(r)
    print("\n" + text)
    tag = f"-compile-{args.compile_mode}" if args.compile else ""
    path = Path(args.json or f"runs/bench-{r['device'].replace(':', '')}-{args.arch}{tag}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(r, indent=1))
    print(f"\nwrote {path}")
    return r


if __name__ == "__main__":
    main()
