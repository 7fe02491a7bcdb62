"""The harness around ftt.py's method: flag checks, device and precision, optimiser and schedules, the run log
(progress lines and log.jsonl), the resume state, evaluation, the start estimate, the results table and the CLI
helper that ftt.py and baselines.py share. Nothing here knows the method: where it needs a piece of it (the
training steps to time, say), the caller passes it in.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import dataclasses
import json
import math
import os
import platform
import re
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import attacks
from augment import random_crop_flip

Tensor = torch.Tensor

# The choices of ftt.Config's flags (validate checks them also when main() is called without the CLI)
DATASETS = ("cifar10", "cifar100", "fashion-mnist")
ATTACK_CHOICES = attacks.ATTACKS + ("patch", "none")
ARCHS = ("preact18", "wrn16-1", "resnet18", "resnet50")  # and any wrnD-K with D = 6n + 4, and tv:NAME
SSL_POOLS = ("all", "drop-suspect")


def flag(default, help: str, **meta):
    """A Config field that is also a flag: its default, its --help line, and argparse's extras (choices, flag)."""
    return dataclasses.field(default=default, metadata={"help": help, **meta})


@dataclass
class RunConfig:
    """The knobs around the method: the experiment, a model of your own, the run (ftt.Config adds the method's)."""
    # the experiment: data, attack, the attacker's training of the backdoored model (BackdoorBench's recipe)
    dataset: str = flag("cifar10", "training and test data", choices=DATASETS)
    arch: str = flag("preact18", "backbone: preact18, resnet18, resnet50, wrnD-K (wrn16-1: the paper's), or "
                                 "tv:NAME, torchvision's own (e.g. tv:vgg19_bn)")
    attack: str = flag("badnets", "backdoor attack; patch: the --trigger PNG; none: with --model only, the pool is "
                                  "not poisoned (ASR from --backdoor-dir, if given)", choices=ATTACK_CHOICES)
    trigger: str = flag("", "--attack patch: a PNG with alpha of the input size; alpha marks and blends the trigger")
    poison_rate: float = flag(0.1, "share of the whole training set poisoned (BackdoorBench: 0.1)")
    clean_label: bool = flag(False, "poison target-class images only, labels kept (a clean-label attack's pool)")
    target: int = flag(0, "all-to-one target class")
    clean_ratio: float = flag(0.05, "defender's clean labelled share of the training set (paper: 5%%)")
    pool_poison_share: float = flag(-1.0, "Table 3: a pool of fixed size with this share poisoned (-1: all the rest)")
    train_size: int = flag(0, "use only the first N training images (0: all)")
    test_size: int = flag(0, "use only the first N test images (0: all)")
    attack_epochs: int = flag(100, "epochs of backdoored training")
    attack_lr: float = flag(0.01, "SGD lr of backdoored training")
    attack_batch: int = flag(128, "batch of backdoored training")
    attack_augment: bool = flag(True, "crop + flip while backdooring (the attacker's choice)")
    attack_schedule: str = flag("cosine", "lr schedule of backdoored training: cosine to 0, or step (x0.1 at 50%% "
                                          "and 75%% of the epochs)", choices=("cosine", "step"))
    reference_epochs: int = flag(10, "epochs of the clean reference model (Trojan, Low-Frequency, ATTEQ-NN)")
    reference_model: str = flag("", "a clean --arch state_dict to fit Trojan / Low-Frequency / ATTEQ-NN on")
    # a model and data of your own (docs/your-model.md)
    model: str = flag("", "backdoored model to purify (skips backdoored training): ours or a published layout, "
                          "bare or under state_dict / model / net")
    normalize: str = flag("", "inputs the model expects: MEAN,STD (one each, or C each) or a preset: cifar10, "
                              "cifar100, imagenet; applied inside the backbone")
    backdoor_dir: str = flag("", "with --model: triggered test images (any layout), all counted as --target for ASR")
    clean_dir: str = flag("", "your clean labelled images: one sub-folder per class, sorted names = class indices")
    unlabeled_dir: str = flag("", "your unlabelled images for stage 2, any layout (labels ignored)")
    test_dir: str = flag("", "your labelled test images, same class folders, for ACC (and ASR of a rebuilt trigger)")
    backdoorbench: str = flag("", "a BackdoorBench record folder (record/NAME): its model, data, poisoned pool and "
                                  "bd_test; writes NAME/defense/ftt/ as its defences do (docs/your-model.md)")
    clean_index: str = flag("", "with --backdoorbench: the clean subset's training-set indices, one per line "
                                "(BackdoorBench's --index file)")
    # the run
    seed: int = flag(0, "seed of poisoning, splits, init and training")
    device: str = flag("auto", "auto (CUDA when present), cpu, cuda, cuda:N")
    data_root: str = flag("./data", "where datasets are read from or downloaded to")
    out: str = flag("runs/ftt", "results JSON, log and purified backbone go here")
    cache: str = flag("./cache", "fitted triggers and reference models are cached here")
    overwrite: bool = flag(False, "allow an --out that already holds results or a checkpoint")
    resume: bool = flag(False, "continue the killed run in --out from its last finished epoch")
    channels_last: bool = flag(True, "NHWC memory format (faster convolutions, CPU and GPU)")
    keep_memory: bool = flag(True, "CPU: freed memory stays in the process for the next step, not the OS (glibc; "
                                   "training steps 1.1-1.4x faster)")
    compile: bool = flag(False, "torch.compile the attacker's training (with reduce-overhead on a GPU: 2.5x)")
    compile_mode: str = flag("reduce-overhead", "torch.compile's mode with --compile",
                             choices=("default", "reduce-overhead", "max-autotune"))
    eval_every: int = flag(10, "evaluate ACC and ASR every N epochs of each stage, and after the last (0: last only)")
    bn_diagnostic: bool = flag(False, "ACC/ASR also with BatchNorm re-estimated on weak pool views, before and after "
                                      "each stage (results' bn_pool; about 8 s each on 2 cores)")
    quiet: bool = flag(False, "no per-epoch lines")


class DataError(Exception):
    """A dataset that is missing or unreadable; the CLI prints it as one line."""


class ConfigError(Exception):
    """A flag with a value that cannot work; the CLI prints it as one line and exits with 2."""


# ================================================================================================
# Device and precision: the one place that decides
# ================================================================================================

def pick_device(name: str, keep_memory: bool = True) -> torch.device:
    """auto: CUDA when there is one. On CUDA, cuDNN picks the fastest convolution algorithm for each shape
    once (cudnn.benchmark): the shapes here repeat for whole stages. On CPU, keep_memory: keep_freed_memory()."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    elif keep_memory:
        keep_freed_memory()
    return device


def keep_freed_memory() -> bool:
    """glibc gives every freed block over 32 MiB (a CPU training step's activations) back to the OS, so each step
    faults its memory in afresh, a fifth of a 2-core step spent in the kernel (docs/results.md); torch has no switch
    for it. mallopt keeps it in the process for the next step: M_MMAP_MAX 0, M_TRIM_THRESHOLD 2 GiB. For the whole
    process, from now on. -> False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc.mallopt(-4, 0) == 1 and libc.mallopt(-1, 2 ** 31 - 1) == 1  # M_MMAP_MAX, M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


def autocast(device: torch.device):
    """bf16 autocast on CUDA (no GradScaler needed for bf16); full fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def to_input(x: Tensor, channels_last: bool = True) -> Tensor:
    """uint8 images (B, C, H, W) -> float32 in [0, 1], the input every backbone here takes."""
    x = x.float().div_(255)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# ================================================================================================
# Flags: refuse impossible settings before any data is read or anything is written
# ================================================================================================

def known_arch(arch: str) -> bool:
    m = re.fullmatch(r"wrn(\d+)-(\d+)", arch)
    return arch in ARCHS or bool(m and (int(m[1]) - 4) % 6 == 0) or bool(re.fullmatch(r"tv:\w+", arch))


def validate(cfg) -> None:
    """cfg: an ftt.Config. Raises ConfigError naming the flag. (--normalize's syntax: loading.normalization.)"""
    choices = {"dataset": DATASETS, "arch": ARCHS, "attack": ATTACK_CHOICES, "ssl_pool": SSL_POOLS}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed and not (name == "arch" and known_arch(cfg.arch)):
            raise ConfigError(f"--{name}: {getattr(cfg, name)!r} is not one of {', '.join(allowed)}"
                              + (", wrnD-K with D = 6n + 4 or tv:NAME (torchvision)" if name == "arch" else ""))
    for name, lo, hi in (("poison_rate", 0, 1), ("clean_ratio", 0, 1)):
        if not lo < getattr(cfg, name) < hi:
            raise ConfigError(f"--{name.replace('_', '-')}: {getattr(cfg, name)} must lie in ({lo}, {hi})")
    if not (cfg.pool_poison_share == -1 or 0 <= cfg.pool_poison_share <= 0.75):
        raise ConfigError(f"--pool-poison-share: {cfg.pool_poison_share} must be -1 or lie in [0, 0.75]")
    if not 0 <= cfg.threshold <= 1:
        raise ConfigError(f"--threshold: {cfg.threshold} must lie in [0, 1]")
    if not 0 <= cfg.ema < 1:
        raise ConfigError(f"--ema: {cfg.ema} must lie in [0, 1) (0: no average)")
    for name in ("attack_epochs", "reference_epochs", "sad_epochs", "ssl_epochs", "train_size", "test_size", "eval_every"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')}: {getattr(cfg, name)} must be >= 0")
    for name in ("attack_batch", "batch_size", "mu", "attack_lr", "sad_lr", "sad_lr_max", "ssl_lr"):
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"--{name.replace('_', '-')}: {getattr(cfg, name)} must be > 0")
    if getattr(cfg, "suspect_draws", 1) < 1:
        raise ConfigError(f"--suspect-draws: {cfg.suspect_draws} must be >= 1 (1: each labelled image once a cycle)")
    if getattr(cfg, "suspect_draws", 1) > 1 and cfg.ssl_pool != "drop-suspect":
        raise ConfigError(f"--suspect-draws {cfg.suspect_draws}: needs --ssl-pool drop-suspect (with all of the pool "
                          f"the suspect class has its pool images, and no class is drawn more often)")
    for name in ("unlearn", "teacher_weight"):  # a negative weight would train toward what it should avoid
        if getattr(cfg, name, 0.0) < 0:
            raise ConfigError(f"--{name.replace('_', '-')}: {getattr(cfg, name)} must be >= 0 (0: off)")
    if getattr(cfg, "teacher", "none") != "none" and cfg.ssl_forward == "split":
        raise ConfigError(f"--teacher {cfg.teacher}: needs --ssl-forward one or two (a pass its loss can train); "
                          f"with --ssl-forward split give --teacher none")
    for name, of in (("stamp", "labelled images"), ("stamp_pool", "strong views of the pool")):
        if not 0 <= getattr(cfg, name, 0) <= 1:
            raise ConfigError(f"--{name.replace('_', '-')}: {getattr(cfg, name)} must lie in [0, 1] (a share of stage 2's "
                              f"{of}; 0: off)")
    if not 0 <= getattr(cfg, "sad_early_check", 0) < 1:
        raise ConfigError(f"--sad-early-check: {cfg.sad_early_check} must lie in [0, 1) (0: the check at the end only)")
    if not 0 <= getattr(cfg, "holdout", 0) < 1:
        raise ConfigError(f"--holdout: {cfg.holdout} must lie in [0, 1)")
    if getattr(cfg, "holdout_unseen", 0) and (cfg.holdout_unseen < 0 or not cfg.train_size or cfg.holdout
                                                or cfg.clean_dir):
        raise ConfigError(f"--holdout-unseen: {cfg.holdout_unseen} needs --dataset with --train-size (the images past "
                          f"it are the unseen ones) and no --holdout beside it")
    if not 0 <= getattr(cfg, "ssl_bn_momentum", 0) <= 1:
        raise ConfigError(f"--ssl-bn-momentum: {cfg.ssl_bn_momentum} must lie in [0, 1] (0: the model's own)")
    if cfg.sad_lr_max < cfg.sad_lr:
        raise ConfigError(f"--sad-lr-max: {cfg.sad_lr_max} is below --sad-lr {cfg.sad_lr}; give both (equal: SAD runs once)")
    if cfg.target < 0:
        raise ConfigError(f"--target: {cfg.target} must be a class index >= 0")
    for name in ("model", "reference_model", "trigger"):
        path = getattr(cfg, name)
        if path and not Path(path).is_file():
            raise ConfigError(f"--{name.replace('_', '-')}: {path} is not a readable file")
    if cfg.reference_model and cfg.attack not in attacks.FITTED:
        raise ConfigError(f"--reference-model: {cfg.attack} uses no reference model; only "
                          f"{', '.join(attacks.FITTED)} are fitted on one")
    for name in ("clean_index",):
        path = getattr(cfg, name, "")
        if path and not Path(path).is_file():
            raise ConfigError(f"--{name.replace('_', '-')}: {path} is not a readable file")
    for name in ("clean_dir", "unlabeled_dir", "test_dir"):
        path = getattr(cfg, name)
        if path and not Path(path).is_dir():
            raise ConfigError(f"--{name.replace('_', '-')}: {path} is not a readable folder")
        if path and not cfg.clean_dir:
            raise ConfigError(f"--{name.replace('_', '-')}: needs --clean-dir (your own labelled clean images)")
    if cfg.clean_dir and not cfg.model:
        raise ConfigError("--clean-dir: needs --model, the backbone to purify (there is no attacker to train one)")
    if cfg.clean_dir and cfg.attack in attacks.FITTED:
        raise ConfigError(f"--attack: {cfg.attack} is fitted to the attacker's own model, so its ASR cannot be measured "
                          f"on your data; with --clean-dir use badnets, blended, wanet or none")
    if getattr(cfg, "clean_index", "") and not cfg.backdoorbench:
        raise ConfigError("--clean-index: only with --backdoorbench (a --dataset run draws its clean subset by --seed)")
    if getattr(cfg, "clean_label", False) and cfg.attack not in ("badnets", "blended", "patch"):
        raise ConfigError(f"--clean-label: poisons with a fixed trigger (badnets, blended, patch), not {cfg.attack}")
    if cfg.attack == "none" and not cfg.model:
        raise ConfigError("--attack: none needs --model, the model to purify (there is no attack to backdoor one with)")
    if cfg.attack == "patch" and not cfg.trigger:
        raise ConfigError("--attack: patch needs --trigger FILE.png (an image with alpha of the input size)")
    if cfg.trigger and cfg.attack != "patch":
        raise ConfigError(f"--trigger: only with --attack patch (here --attack {cfg.attack})")
    if cfg.backdoor_dir and not Path(cfg.backdoor_dir).is_dir():
        raise ConfigError(f"--backdoor-dir: {cfg.backdoor_dir} is not a readable folder")
    if cfg.backdoor_dir and not cfg.model:
        raise ConfigError("--backdoor-dir: needs --model (a run that trains its own attacker measures ASR with its trigger)")
    out = Path(cfg.out)
    if cfg.resume and (out / "results.json").exists():
        raise ConfigError(f"--resume: {out} holds results.json, the run finished; nothing to resume")
    if cfg.resume and not (out / "checkpoint.pt").is_file():
        raise ConfigError(f"--resume: {out} holds no checkpoint.pt to continue from")
    if not cfg.resume and not cfg.overwrite:
        for name, what in (("results.json", "results"), ("checkpoint.pt", "the checkpoint of an unfinished run")):
            if (out / name).exists():
                raise ConfigError(f"--out: {out} already holds {what} ({name}); pass "
                                  f"{'--resume to continue it, ' if name == 'checkpoint.pt' else ''}--overwrite, "
                                  f"or choose another --out")
    probe = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise ConfigError(f"--out: {out} cannot be written ({probe} is not a writable folder)")


# ================================================================================================
# Optimiser, schedules, and what every training step shares
# ================================================================================================

def sgd(params, lr: float, cfg, nesterov: bool = False, decay_all: bool = True) -> torch.optim.SGD:
    """SGD with the run's momentum and weight decay, one fused kernel per step on CUDA (foreach on CPU).
    decay_all=False: no weight decay on tensors of one dimension (biases, BatchNorm's weights), as FixMatch."""
    params = list(params)
    fused = bool(params) and params[0].is_cuda
    groups = [{"params": params}] if decay_all else [{"params": [q for q in params if q.dim() > 1]},
                                                     {"params": [q for q in params if q.dim() <= 1], "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=nesterov,
                           fused=fused or None, foreach=None if fused else True)


def cosine(opt: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / max(total_steps, 1), 1))))


def lr_ladder(start: float, top: float) -> list[float]:
    """SAD's lr ladder: start, then 1-3-10 steps up to top: (0.01, 0.1) -> [0.01, 0.03, 0.1]; top <= start -> [start]."""
    steps = [float(f"{start * 10 ** (i // 2) * (3 if i % 2 else 1):.12g}") for i in range(1, 40)]  # x3, x10, x30, ...
    return [start] + [lr for lr in steps if lr <= top * (1 + 1e-9)]


def step_decay(opt: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The common third-party recipe: the lr times 0.1 after half of the steps and again after three quarters."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.1 ** ((s >= total_steps // 2) + (s >= 3 * total_steps // 4)))


def burst_decay(opt: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """NAD's released schedule (utils/util.py, adjust_learning_rate): lr 0.1 for 2 of its 20 epochs, then 0.01.
    Here: the full lr for the first 10% of the steps, then a tenth of it."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s < round(0.1 * total_steps) else 0.1)


def nad_released(epochs_full: int = 2):
    """NAD's adjust_learning_rate counted in epochs, not shares: the full lr for its first 2 epochs, then a tenth
    (0.1 -> 0.01). -> schedule(opt, total_steps, steps_per_epoch)."""
    return lambda opt, total_steps, steps_per_epoch: torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 1.0 if s < epochs_full * steps_per_epoch else 0.1)


SCHEDULES = {"cosine": cosine, "step": step_decay, "nad": burst_decay}


def descend(opt: torch.optim.Optimizer, sched, loss: Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()


def check_finite(loss: Tensor, stage: str, epoch: int, step: int) -> None:
    """Stop at once on a non-finite loss (a host synchronisation: for loops outside the hot path)."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss ({loss.item()}) in {stage}, epoch {epoch}, step {step}; stopping")


class FiniteWatch:
    """The training loops' check_finite without a host synchronisation per step: the first step whose
    loss is not finite is noted on the device, and check() reads it once, at the end of the epoch."""

    def __init__(self, device: torch.device):
        self.first = torch.full((), -1, dtype=torch.long, device=device)

    def see(self, loss: Tensor, step: int) -> None:
        self.first = torch.where((self.first < 0) & ~torch.isfinite(loss.detach()), step, self.first)

    def check(self, stage: str, epoch: int) -> None:
        step = int(self.first)
        if step >= 0:
            raise FloatingPointError(f"non-finite loss in {stage}, epoch {epoch}, step {step}; stopping")


@contextmanager
def bn_momentum(model: nn.Module, momentum: float):
    """Every BatchNorm layer of model updates its running statistics with this momentum inside the block (torch's
    convention: new = (1 - momentum) old + momentum batch), and with its own again after it."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = momentum
    try:
        yield
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom


def frozen_bn_stats(model: nn.Module):
    """BatchNorm layers in train mode normalise with the batch's statistics as usual, but leave their
    running statistics as they are (momentum 0): for SSL's no-grad weak-view pass."""
    return bn_momentum(model, 0.0)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """FixMatch's exponential moving average of the weights: ema <- d ema + (1 - d) model, with
    d = min(decay, (1 + step) / (10 + step)) so that a short run is not dominated by the starting weights
    (TensorFlow's ExponentialMovingAverage with num_updates). Buffers (BatchNorm statistics) are copied."""
    d = min(decay, (1 + step) / (10 + step))
    # (torch.optim.swa_utils.AveragedModel would read its step counter from the device at every update: a host
    # synchronisation per step, and it averages the BatchNorm statistics instead of copying them)
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - d)
    buffers = list(ema.buffers())
    if buffers:
        torch._foreach_copy_(buffers, list(model.buffers()))


# ================================================================================================
# Evaluation: ACC, ASR and RA
# ================================================================================================

EVAL_BATCH = 256  # 2 cores, WRN-16-1: 1.1x the images/s of 1024, 2x without --keep-memory (bench.py's predict rows)


@torch.no_grad()
def predictions(model: nn.Module, x: Tensor, device: torch.device, channels_last: bool = True,
                batch: int = EVAL_BATCH) -> Tensor:
    """Predicted classes (N,) of model on uint8 images x (N, C, H, W), left on the device; eval mode."""
    model.eval()
    out = [torch.zeros(0, dtype=torch.long, device=device)]
    for i in range(0, len(x), batch):
        with autocast(device):
            out.append(model(to_input(x[i:i + batch].to(device), channels_last)).argmax(1))
    return torch.cat(out)


@torch.no_grad()
def logits_of(model: nn.Module, x: Tensor, device: torch.device, channels_last: bool = True,
              batch: int = EVAL_BATCH) -> Tensor:
    """Float logits (N, K) of model on uint8 images x (N, C, H, W), N > 0, left on the device; eval mode."""
    model.eval()
    out = []
    for i in range(0, len(x), batch):
        with autocast(device):
            out.append(model(to_input(x[i:i + batch].to(device), channels_last)).float())
    return torch.cat(out)


def stamped_to_suspect(model: nn.Module, check, rgba: Tensor) -> float:
    """ftt.purify's backdoor reading, an ASR without the attacker's trigger (check: its PoolCheck): the share (%) of
    2,000 pool-probe images the backdoored model puts outside the suspect class that `model` puts in it once they
    carry the patch rgba."""
    x = check.probe[check.pred != check.suspect][:2000]
    return round(hit_rate(check.predict_on(model, attacks.patch(x, rgba)), torch.tensor(check.suspect)), 2)


def read_patch(check, moved_out: Tensor, x_l: Tensor, results: dict, models: dict) -> Tensor | None:
    """The patch (rgba) most of the images SAD moved out of the suspect class (moved_out, uint8 (N, C, H, W)) hold and
    the clean subset x_l does not (attacks.recover_patch), or None; results["patch"] (the first time): its pixels
    [row, col, colour] and stamped_to_suspect of `models` (name -> model). --stamp trains with it."""
    rgba = attacks.recover_patch(moved_out, x_l) if len(moved_out) >= 50 else None  # fewer: no share to read
    if "patch" not in results:  # (a resumed stage 2 has them, and no backdoored or SAD model to read)
        at = (rgba[-1] > 0).nonzero().tolist() if rgba is not None else []
        read = {n: stamped_to_suspect(m, check, rgba) for n, m in models.items()} if at else {}
        results["patch"] = {"from": len(moved_out), "pixels": [[r, c, rgba[:-1, r, c].tolist()] for r, c in at],
                            "to_suspect": read}
    p, s = results["patch"], check.suspect
    print(f"ftt: pool check: {len(p['pixels'])} pixels hold one colour in most of the {p['from']} pool images SAD moved "
          f"out of class {s}" + (f"; pasted on pool images of other classes, they send {p['to_suspect']} % to it (a "
                                 f"patch trigger read back)" if p["pixels"] else ": no patch trigger to read"), flush=True)
    return rgba


def unpatched_set(x_dropped: Tensor, rgba: Tensor, moved: Tensor) -> Tensor:
    """--readmit unpatched: the indices of the images drop-suspect left out that hold the patch read back at none of
    its pixels (attacks.carries_patch) and are not in `moved` (ftt.py --unlearn's: SAD moved them out): the class's own."""
    keep = ~attacks.carries_patch(x_dropped, rgba).cpu()
    keep[moved] = False
    return torch.nonzero(keep).flatten()


def bias_for_share(z: Tensor, c: int, share: float) -> float:
    """The least raise d of class c's logit (bisection, 30 steps, then just past the boundary: a layer's own arithmetic
    may round a tie the other way) for which c is the argmax of at least `share` of the rows of z (N, K); 0 if it
    already is. ftt.py --prior-shift adds it to the head's bias."""
    hits = lambda d: float((torch.cat([z[:, :c], z[:, c:c + 1] + d, z[:, c + 1:]], 1).argmax(1) == c).float().mean())
    if hits(0.0) >= share:
        return 0.0
    lo, hi = 0.0, float((z.amax(1) - z[:, c]).max()) + 1.0
    for _ in range(30):
        lo, hi = (lo, (lo + hi) / 2) if hits((lo + hi) / 2) >= share else ((lo + hi) / 2, hi)
    return hi + 1e-4


def hit_rate(pred: Tensor, y: Tensor) -> float:
    """% of predictions equal to the labels (read once); NaN when there are none."""
    if len(pred) == 0:
        return float("nan")
    return 100.0 * int((pred == y.to(pred.device)).sum()) / len(pred)


def held_out_rates(pred: Tensor, y: Tensor, suspect: int | None, pool_pred: Tensor | None = None,
                   y_labelled: Tensor | None = None, k: int = 0) -> dict:
    """ACC on held-out clean images (no stage trains on them) from their predictions, and on the suspect class's alone;
    with the pool's predictions (pool_pred) and the clean subset's labels, net_excess as "pool_net_pp" too."""
    own = y == (suspect if suspect is not None else -1)
    net = pool_pred is not None and y_labelled is not None and suspect is not None
    return {"acc_held_out": hit_rate(pred, y),
            **({"acc_held_out_suspect": hit_rate(pred[own], y[own])} if own.any() else {}),
            **({"pool_net_pp": net_excess(pool_pred, pred, y, y_labelled, suspect, k)} if net else {})}


def net_excess(pool_pred: Tensor, pred: Tensor, y: Tensor, y_labelled: Tensor, suspect: int, k: int) -> float:
    """Beyond the paper, a reading of the backdoor from held-out clean images (pred: the model's predictions of them,
    y: their labels): the share of the pool the model puts in class `suspect` minus the share its own errors would
    give a clean pool, sum_c prior_c P(pred = suspect | y = c), priors from the clean subset's labels y_labelled; in
    points. About the pool's poisoned share times its ASR wherever the model's recall of that class went (the pool
    check's plain excess falls with that recall). A class with no held-out image counts 0."""
    y, pred = y.cpu(), pred.cpu()
    prior = torch.bincount(y_labelled.cpu(), minlength=k).double() / len(y_labelled)
    to_suspect = torch.bincount(y[pred == suspect], minlength=k).double() / torch.bincount(y, minlength=k).clamp(min=1)
    pool_share = float((pool_pred.cpu() == suspect).double().mean())
    return round(100 * (pool_share - float((prior * to_suspect).sum())), 2)


def moved(pred_before: Tensor, pred_after: Tensor, suspect: int, k: int) -> tuple[int, float, float]:
    """Beyond the paper, the pool check's reading of a backdoor that moved: of the pool images the backdoored model put
    in the suspect class and the purified one does not, the class taking most. -> (it, its share of those images, of
    the pool); (-1, 0, 0): none left."""
    left = pred_after[(pred_before == suspect) & (pred_after != suspect)]
    if len(left) == 0:
        return -1, 0.0, 0.0
    counts = torch.bincount(left.cpu(), minlength=k)
    return int(counts.argmax()), float(counts.max()) / len(left), float(counts.max()) / len(pred_after)


def accuracy(model: nn.Module, x: Tensor, y: Tensor, device: torch.device, channels_last: bool = True,
             batch: int = EVAL_BATCH) -> float:
    """Top-1 accuracy in % of model on uint8 images x (N, C, H, W); the model is put in eval mode."""
    return hit_rate(predictions(model, x, device, channels_last, batch), y)


def evaluator(x_te: Tensor, y_te: Tensor, x_bd: Tensor, y_bd: Tensor, y_ra: Tensor | None, device: torch.device,
              channels_last: bool = True):
    """-> evaluate(model): (ACC, ASR), or (ACC, ASR, RA) where the triggered images' own classes y_ra are known.
    ACC on the clean test set; ASR: the triggered test images put in the target (y_bd); RA: the same images
    put in their own classes (a backdoor that moved to another class shows here and not in ASR). One pass
    over the triggered images gives ASR and RA."""
    def evaluate(model: nn.Module) -> tuple[float, ...]:
        acc = accuracy(model, x_te, y_te, device, channels_last)
        pred = predictions(model, x_bd, device, channels_last)
        return (acc, hit_rate(pred, y_bd)) + ((hit_rate(pred, y_ra),) if y_ra is not None else ())
    return evaluate


@torch.no_grad()
def bn_reestimated(model: nn.Module, x: Tensor, device: torch.device, augment, channels_last: bool = True,
                   batch: int = 256) -> nn.Module:
    """A copy of model whose BatchNorm running statistics are recomputed, a plain average over batches, on
    augment(x) (uint8): when that alone moves ACC, the statistics, not the weights, are what changed it."""
    m = copy.deepcopy(model).train()
    for bn in (layer for layer in m.modules() if isinstance(layer, nn.modules.batchnorm._BatchNorm)):
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # training's stream untouched
        torch.manual_seed(0)  # the same views whatever ran before: a resumed run measures what a whole one does
        for i in range(0, len(x), batch):
            m(to_input(augment(x[i:i + batch].to(device)), channels_last))
    return m.eval()


def measured(acc_asr: tuple[float, ...]) -> dict:
    """(ACC, ASR) or (ACC, ASR, RA) -> {"acc", "asr"[, "ra"]}, None where there was nothing to measure (JSON
    has no NaN)."""
    return {k: (None if math.isnan(v) else v) for k, v in zip(("acc", "asr", "ra"), acc_asr)}


def evaluation_due(epoch: int, epochs: int, every: int) -> bool:
    """--eval-every: evaluate every `every` epochs, and always after the last one (0: only the last)."""
    return epoch == epochs or (every > 0 and epoch % every == 0)


# ================================================================================================
# The run log: what the training loops report to
# ================================================================================================

def fmt_s(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min" if s < 5400 else f"{s / 3600:.1f} h"


class RunLog:
    """What the training loops report to; it evaluates and prints, the loops only count.
    A loop calls begin(stage, ...) once, step(images, epoch) per step, pause() when an epoch's training ends,
    then end_epoch(...), which evaluates (evaluate(model) -> (ACC, ASR[, RA])) when evaluation_due says so,
    prints one fixed-width line (loss parts, ACC and ASR, images/s, ETA of the stage and of the run) and
    appends one JSON line to `path` (OUT/log.jsonl). Inside a long epoch a line at most every `every_s`
    seconds. images/s counts training only. estimates: the estimated seconds of each stage, in run order,
    for the run's ETA."""
    every_s = 60.0

    def __init__(self, evaluate=None, every: int = 1, path: Path | None = None, quiet: bool = False,
                 estimates: dict | None = None):
        self.evaluates = evaluate is not None
        self.evaluate = evaluate or (lambda model: (float("nan"), float("nan")))
        self.every, self.path, self.quiet, self.estimates = every, path, quiet, dict(estimates or {})
        self.final = {}  # stage -> (ACC, ASR) of its last epoch, so that it is not evaluated twice

    def begin(self, stage: str, epochs: int, images_per_epoch: int, start: int = 1) -> None:
        self.stage, self.epochs, self.per_epoch, self.start = stage, epochs, images_per_epoch, start
        self.images, self.train_s, self.t0 = 0, 0.0, time.time()
        self.tick = self.last_line = time.time()
        names = list(self.estimates)
        self.later = sum(self.estimates[n] for n in names[names.index(stage) + 1:]) if stage in names else 0.0
        if 1 < start <= epochs and not self.quiet:
            print(f"{stage:>6} resumed after epoch {start - 1}/{epochs}", flush=True)

    def etas(self) -> tuple[float, float]:
        done = self.images / max(self.per_epoch * (self.epochs - self.start + 1), 1)
        stage = (time.time() - self.t0) * (1 - done) / max(done, 1e-9)
        return stage, stage + self.later

    def step(self, images: int, epoch: int) -> None:
        """Counts a step's images (host arithmetic only: no synchronisation) and prints a line inside a
        long epoch at most every every_s seconds."""
        self.images += images
        now = time.time()
        if now - self.last_line >= self.every_s and not self.quiet:
            stage, run = self.etas()
            rate = self.images / max(self.train_s + now - self.tick, 1e-9)
            print(f"{self.stage:>6} epoch {epoch:3d}/{self.epochs} | {self.images % self.per_epoch or self.per_epoch}"
                  f"/{self.per_epoch} images | {rate:6.0f} img/s | stage eta {fmt_s(stage)} | run eta {fmt_s(run)}",
                  flush=True)
            self.last_line = now

    def pause(self) -> None:
        """The epoch's training ends here (evaluation follows, off the images/s clock)."""
        self.train_s += time.time() - self.tick

    def end_epoch(self, epoch: int, model: nn.Module, parts: dict[str, float], lr: float) -> tuple:
        """Evaluate model if due (the last epoch's is kept for measure()), then print and log the epoch."""
        acc_asr = self.evaluate(model) if evaluation_due(epoch, self.epochs, self.every) else ()
        if epoch == self.epochs:
            self.final[self.stage] = acc_asr
        acc, asr, ra = (*acc_asr, float("nan"), float("nan"), float("nan"))[:3]
        rate = self.images / max(self.train_s, 1e-9)
        stage_eta, run_eta = self.etas()
        if self.path is not None:
            row = {"stage": self.stage, "epoch": epoch, "epochs": self.epochs, "lr": lr, **parts,
                   "acc": None if math.isnan(acc) else acc, "asr": None if math.isnan(asr) else asr,
                   **({} if math.isnan(ra) else {"ra": ra}), "images_per_s": rate, "elapsed_s": time.time() - self.t0}
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if not self.quiet:
            loss = " ".join(f"{k} {v:6.3f}" for k, v in parts.items())
            ev = f"acc {acc:5.2f} asr {asr:6.2f}" if not math.isnan(acc) else "acc     - asr      -"
            print(f"{self.stage:>6} epoch {epoch:3d}/{self.epochs} | {loss} | {ev} | {rate:6.0f} img/s | "
                  f"eta {fmt_s(stage_eta)}, run {fmt_s(run_eta)}", flush=True)
        self.tick = self.last_line = time.time()
        return acc_asr

    def measure(self, stage: str, model: nn.Module) -> tuple[float, ...]:
        """(ACC, ASR[, RA]) of model at the end of `stage`: the loop's own last evaluation when it ran one."""
        return self.final.pop(stage, None) or self.evaluate(model)


# ================================================================================================
# The resume state: one file per run, OUT/checkpoint.pt, rewritten at the end of every epoch of every stage.
# With --resume a run continues after the last finished epoch and, on CPU with the same seed, ends with the
# figures of a run that was never stopped (test_harness.py kills one to check).
# ================================================================================================

def save_atomic(obj, path: Path) -> None:
    """torch.save to a temporary file, then rename: a kill leaves the old file or the new, never half."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def join_pool(x_u: Tensor, teacher: Tensor | None, avoid: Tensor | None, x_new: Tensor, taught: Tensor | None = None,
              avoid_new: int = -1) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Stage 2's pool with x_new appended, and its per-image --teacher targets (taught; None: none, a zero row or -1)
    and --unlearn classes (avoid_new; -1: none) with it. -> (x_u, teacher, avoid)."""
    if teacher is not None:
        rows = teacher.new_zeros(len(x_new), *teacher.shape[1:]) - int(teacher.dim() == 1) if taught is None else taught
        teacher = torch.cat([teacher, rows.to(teacher.device)])
    if avoid is not None or avoid_new >= 0:
        own = avoid if avoid is not None else torch.full((len(x_u),), -1, device=x_u.device)
        avoid = torch.cat([own, torch.full((len(x_new),), avoid_new, device=x_u.device)])
    return torch.cat([x_u, x_new.to(x_u.device)]), teacher, avoid


def save_atomic_text(text: str, path: Path) -> None:
    """The same for a text file (results.json)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunState:
    """The run's position: stage, epoch, model, optimiser, scheduler, RNG states, results so far.
    `state` is the loaded file when resuming, else None; `results` is shared with the caller."""
    stages = ("attack", "sad", "ssl")

    def __init__(self, path: Path, cfg, results: dict):
        self.path, self.results, self.state = path, results, None
        if cfg.resume:
            try:
                self.state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise ConfigError(f"--resume: {path} cannot be read ({type(e).__name__}); start again with --overwrite") from None
            keep = {"resume", "overwrite", "quiet", "device"}  # flags that may change on resume
            for k, v in self.state["config"].items():
                if k not in keep and hasattr(cfg, k) and getattr(cfg, k) != v:
                    raise ConfigError(f"--resume: the checkpoint was made with --{k.replace('_', '-')} {v}, "
                                      f"this run has {getattr(cfg, k)}; resume with the same flags")
            results.update(self.state["results"])
        self.config = dataclasses.asdict(cfg)

    def done(self, stage: str) -> bool:
        """True when the saved run is past `stage` (its results are in self.results)."""
        return self.state is not None and self.stages.index(self.state["stage"]) > self.stages.index(stage)

    def save(self, stage: str, epoch: int, model: nn.Module, opt, sched, extra: dict | None = None) -> None:
        if not all(torch.isfinite(p).all() for p in model.parameters()):  # keep the last good one
            raise FloatingPointError(f"non-finite weights at the end of {stage}, epoch {epoch}; stopping")
        save_atomic({"stage": stage, "epoch": epoch, "model": model.state_dict(), "opt": opt.state_dict(),
                     "sched": sched.state_dict(), "extra": extra or {}, "results": dict(self.results),
                     "config": self.config, "rng": torch.get_rng_state(),
                     "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}, self.path)

    def restore(self, stage: str, model: nn.Module, opt, sched, match: dict | None = None) -> tuple[int, dict]:
        """-> (first epoch to run, extra loop state). Loads everything if the saved run stopped in `stage`
        (and its extra state holds `match`: SAD's lr, so that one attempt never resumes another)."""
        st = self.state
        if st is None or st["stage"] != stage or any(st["extra"].get(k) != v for k, v in (match or {}).items()):
            return 1, {}
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        torch.set_rng_state(st["rng"])
        if st["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(st["cuda_rng"])
        return st["epoch"] + 1, st["extra"]


# ================================================================================================
# Plain supervised training: the attacker's recipe, and fine-tuning (baselines.py)
# ================================================================================================

def supervised_forward(model: nn.Module, xb: Tensor, yb: Tensor, cfg, device: torch.device) -> Tensor:
    """Cross-entropy of model on the (augmented) uint8 batch xb."""
    with autocast(device):
        return F.cross_entropy(model(to_input(xb, cfg.channels_last)).float(), yb)


def train_supervised(model: nn.Module, epoch_data, epochs: int, lr: float, batch: int, cfg,
                     device: torch.device, stage: str, log: RunLog, augment: bool = True,
                     state: RunState | None = None, schedule=cosine, nesterov: bool = False) -> None:
    """Plain cross-entropy training with crop + flip. epoch_data(epoch) -> (x uint8, y) for that epoch:
    ATTEQ-NN alternates poisoned and benign epochs."""
    n = len(epoch_data(0)[0])
    opt = sgd(model.parameters(), lr, cfg, nesterov)
    sched = schedule(opt, epochs * math.ceil(n / batch))
    start, _ = state.restore(stage, model, opt, sched) if state else (1, {})
    log.begin(stage, epochs, n, start)
    for epoch in range(start, epochs + 1):
        x, y = epoch_data(epoch - 1)
        model.train()
        total, watch, lr_now = torch.zeros((), device=device), FiniteWatch(device), sched.get_last_lr()[0]
        perm = torch.randperm(len(x), device=x.device)
        for step, i in enumerate(range(0, len(x), batch)):
            idx = perm[i:i + batch]
            loss = supervised_forward(model, random_crop_flip(x[idx]) if augment else x[idx], y[idx], cfg, device)
            watch.see(loss, step)
            descend(opt, sched, loss)
            total += loss.detach() * len(idx)
            log.step(len(idx), epoch)
        log.pause()
        watch.check(stage, epoch)
        if state:
            state.save(stage, epoch, model, opt, sched)
        log.end_epoch(epoch, model, {"ce": float(total) / len(x)}, lr_now)


# ================================================================================================
# The start estimate: a few real steps of each kind, timed, before anything trains
# ================================================================================================

def time_step(step, device: torch.device, reps: int = 1) -> float:
    """Seconds of one call of step(): the fastest of `reps` timed calls after one untimed (a fresh model's
    first calls run slow: on 2 cores the median of two overestimated a 15.6-minute run as 20.6)."""
    step()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return min(times)


def estimate_run(cfg, arch: str, counts: dict, device: torch.device, train_attacker: bool, steps_for) -> dict[str, float]:
    """Seconds of each stage (attack, sad, ssl) of a run, from a few timed training steps of each kind and one
    evaluation batch; the run's random state is left as it was. counts: the sizes of the training set, clean
    subset, unlabelled pool, test and backdoor test sets. steps_for(arch) -> {stage: (module, loss(module)),
    "eval": (model, x, y)}: the method's own steps on random images (bench.training_steps)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        kinds = steps_for(arch)

        def training_step(module: nn.Module, loss):
            """One step of the loops' kind: loss(module) -> the step's loss, then descend (own optimiser per kind)."""
            opt = sgd(module.parameters(), 1e-3, cfg)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
            return lambda: descend(opt, sched, loss(module.train()))

        model, x, y = kinds["eval"]
        n_eval = lambda epochs: sum(evaluation_due(e, epochs, cfg.eval_every) for e in range(1, epochs + 1))
        eval_s = time_step(lambda: accuracy(model, x, y, device, cfg.channels_last), device, 1) / len(x)
        eval_set = (counts["test"] + counts["backdoor_test"]) * eval_s
        steps_ssl = max(counts["unlabelled"] // (cfg.mu * cfg.batch_size), 1) * cfg.ssl_epochs if counts["unlabelled"] else 0
        timed = lambda stage: time_step(training_step(*kinds[stage]), device, 3)
        est = {"attack": cfg.attack_epochs * math.ceil(counts["train"] / cfg.attack_batch) * timed("attack")
               if train_attacker and cfg.attack_epochs else 0.0,
               "sad": cfg.sad_epochs * math.ceil(counts["clean"] / cfg.batch_size) * timed("sad") if cfg.sad_epochs else 0.0,
               "ssl": steps_ssl * timed("ssl") if steps_ssl else 0.0}
        evals = {"attack": n_eval(cfg.attack_epochs) if train_attacker else 0, "sad": n_eval(cfg.sad_epochs),
                 "ssl": n_eval(cfg.ssl_epochs) if steps_ssl else 0}
        return {stage: est[stage] + evals[stage] * eval_set for stage in est}


def start_line(cfg, est: dict[str, float], device: torch.device, counts: dict, train_attacker: bool,
               steps_for) -> str:
    """The line printed before any training: the device, the estimated time of the run, and where that is
    hours, what to run instead."""
    total = sum(est.values())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    parts = ", ".join(f"{stage} {fmt_s(s)}" for stage, s in est.items() if s)
    line = (f"ftt: device {device} ({name}) | estimated {fmt_s(total)} for the whole run ({parts}; from timed steps"
            f"{' without torch.compile time' if cfg.compile else ''})")
    if total > 3600:
        alt = ""
        if cfg.arch != "wrn16-1" and not cfg.model:
            wrn = sum(estimate_run(cfg, "wrn16-1", counts, device, train_attacker, steps_for).values())
            alt = f", or the paper's smaller setting --arch wrn16-1 (about {fmt_s(wrn)} here)"
        line += (f"\nftt: that is hours on this machine. For a quick replication on a CPU run ./reproduce.sh quick "
                 f"(Fashion-MNIST, WRN-16-1, all attacks and defences: about 40 min on 2 cores){alt}")
    return line


# ================================================================================================
# Results: provenance, the table, results.json
# ================================================================================================

def versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "cuda": torch.version.cuda, "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()}


def results_table(title: str, results: dict) -> str:
    """The run's results as a Markdown table: before, every SAD attempt, SAD+SSL (ASR, ACC, RA, pool excess)."""
    fmt = lambda v: "-" if v is None else f"{v:.2f}"
    pool = lambda r: f"{r['pool']['excess_pp']:+.2f} (class {r['pool']['class']})" if "pool" in r else "-"
    sad = results.get("sad") or {}
    rows = [("before", results.get("before"))]
    rows += [(f"FTT (SAD, lr {r['lr']}, pool check failed"
              + (f" after epoch {r['stopped_after_epoch']})" if "stopped_after_epoch" in r else ")"), r)
             for r in results.get("sad_tried", [])]
    rows += [(f"FTT (SAD, lr {sad['lr']})" if "lr" in sad else "FTT (SAD)", results.get("sad")),
             ("FTT (SAD+SSL)", results.get("ssl"))]
    lines = [f"| {title} | ASR % | ACC % | RA % | pool excess, points (no trigger needed) |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {fmt(r.get('asr'))} | {fmt(r.get('acc'))} | {fmt(r.get('ra'))} | {pool(r)} |" for name, r in rows if r]
    return "\n".join(lines)


# ================================================================================================
# The command line: flags are a dataclass's fields
# ================================================================================================

class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line naming the flag, exit code 2 (argparse adds a usage block)
        print(f"{self.prog}: {message}", file=sys.stderr)
        sys.exit(2)


def add_flags(ap: argparse.ArgumentParser, cls, help: bool = True) -> None:
    """One flag per field of the dataclass cls: --field-name (or metadata["flag"]), its type, default, choices;
    cls's own fields first (ftt.Config's method, then RunConfig's experiment and run)."""
    own = cls.__dict__.get("__annotations__", {})
    for f in sorted(dataclasses.fields(cls), key=lambda f: f.name not in own):
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        kw = {"dest": f.name, "default": f.default}
        if help:
            kw["help"] = f.metadata.get("help", "") + " (default: %(default)s)"
        if f.type in ("bool", bool):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif f.type in ("int", "float", "str"):
            ap.add_argument(flag, type={"int": int, "float": float, "str": str}[f.type],
                            choices=f.metadata.get("choices"), **kw)


def parse_config(cls, argv: list[str] | None, prog: str = "ftt", description: str = ""):
    """argv -> cls(**flags); an unknown flag or a bad value: one line on stderr, exit code 2."""
    ap = OneLineParser(prog=prog, description=description, allow_abbrev=False)
    add_flags(ap, cls)
    return cls(**vars(ap.parse_args(argv)))


def run_cli(prog: str, run, out: str | Path) -> int:
    """Call run(); a bad flag or a missing dataset: one line on stderr, exit code 2; a non-finite loss: one
    line naming the resume state kept in `out`, exit code 1."""
    try:
        run()
    except (DataError, ConfigError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # the checkpoint of the last finished epoch is left as it was
        path = Path(out) / "checkpoint.pt"
        if path.exists():
            st = torch.load(path, map_location="cpu", weights_only=True)
            kept = f"the last good checkpoint is kept: {path} ({st['stage']}, epoch {st['epoch']})"
        else:
            kept = "no epoch had finished, so there is no checkpoint"
        print(f"{prog}: {e}; {kept}", file=sys.stderr)
        return 1
    return 0
