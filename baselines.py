"""The four defences FTT is compared with (Table 1): fine-tuning, fine-pruning, NAD and ANP.

    python baselines.py --method nad --model runs/x/backdoored.pt [the ftt.py flags of that run] --out runs/x/nad
    python baselines.py --method ft,fp,nad,anp --model ... --out runs/x    (runs/x/ft, ...: the data read once)

Every method starts from the same backdoored checkpoint (--model), gets the same clean subset (loading.prepare:
ftt's poisoning and defender split, rebuilt from the same flags and seed), trains with the same budget as SAD
(--sad-epochs, --batch-size, crop + flip; lr --sad-lr-max, the top of SAD's ladder: 0.1, NAD's published lr)
and is evaluated by the same code (harness.accuracy).
Every threshold or stopping point is chosen on the defender's clean data only, never on the test set
or a triggered image (BackdoorBench's FP and ANP select on test data; these do not).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import attacker
import ftt
import harness
import loading
from augment import random_crop_flip

Tensor = torch.Tensor
METHODS = ("ft", "fp", "nad", "anp")


@dataclass
class Baseline:
    method: str = "ft"
    margin: float = 5.0           # FP, ANP: prune while held-out clean ACC stays within this many points
    holdout: float = 0.2          # FP, ANP: share of the clean subset held out to choose the pruning depth
    nad_betas: tuple = (500.0, 1000.0, 1000.0)  # NAD's CIFAR betas, on the last three stages
    nad_recipe: str = "released"  # NAD's released code (bboylyg/NAD main.py, config.py, utils/util.py): teacher
                                  # fine-tuned nad_teacher_epochs, student --sad-epochs, both at lr 0.1 for 2 epochs
                                  # then 0.01, Nesterov, weight decay 1e-4; "shared": FT's budget and --sad-schedule
    nad_teacher_epochs: int = 10  # NAD's README: the teacher is the backdoored model fine-tuned 5-10 epochs
    anp_eps: float = 0.4          # ANP: bound of the multiplicative neuron perturbation
    anp_alpha: float = 0.2        # ANP: weight of the clean loss against the perturbed loss
    anp_lr: float = 0.2           # ANP: SGD lr of the masks
    anp_iters: int = 2000         # ANP: mask optimisation steps (its paper: 2000 at batch 128)
    anp_threshold: float = 0.0    # ANP: prune masks below this (its paper: 0.2); 0: prune the smallest masks as
                                  # deep as held-out clean ACC allows (0.2 left 10% ACC on our small models)


def holdout_split(n: int, share: float, seed: int, device) -> tuple[Tensor, Tensor]:
    """Indices of the clean subset held out to choose a pruning depth, and of the rest."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(device)
    k = max(1, round(share * n))
    return order[:k], order[k:]


# ------------------------------------------------------------------ FT: fine-tuning on the clean subset

def fine_tune(model: nn.Module, x: Tensor, y: Tensor, cfg: ftt.Config, device: torch.device,
              log: harness.RunLog, stage: str = "ft") -> nn.Module:
    harness.train_supervised(model, lambda e: (x, y), cfg.sad_epochs, cfg.sad_lr_max, cfg.batch_size, cfg, device,
                         stage, log, schedule=harness.SCHEDULES[cfg.sad_schedule])
    return model


# ------------------------------------------------------------------ FP: fine-pruning (Liu et al. 2018)

def channel_mask_hook(mask: Tensor):
    """A forward hook that multiplies a stage's output channels by mask (C,): 0 prunes a channel."""
    return lambda module, inputs, out: out * mask.view(1, -1, 1, 1).to(out.dtype)


@torch.no_grad()
def mean_activation(model: nn.Module, x: Tensor, device: torch.device, channels_last: bool) -> Tensor:
    """Mean activation of each channel of the last stage's output on clean images x: (C,)."""
    model.eval()
    total = 0
    for i in range(0, len(x), 256):
        h = ftt.stage_outputs(model, harness.to_input(x[i:i + 256].to(device), channels_last))[-1]
        total = total + h.float().mean((2, 3)).sum(0)
    return total / len(x)


def fine_prune(model: nn.Module, x: Tensor, y: Tensor, cfg: ftt.Config, b: Baseline, device: torch.device,
               log: harness.RunLog) -> tuple[nn.Module, dict]:
    """Prune the last stage's channels, least active on clean data first, as deep as the held-out part of
    the clean subset allows (ACC within b.margin points of unpruned), then fine-tune on the whole subset.
    The mask stays on the model as a forward hook (returned in the info, with the pruned channel indices)."""
    hold, rest = holdout_split(len(x), b.holdout, cfg.seed, x.device)
    ranking = mean_activation(model, x[rest], device, cfg.channels_last).argsort()  # least active first
    c = len(ranking)
    mask = torch.ones(c, device=device)
    hook = model.stages[-1].register_forward_hook(channel_mask_hook(mask))
    acc = lambda: harness.accuracy(model, x[hold], y[hold], device, cfg.channels_last)
    base, chosen, step = acc(), 0, max(1, c // 64)
    for k in range(step, c, step):
        mask.fill_(1)
        mask[ranking[:k]] = 0
        if acc() < base - b.margin:
            break
        chosen = k
    mask.fill_(1)
    mask[ranking[:chosen]] = 0
    print(f"fp: pruned {chosen} of {c} channels (held-out clean ACC {base:.2f} -> {acc():.2f})", flush=True)
    fine_tune(model, x, y, cfg, device, log, "fp")
    return model, {"pruned": sorted(ranking[:chosen].tolist()), "channels": c, "hook": hook, "mask": mask}


# ------------------------------------------------------------------ NAD (Li et al. ICLR 2021)

def nad_attention(f: Tensor, p: float = 2.0) -> Tensor:
    """NAD's attention map: mean over channels of |f|^p, flattened and L2-normalised: (B, H W)."""
    return F.normalize(f.float().abs().pow(p).mean(1).flatten(1), dim=1)


def nad_loss(f_student: Tensor, f_teacher: Tensor, p: float = 2.0) -> Tensor:
    """NAD's distillation term at one stage: mean squared difference of the attention maps, the
    teacher's detached. 0 when the two features are equal."""
    return (nad_attention(f_student, p) - nad_attention(f_teacher.detach(), p)).pow(2).mean()


def stage_features(model: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """(logits, every stage's output) in one forward pass."""
    feats = ftt.stage_outputs(model, x)
    return model.head(feats[-1]), feats


def nad(model: nn.Module, x: Tensor, y: Tensor, cfg: ftt.Config, b: Baseline, device: torch.device,
        log: harness.RunLog) -> nn.Module:
    """Teacher: the backdoored model fine-tuned on the clean subset. Student: the backdoored model
    trained with CE plus sum_i beta_i nad_loss at the last len(betas) stages' outputs. b.nad_recipe
    "released": the schedule, optimiser and teacher budget of NAD's released code (see Baseline)."""
    steps = math.ceil(len(x) / cfg.batch_size)
    if b.nad_recipe == "released":
        cfg = dataclasses.replace(cfg, weight_decay=1e-4)
        schedule, nesterov = harness.nad_released(), True
        teacher = copy.deepcopy(model)
        harness.train_supervised(teacher, lambda e: (x, y), b.nad_teacher_epochs, cfg.sad_lr_max, cfg.batch_size, cfg,
                                 device, "nad-t", log, schedule=lambda o, total: schedule(o, total, steps), nesterov=True)
    else:
        schedule, nesterov = lambda o, total, _: harness.SCHEDULES[cfg.sad_schedule](o, total), False
        teacher = fine_tune(copy.deepcopy(model), x, y, cfg, device, log, "nad-t")
    teacher = teacher.eval().requires_grad_(False)
    betas = b.nad_betas[-len(model.stages):]
    opt = harness.sgd(model.parameters(), cfg.sad_lr_max, cfg, nesterov)
    sched = schedule(opt, cfg.sad_epochs * steps, steps)
    log.begin("nad", cfg.sad_epochs, len(x))
    for epoch in range(1, cfg.sad_epochs + 1):
        model.train()
        perm = torch.randperm(len(x), device=x.device)
        sums, watch, lr_now = torch.zeros(2, device=device), harness.FiniteWatch(device), sched.get_last_lr()[0]
        for step, i in enumerate(range(0, len(x), cfg.batch_size)):
            idx = perm[i:i + cfg.batch_size]
            xb = harness.to_input(random_crop_flip(x[idx]), cfg.channels_last)
            with harness.autocast(device):
                logits, fs = stage_features(model, xb)
                with torch.no_grad():
                    _, ft = stage_features(teacher, xb)
            ce = F.cross_entropy(logits.float(), y[idx])
            at = sum(beta * nad_loss(s, t) for beta, s, t in zip(betas, fs[-len(betas):], ft[-len(betas):]))
            loss = ce + at
            watch.see(loss, step)
            harness.descend(opt, sched, loss)
            sums += torch.stack([ce, at]).detach()
            log.step(len(idx), epoch)
        log.pause()
        watch.check("nad", epoch)
        ce, at = (sums / steps).tolist()
        log.end_epoch(epoch, model, {"ce": ce, "at": at}, lr_now)
    return model


# ------------------------------------------------------------------ ANP (Wu & Wang, NeurIPS 2021)

class NeuronPerturbation:
    """Hooks on every BatchNorm2d: its output gamma x_hat + beta becomes
    (mask + delta) gamma x_hat + (1 + xi) beta, per channel. mask in [0, 1] is what ANP learns;
    delta, xi in [-eps, eps] are the adversarial perturbations (0 when `perturb` is off)."""

    def __init__(self, model: nn.Module, eps: float):
        self.bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        dev = next(model.parameters()).device
        self.masks = [torch.ones(bn.num_features, device=dev, requires_grad=True) for bn in self.bns]
        self.deltas = [torch.zeros(bn.num_features, device=dev, requires_grad=True) for bn in self.bns]
        self.xis = [torch.zeros(bn.num_features, device=dev, requires_grad=True) for bn in self.bns]
        self.eps, self.perturb = eps, False
        self.hooks = [bn.register_forward_hook(self.hook(i)) for i, bn in enumerate(self.bns)]

    def hook(self, i: int):
        def fn(bn, inputs, out):
            beta = (bn.bias if bn.bias is not None else torch.zeros_like(self.masks[i])).view(1, -1, 1, 1)
            scale = self.masks[i] + self.deltas[i] if self.perturb else self.masks[i]
            shift = 1 + self.xis[i] if self.perturb else torch.ones_like(self.masks[i])
            return scale.view(1, -1, 1, 1) * (out - beta) + shift.view(1, -1, 1, 1) * beta
        return fn

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def prune_bn_scale(bns: list[nn.BatchNorm2d], weights: list[Tensor], off: list[Tensor]) -> None:
    """ANP's pruning: the BatchNorm scale (weight) of every pruned neuron set to 0, its bias kept (ANP's
    prune_neuron zeroes the weight only). weights: the unpruned scales, so any depth can be set again."""
    with torch.no_grad():
        for bn, w, o in zip(bns, weights, off):
            bn.weight.copy_(w.masked_fill(o, 0))


def anp(model: nn.Module, x: Tensor, y: Tensor, cfg: ftt.Config, b: Baseline, device: torch.device) -> tuple[nn.Module, dict]:
    """Learn a mask per BatchNorm neuron that keeps clean accuracy under adversarial neuron perturbation:
    each step one signed-gradient ascent step on (delta, xi) within eps, then one SGD step on the masks of
    alpha L(clean) + (1 - alpha) L(perturbed), masks clipped to [0, 1]. Then the neurons with the smallest
    masks are pruned by prune_bn_scale: below b.anp_threshold, or with 0 as many as the held-out part of
    the clean subset allows. The depth search and the final model use the same operation, so the held-out
    accuracy that chose the depth is the pruned model's (info["held_out_acc"]).
    As in ANP's code, the masks are learned with BatchNorm in train mode (batch statistics); the running
    statistics are restored afterwards, as ANP prunes the original checkpoint."""
    model.requires_grad_(False).train()
    running = [t.clone() for t in model.buffers()]
    hold, rest = holdout_split(len(x), b.holdout, cfg.seed, x.device)
    x_hold, y_hold, x, y = x[hold], y[hold], x[rest], y[rest]
    pert = NeuronPerturbation(model, b.anp_eps)
    opt = torch.optim.SGD(pert.masks, lr=b.anp_lr, momentum=0.9)
    g = torch.Generator().manual_seed(cfg.seed)
    batch = 128
    for it in range(b.anp_iters):
        idx = torch.randint(len(x), (batch,), generator=g).to(x.device)
        xb, yb = harness.to_input(x[idx], cfg.channels_last), y[idx]
        # maximise the loss over the perturbations (one step, from a random start, as ANP does)
        pert.perturb = True
        for p in pert.deltas + pert.xis:
            p.data.uniform_(-b.anp_eps, b.anp_eps)
        loss = F.cross_entropy(model(xb).float(), yb)
        grads = torch.autograd.grad(loss, pert.deltas + pert.xis)
        for p, gr in zip(pert.deltas + pert.xis, grads):
            p.data = (p.data + b.anp_eps * gr.sign()).clamp(-b.anp_eps, b.anp_eps)
        # minimise over the masks
        loss_rob = F.cross_entropy(model(xb).float(), yb)
        pert.perturb = False
        loss_nat = F.cross_entropy(model(xb).float(), yb)
        loss = b.anp_alpha * loss_nat + (1 - b.anp_alpha) * loss_rob
        harness.check_finite(loss, "anp", 1, it)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for m in pert.masks:
            m.data.clamp_(0, 1)
        if (it + 1) % max(1, b.anp_iters // 5) == 0 and not cfg.quiet:
            print(f"   anp step {it + 1}/{b.anp_iters} | nat {loss_nat.item():.3f} rob {loss_rob.item():.3f}", flush=True)
    pert.remove()
    with torch.no_grad():
        for t, saved in zip(model.buffers(), running):
            t.copy_(saved)
    model.eval()
    masks = [m.detach().clone() for m in pert.masks]
    scales = [bn.weight.detach().clone() for bn in pert.bns]
    flat = torch.cat(masks)
    total, sizes, order = len(flat), [len(m) for m in masks], flat.argsort()  # smallest masks first
    offs = lambda k: list((torch.zeros(total, dtype=torch.bool, device=flat.device)
                           .index_fill_(0, order[:k], True)).split(sizes))

    def held_out_acc(k: int) -> float:
        prune_bn_scale(pert.bns, scales, offs(k))
        return harness.accuracy(model, x_hold, y_hold, device, cfg.channels_last)
    base = held_out_acc(0)
    if b.anp_threshold:  # ANP's own rule: every neuron whose mask fell below the threshold
        k = int((flat < b.anp_threshold).sum())
    else:  # the smallest masks first, as deep as the held-out clean images allow (ANP's pruning by number)
        k, step = 0, max(1, total // 64)
        for n in range(step, total, step):
            if held_out_acc(n) < base - b.margin:
                break
            k = n
    acc_k = held_out_acc(k)  # leaves the model pruned at depth k
    print(f"anp: pruned {k} of {total} BatchNorm neurons (smallest masks; held-out clean ACC {acc_k:.2f})", flush=True)
    return model.requires_grad_(True), {"masks": masks, "pruned": k, "neurons": total, "held_out_acc": acc_k,
                                        "held_out_acc_unpruned": base, "held_out": hold}


# ------------------------------------------------------------------ cells: methods on one backdoored model

def prepare(cfg: ftt.Config) -> dict:
    """What every method of a row shares, made once per process: loading.prepare's data, evaluation and
    backdoored --model (as ftt.py makes them from the same flags), and its figures before any defence."""
    if not (cfg.model or cfg.backdoorbench):
        raise harness.ConfigError("--model: a baseline needs the backdoored checkpoint it defends (ftt.py's backdoored.pt)")
    t0 = time.time()
    prep = loading.prepare(cfg, ftt.build_backbone, attacker.make_trigger)
    return {**prep, "before": harness.measured(prep["evaluate"](prep["model"])), "rng": torch.get_rng_state(),
            "data_s": time.time() - t0}


def run(cfg: ftt.Config, b: Baseline, prep: dict | None = None) -> dict:
    """One method on the backdoored model -> results.json in cfg.out. With `prep` (from `prepare`, same flags)
    nothing is read or poisoned again; the method starts from the same weights and RNG state either way."""
    if b.method not in METHODS:
        raise harness.ConfigError(f"--method: {b.method!r} is not one of {', '.join(METHODS)}")
    if b.nad_recipe not in ("released", "shared"):
        raise harness.ConfigError(f"--nad-recipe: {b.nad_recipe!r} is not one of released, shared")
    prep = prep or prepare(cfg)
    cfg = dataclasses.replace(prep["cfg"], out=cfg.out)  # what a --backdoorbench record filled in
    t0 = time.time()
    device, x_l, y_l, evaluate = prep["device"], prep["x_l"], prep["y_l"], prep["evaluate"]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "log.jsonl").unlink(missing_ok=True)
    log = harness.RunLog(evaluate, cfg.eval_every, out / "log.jsonl", cfg.quiet)
    model = copy.deepcopy(prep["model"])
    torch.set_rng_state(prep["rng"])
    results = {"before": prep["before"]}
    info = {}
    if b.method == "ft":
        fine_tune(model, x_l, y_l, cfg, device, log)
    elif b.method == "fp":
        model, info = fine_prune(model, x_l, y_l, cfg, b, device, log)
        info = {"pruned_channels": info["pruned"], "channels": info["channels"]}
    elif b.method == "nad":
        nad(model, x_l, y_l, cfg, b, device, log)
    else:
        model, info = anp(model, x_l, y_l, cfg, b, device)
        info = {"pruned_neurons": info["pruned"], "neurons": info["neurons"], "held_out_acc": info["held_out_acc"],
                "held_out_acc_unpruned": info["held_out_acc_unpruned"]}
    results["after"] = harness.measured(evaluate(model))
    d = prep["d"]
    report = {"method": b.method, "baseline": dataclasses.asdict(b), "config": dataclasses.asdict(cfg),
              "results": results, "info": info, "model": prep["read"], "trigger": d["trigger"], "counts": d["counts"],
              "timings": {"total_s": time.time() - t0, "data_s": prep["data_s"]}, "versions": harness.versions(),
              "argv": sys.argv}
    harness.save_atomic_text(json.dumps(report, indent=1), out / "results.json")
    r = results
    print(f"{b.method}: ASR {r['before']['asr']:.2f} -> {r['after']['asr']:.2f}, ACC {r['before']['acc']:.2f} -> "
          f"{r['after']['acc']:.2f} ({report['timings']['total_s'] / 60:.1f} min) -> {out / 'results.json'}", flush=True)
    return report


def run_methods(cfg: ftt.Config, b: Baseline, methods: list[str]) -> list[dict]:
    """Several methods in one process, the data read and poisoned once: method m writes cfg.out/m; one whose
    results.json exists is skipped (a rerun finishes a row)."""
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise harness.ConfigError(f"--method: {', '.join(bad)} not in {', '.join(METHODS)}")
    todo = [m for m in methods if not (Path(cfg.out) / m / "results.json").exists()]
    prep = prepare(cfg) if todo else None
    return [run(dataclasses.replace(cfg, out=str(Path(cfg.out) / m)), dataclasses.replace(b, method=m), prep)
            for m in todo]


def cli(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(add_help=False)
    harness.add_flags(ap, Baseline, help=False)
    known, rest = ap.parse_known_args(argv)
    b = Baseline(**vars(known))
    cfg = ftt.parse_args(rest)
    if "," in b.method:  # --method ft,fp,nad,anp --out DIR (or "ft,"): DIR/ft, DIR/fp, ..., the data read once
        return harness.run_cli("baselines", lambda: run_methods(cfg, b, [m for m in b.method.split(",") if m]), cfg.out)
    return harness.run_cli("baselines", lambda: run(cfg, b), cfg.out)


if __name__ == "__main__":
    sys.exit(cli())
