"""FTT: From Toxic to Trustworthy (Zhang et al., AAAI 2024), a reference implementation of its two stages.

Stage 1, SAD: early exits after every stage but the last; train on a small clean labelled set with the
exit-weighted cross-entropy (eq. 1) plus the attention presentation loss to the deepest feature (eq. 2-5).
Stage 2, SSL: the poisoned pool, labels thrown away, joins through per-exit FixMatch pseudo-labels (eq. 6, 7).
Measured (docs/results.md, 2 CPU cores), at the defaults on five backdoored WRN-16-1 models other groups released:
ASR 99.69 -> 2.34, ACC 84.87 -> 84.96 (means; `./reproduce.sh third-party-table`). The paper's +9 from SSL did not appear.

  eq. (1)  exit_weights, exit_cross_entropy     eq. (5)  ap_loss, reduce_ap (the batch reduction is ours)
  eq. (2)  attention_sum                        eq. (6)  pseudo_labels
  eq. (3)  attention_sum_p                      eq. (7)  sad_loss (labelled half), ssl_loss (unlabelled half)
  eq. (4)  attention_max_p                      stages   stage1_sad, stage2_ssl; library entry point: purify
Beyond the paper (marked so): the pool check, SAD's lr ladder, drop-suspect, --teacher, --unlearn, --stamp, other flags.
Beside it: augment.py (views), loading.py (checkpoints, data), harness.py (log, resume, CLI), attacker.py (attacks).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from attacks import patch
from augment import cutout, rand_augment, random_crop_flip
from harness import (ARCHS, SSL_POOLS, SCHEDULES, FiniteWatch, RunConfig, RunLog, RunState, autocast, bias_for_share,
                     bn_momentum, bn_reestimated, cosine, descend, ema_update, flag, frozen_bn_stats, held_out_rates,
                     hit_rate, join_pool, logits_of, lr_ladder, measured, moved, parse_config, predictions, read_patch,
                     run_cli, sgd, stamped_to_suspect, to_input, unpatched_set, versions)
from loading import finish, prepare, torchvision_backbone

Tensor = torch.Tensor
SSL_STEPS, SSL_EXITS, SSL_EPOCHS = ("split", "one", "two"), ("all", "deep"), ("joined", "kept")  # their flags' choices
TEACHERS, READMIT = ("none", "hard", "soft"), ("none", "pseudo", "taught", "unpatched")  # --teacher's and --readmit's


# ================================================================================================
# Config: the method's knobs (its flags). Defaults: the paper's CIFAR-10 setting, budgets for 2 CPU cores (docs/results.md)
# ================================================================================================

@dataclass
class Config(RunConfig):
    """Every knob of the method (one line each); the experiment's and the run's are harness.RunConfig's.
    `python ftt.py --help` prints the method's first."""
    # stage 1: SAD
    sad_epochs: int = flag(20, "stage 1 epochs over the clean subset (NAD's budget)")
    sad_lr: float = flag(0.01, "stage 1 SGD lr, the first rung of the lr ladder")
    sad_lr_max: float = flag(0.1, "top of the lr ladder (SAD climbs 1-3-10 steps while the pool check fails); FT/FP/NAD's")
    sad_early_check: float = flag(0.25, "beyond the paper: the pool check also after this share of a SAD attempt (0: off)")
    sad_schedule: str = flag("cosine", "stage 1, FT, NAD lr: cosine, or nad (/10 after 10%%)", choices=("cosine", "nad"))
    # eq. (5)-(7)
    beta: float = flag(0.03, "weight of the AP loss, eq. (7) (paper: 0.03)")
    lambda_u: float = flag(1.0, "weight of the unlabelled half of eq. (7) (paper: 1; FixMatch's lambda_u)", flag="--lambda")
    p: float = flag(2.0, "exponent of the attention operator A^p_sum, eq. (3) (paper: 2)")
    detach_deep: bool = flag(True, "treat F_D as a fixed teacher in eq. (5) (else mutual distillation)")
    ap_reduce: str = flag("sum", "eq. (5) over a batch: the distances' mean, sum, or L2 norm", choices=("mean", "sum", "l2"))
    # stage 2: SSL (FixMatch: lr 0.03, Nesterov, t 0.95, mu 7, EMA 0.999)
    ssl_epochs: int = flag(5, "stage 2 epochs, each as long as one pass over the unlabelled pool (--ssl-epoch)")
    ssl_pool: str = flag("drop-suspect", "stage 2's pool: all (the paper) or all but the suspect class's", choices=SSL_POOLS)
    ssl_epoch: str = flag("kept", "an SSL epoch: the pool with what joined, or its size before (kept)", choices=SSL_EPOCHS)
    ssl_lr: float = flag(0.03, "stage 2 SGD lr (cosine to 0)")
    mu: int = flag(7, "unlabelled batch = mu x batch_size")
    threshold: float = flag(0.95, "pseudo-label confidence threshold t, eq. (6)")
    batch_size: int = flag(64, "labelled batch of both stages (paper: 64)")
    ema: float = flag(0.999, "stage 2 keeps, evaluates and saves an EMA of the weights with this decay (0: none)")
    ssl_forward: str = flag("one", "stage 2: one trained pass (FixMatch); no-grad weak views: split, two", choices=SSL_STEPS)
    ssl_bn_momentum: float = flag(0.0, "BatchNorm momentum during stage 2 (FixMatch: 0.001; 0: the model's own)")
    ssl_exits: str = flag("deep", "stage 2 trains the deepest exit alone, or every exit as eq. (7) (all)", choices=SSL_EXITS)
    ssl_decay_all: bool = flag(True, "stage 2's weight decay on every tensor (FixMatch: not on biases, BatchNorm)")
    teacher: str = flag("soft", "beyond the paper: the backdoored model's outputs as targets", choices=TEACHERS)
    teacher_weight: float = flag(2.0, "weight of --teacher's cross-entropy beside eq. (7) (2: chosen on defender data)")
    suspect_draws: int = flag(1, "beyond the paper: stage 2 draws the suspect class's labelled images N times a cycle")
    unlearn: float = flag(3.0, "beyond the paper: weight of -log(1 - p_suspect) on what SAD moved out of that class")
    unlearn_residue: float = flag(0.0, "--unlearn acts only where SAD leaves the suspect class a pool excess above this")
    stamp: float = flag(0.2, "beyond the paper: share of stage 2's labelled images given results.json's patch (0.2: docs)")
    stamp_pool: float = flag(0.2, "beyond the paper: share of stage 2's strong views of the pool given that patch too")
    readmit: str = flag("unpatched", "beyond the paper: left-out pool images back (SAD's sure, unpatched)", choices=READMIT)
    readmit_residue: float = flag(0.0, "--readmit (not unpatched) steps aside where SAD leaves the class more excess")
    prior_shift: bool = flag(False, "beyond the paper: where a patch was stamped, the suspect class's bias up to its share")
    holdout: float = flag(0.0, "share of the clean subset kept out of both stages: ACC on defender data")
    holdout_unseen: int = flag(0, "N clean images past --train-size (no model trained on them) kept out of both stages")
    momentum: float = flag(0.9, "SGD momentum, all training")
    weight_decay: float = flag(5e-4, "SGD weight decay, all training")


# ================================================================================================
# Backbones, CIFAR style: normalize -> stem -> stages -> head (ends in nn.Linear). Exits attach after each
# stage but the last. Input: float (B, C, H, W) in [0, 1]; normalize is loading.Normalize under --normalize.
# ================================================================================================

def stage_outputs(backbone: nn.Module, x: Tensor) -> list[Tensor]:
    """The output of every stage, shallow to deep; the last is F_D, what the head reads. Any module with
    .stem, .stages (and optionally .normalize) works. (B, C, H, W) -> [(B, C_i, H_i, W_i)]."""
    norm = getattr(backbone, "normalize", None)
    h, feats = backbone.stem(norm(x) if norm is not None else x), []
    for stage in backbone.stages:
        h = stage(h)
        feats.append(h)
    return feats


class Backbone(nn.Module):
    """The shared forward: head(stages(stem(normalize(x))))."""
    def forward(self, x: Tensor) -> Tensor:
        return self.head(stage_outputs(self, x)[-1])


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016, Identity Mappings)."""
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c_in), nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False) if stride != 1 or c_in != c_out else None

    def forward(self, x: Tensor) -> Tensor:
        o = F.relu(self.bn1(x))
        skip = self.shortcut(o) if self.shortcut is not None else x
        o = self.conv1(o)
        return self.conv2(F.relu(self.bn2(o))) + skip


def classifier_head(channels: int, num_classes: int, preact: bool) -> nn.Sequential:
    pre = [nn.BatchNorm2d(channels), nn.ReLU()] if preact else []
    return nn.Sequential(*pre, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))


class PreActResNet18(Backbone):
    """head_bn: a BatchNorm + ReLU before the pooling (the pre-activation design's closing norm). Much published
    backdoor code (BackdoorBench, WaNet, pytorch-cifar) pools the last block's sum directly: head_bn=False."""
    def __init__(self, in_channels: int = 3, num_classes: int = 10, head_bn: bool = True):
        super().__init__()
        self.normalize = nn.Identity()
        self.stem = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        widths, strides, c, stages = (64, 128, 256, 512), (1, 2, 2, 2), 64, []
        for w, s in zip(widths, strides):
            stages.append(nn.Sequential(PreActBlock(c, w, s), PreActBlock(w, w, 1)))
            c = w
        self.stages = nn.ModuleList(stages)
        self.head = classifier_head(c, num_classes, preact=head_bn)


class WideResNet(Backbone):
    """WRN-d-k (Zagoruyko & Komodakis 2016): (d - 4) / 6 pre-activation blocks per group, widths
    16k, 32k, 64k. WRN-16-1 is NAD's and the paper's Table 2 model."""
    def __init__(self, depth: int = 16, width: int = 1, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        self.normalize = nn.Identity()
        self.stem = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        c, stages = 16, []
        for w, s in zip((16 * width, 32 * width, 64 * width), (1, 2, 2)):
            stages.append(nn.Sequential(*[PreActBlock(c if i == 0 else w, w, s if i == 0 else 1) for i in range(n)]))
            c = w
        self.stages = nn.ModuleList(stages)
        self.head = classifier_head(c, num_classes, preact=True)


class ResBlock(nn.Module):
    """ResNet's blocks (He et al. 2016), the sum then ReLU: basic (two 3x3 convs, expansion 1) or bottleneck (1x1,
    3x3, 1x1 to 4 x width)."""
    def __init__(self, c_in: int, width: int, stride: int, bottleneck: bool = False):
        super().__init__()
        c_out = 4 * width if bottleneck else width
        convs = ([(c_in, width, 1, 1), (width, width, 3, stride), (width, c_out, 1, 1)] if bottleneck
                 else [(c_in, width, 3, stride), (width, width, 3, 1)])
        layers = []
        for ci, co, size, st in convs:
            layers += [nn.Conv2d(ci, co, size, st, size // 2, bias=False), nn.BatchNorm2d(co), nn.ReLU()]
        self.body = nn.Sequential(*layers[:-1])
        self.shortcut = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                         if stride != 1 or c_in != c_out else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class ResNet(Backbone):
    """ResNet for 32 px inputs (pytorch-cifar's): 3x3 stem, no max-pool; ResNet-18: basic blocks [2, 2, 2, 2],
    ResNet-50: bottlenecks [3, 4, 6, 3]. torchvision's own ImageNet ResNets are --arch tv:resnet18 etc."""
    def __init__(self, bottleneck: bool, counts: tuple[int, ...], in_channels: int = 3, num_classes: int = 100):
        super().__init__()
        self.normalize = nn.Identity()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        c, stages, expansion = 64, [], 4 if bottleneck else 1
        for width, n, s in zip((64, 128, 256, 512), counts, (1, 2, 2, 2)):
            stages.append(nn.Sequential(*[ResBlock(c if i == 0 else expansion * width, width, s if i == 0 else 1,
                                                   bottleneck) for i in range(n)]))
            c = expansion * width
        self.stages = nn.ModuleList(stages)
        self.head = classifier_head(c, num_classes, preact=False)


def build_backbone(arch: str, in_channels: int, num_classes: int, head_bn: bool = True) -> nn.Module:
    if arch == "preact18":
        return PreActResNet18(in_channels, num_classes, head_bn)
    if arch.startswith("wrn"):  # wrn16-1, wrn28-10, ...
        depth, width = arch[3:].split("-")
        return WideResNet(int(depth), int(width), in_channels, num_classes)
    if arch == "resnet18":
        return ResNet(False, (2, 2, 2, 2), in_channels, num_classes)
    if arch == "resnet50":
        return ResNet(True, (3, 4, 6, 3), in_channels, num_classes)
    if arch.startswith("tv:"):  # torchvision's own model, cut into stem / stages / head
        return torchvision_backbone(arch[3:], in_channels, num_classes)
    raise ValueError(f"--arch: unknown backbone {arch!r}; choose from {', '.join(ARCHS)}")


# ================================================================================================
# Early exits (training only). Design follows "Be Your Own Teacher" (Zhang et al. ICCV 2019) and its
# journal version's code: attention = SepConv, BN, ReLU, upsample, sigmoid, multiplied onto the
# stage output; alignment = stride-2 SepConvs up to the deepest feature's shape; pool; FC.
# ================================================================================================

def sep_conv(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    """Separable conv (dw 3x3 stride, pw, BN, ReLU, dw 3x3, pw, BN, ReLU): (B, c_in, H, W) -> (B, c_out, H/s, W/s)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False), nn.Conv2d(c_in, c_in, 1, bias=False),
        nn.BatchNorm2d(c_in), nn.ReLU(),
        nn.Conv2d(c_in, c_in, 3, 1, 1, groups=c_in, bias=False), nn.Conv2d(c_in, c_out, 1, bias=False),
        nn.BatchNorm2d(c_out), nn.ReLU())


class ExitBranch(nn.Module):
    """One early exit: (B, c, h, w) stage output -> (logits (B, classes), F_i (B, C_D, H_D, W_D))."""
    def __init__(self, path: list[tuple[int, int, int]], num_classes: int):
        # path: (c_in, c_out, stride) of the later stages, so F_i gets F_D's channels and size
        super().__init__()
        c = path[0][0]
        self.attention = nn.Sequential(sep_conv(c, c, 2), nn.BatchNorm2d(c), nn.ReLU())
        self.align = nn.Sequential(*[sep_conv(ci, co, s) for ci, co, s in path])
        self.fc = nn.Linear(path[-1][1], num_classes)

    def forward(self, f: Tensor) -> tuple[Tensor, Tensor]:
        a = torch.sigmoid(F.interpolate(self.attention(f), size=f.shape[-2:], mode="bilinear", align_corners=False))
        feat = self.align(f * a)
        return self.fc(feat.mean((2, 3))), feat


class Branched(nn.Module):
    """Wraps any backbone with .stem, .stages, .head. Train mode: (logits per exit, features per
    exit), deepest last, the deepest being the backbone's own head and last stage output F_D.
    Eval mode: exactly backbone(x). `self.backbone.state_dict()` is the plain model."""
    def __init__(self, backbone: nn.Module, image_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        self.backbone = backbone
        was_training = backbone.training
        with torch.no_grad():  # a dry run reads every stage's output shape
            x = torch.zeros(1, *image_shape, device=next(backbone.parameters()).device)
            shapes = [f.shape[1:] for f in stage_outputs(backbone.eval(), x)]
        backbone.train(was_training)
        self.deep_shape = tuple(shapes[-1])  # F_D's (C, H, W)
        steps = [(a[0], b[0], round(a[1] / b[1])) for a, b in zip(shapes[:-1], shapes[1:])]
        self.exits = nn.ModuleList(ExitBranch(steps[i:], num_classes) for i in range(len(shapes) - 1))

    def forward(self, x: Tensor, exits: bool = True):
        if not self.training:
            return self.backbone(x)
        feats = stage_outputs(self.backbone, x)
        outs = [branch(f) for branch, f in zip(self.exits, feats[:-1])] if exits else []
        logits = [o[0] for o in outs] + [self.backbone.head(feats[-1])]
        return logits, [o[1] for o in outs] + [feats[-1]]


# ================================================================================================
# The paper's math, eq. (1)-(7): plain tensors in, tensors out
# ================================================================================================

def attention_sum(f: Tensor) -> Tensor:
    """eq. (2): A_sum(F) = sum_m |F_m| over channels. (B, C, H, W) -> (B, H, W)."""
    return f.abs().sum(1)


def attention_sum_p(f: Tensor, p: float = 2.0) -> Tensor:
    """eq. (3): A^p_sum(F) = sum_m |F_m|^p. (B, C, H, W) -> (B, H, W)."""
    return f.abs().pow(p).sum(1)


def attention_max_p(f: Tensor, p: float = 2.0) -> Tensor:
    """eq. (4): A^p_max(F) = max_m |F_m|^p. (B, C, H, W) -> (B, H, W)."""
    return f.abs().pow(p).amax(1)


def ap_loss(f_i: Tensor, f_d: Tensor, p: float = 2.0) -> Tensor:
    """eq. (5): || A^p_sum(F_i)/||A^p_sum(F_i)||_2 - A^p_sum(F_D)/||A^p_sum(F_D)||_2 ||_2, per sample.
    (The paper prints A^s_sum in the second numerator: a typo for A^p_sum.)
    f_i: (B, C_i, H, W), f_d: (B, C_D, H, W) -> (B,) in [0, sqrt 2]."""
    a = F.normalize(attention_sum_p(f_i.float(), p).flatten(1), dim=1)
    b = F.normalize(attention_sum_p(f_d.float(), p).flatten(1), dim=1)
    return (a - b).norm(dim=1)


def reduce_ap(d: Tensor, how: str = "sum", keep: Tensor | None = None) -> Tensor:
    """eq. (5) over a batch, which the paper leaves open: per-image distances d (B,) -> one number. Images with
    keep False count as 0 (SSL: an exit's unlabelled images without a pseudo-label). mean: sum / B; sum: summed
    over the batch (the default: with mean, beta x L_AP stays near 0.03 against a CE near 2 and the term is
    inert); l2: the norm of the distances (Be Your Own Teacher's torch.dist of whole batches)."""
    d = d * keep if keep is not None else d
    if how == "mean":
        return d.sum() / max(len(d), 1)
    if how == "sum":
        return d.sum()
    if how == "l2":
        return torch.linalg.vector_norm(d)
    raise ValueError(f"unknown AP reduction {how!r}: mean, sum or l2")


def exit_weights(n_exits: int) -> list[float]:
    """eq. (1)'s weights: exit i of n gets i / n, the deepest 1 (the paper says only that they rise with depth)."""
    return [(i + 1) / n_exits for i in range(n_exits)]


def ssl_exit_weights(net: Branched, cfg: Config) -> list[float]:
    """Stage 2's exits: eq. (1)'s weights for every exit (the paper), or [1] for the deepest alone (--ssl-exits deep)."""
    return exit_weights(len(net.exits) + 1) if cfg.ssl_exits == "all" else [1.0]


def exit_cross_entropy(logits: list[Tensor], targets: list[Tensor], weights: list[float]) -> Tensor:
    """eq. (1) summed over exits: sum_i w_i CE(q_i, y_i). logits: list of (B, K); targets: list
    of (B,) with -1 for 'no label' (counted as 0, the mean still over B, as FixMatch does)."""
    b = max(len(targets[0]), 1)
    return sum(w * F.cross_entropy(z.float(), y, ignore_index=-1, reduction="sum") / b
               for z, y, w in zip(logits, targets, weights))


def pseudo_labels(probs: Tensor, t: float) -> Tensor:
    """eq. (6): argmax_y P(y | u^w) if max_y P(y | u^w) >= t, else -1. (B, K) -> (B,) int64."""
    conf, label = probs.max(1)
    return torch.where(conf >= t, label, torch.full_like(label, -1))


def sad_loss(logits: list[Tensor], feats: list[Tensor], y: Tensor, weights: list[float],
             beta: float = 0.03, p: float = 2.0, detach_deep: bool = True,
             reduce: str = "sum") -> tuple[Tensor, Tensor, Tensor]:
    """eq. (7), labelled half: sum_i L_CE(L_i) + beta sum_i L_AP(F_i, F_D), exits deepest last.
    Returns (loss, ce, ap)."""
    ce = exit_cross_entropy(logits, [y] * len(logits), weights)
    f_d = feats[-1].detach() if detach_deep else feats[-1]
    ap = sum((reduce_ap(ap_loss(f, f_d, p), reduce) for f in feats[:-1]), f_d.new_zeros(()))
    return ce + beta * ap, ce, ap


def ssl_loss(logits_s: list[Tensor], feats_s: list[Tensor], pseudo: list[Tensor], weights: list[float],
             beta: float = 0.03, lambda_u: float = 1.0, p: float = 2.0, detach_deep: bool = True,
             reduce: str = "sum") -> tuple[Tensor, Tensor, Tensor]:
    """eq. (7), unlabelled half: lambda_u sum_i (L_CE(L_i) + beta L_AP(F_i, F_D)) on the strong view.
    Exit i learns from its own pseudo-labels pseudo[i] (eq. 6 on its weak-view prediction); an
    image joins exit i's CE and AP terms only where that exit labelled it, so with no label
    passing t the loss is 0. Means are over the whole unlabelled batch. Returns (loss, ce, ap)."""
    ce = exit_cross_entropy(logits_s, pseudo, weights)
    f_d = feats_s[-1].detach() if detach_deep else feats_s[-1]
    ap = sum((reduce_ap(ap_loss(f, f_d, p), reduce, y >= 0) for f, y in zip(feats_s[:-1], pseudo[:-1])), f_d.new_zeros(()))
    return lambda_u * (ce + beta * ap), ce, ap


def teacher_loss(logits_w: Tensor, target: Tensor) -> Tensor:
    """Beyond the paper (--teacher): cross-entropy of the weak view's logits (B, K) against the backdoored model's
    own prediction of the image: target (B,) classes, -1 where left out, or (B, K) probabilities, a zero row where
    left out. Mean over the whole batch, left-out images counting 0 (as eq. (7)'s unlabelled half)."""
    logp = F.log_softmax(logits_w.float(), 1)
    if target.dim() == 1:
        return F.nll_loss(logp, target, ignore_index=-1, reduction="sum") / len(target)
    return -(target * logp).sum() / len(target)


def unlearn_loss(logits: Tensor, avoid: Tensor) -> Tensor:
    """Beyond the paper (--unlearn): -log(1 - p_c) of logits (B, K), c = avoid (B,) (-1: none), a complementary label
    that moves an image out of class c and into no class in particular. Mean over the batch, -1 counting 0."""
    z = logits.float()
    rest = z.scatter(1, avoid.clamp(min=0)[:, None], float("-inf"))  # log(1 - p_c) = lse(z without c) - lse(z)
    return ((z.logsumexp(1) - rest.logsumexp(1)) * (avoid >= 0)).sum() / len(avoid)


# ================================================================================================
# The two views (paper, "Semi-Supervised Learning"): uint8 (B, C, H, W) -> the same, each image its own draw
# ================================================================================================

def weak_augment(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A random crop of the 4 px zero-padded image and a horizontal flip with p = 0.5."""
    return random_crop_flip(x, 4, generator)


def strong_augment(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Weak crop/flip, RandAugment (2 ops, magnitude 9: torchvision's fixed-magnitude variant, not FixMatch's
    RandAugmentMC with random magnitudes), then cutout of half the side (FixMatch's 16 px on CIFAR)."""
    x = rand_augment(random_crop_flip(x, generator=generator), generator=generator)
    return cutout(x, x.shape[-1] // 2, generator=generator)


# ================================================================================================
# One training step of each stage: augmented uint8 batches in, eq. (7) out (bench.py times the same ones)
# ================================================================================================

def sad_forward(net: Branched, xb: Tensor, yb: Tensor, weights: list[float], cfg: Config,
                device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """eq. (7), labelled half, on the (augmented) uint8 batch xb -> (loss, ce, ap)."""
    with autocast(device):
        logits, feats = net(to_input(xb, cfg.channels_last))
    return sad_loss(logits, feats, yb, weights, cfg.beta, cfg.p, cfg.detach_deep, cfg.ap_reduce)


def ssl_forward(net: Branched, xb: Tensor, yb: Tensor, u_weak: Tensor, u_strong: Tensor, weights: list[float],
                cfg: Config, device: torch.device, teacher: Tensor | None = None,
                avoid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """eq. (7) whole for one step: per-exit pseudo-labels (eq. 6) from the weak view of the unlabelled batch, the
    labelled batch xb and the strong view trained. --ssl-forward one: all three in one trained pass (FixMatch: its
    BatchNorm statistics from all three); split: the weak view in a no-grad pass that leaves them alone; two: one that
    updates them. Beyond the paper, for the view with a gradient: teacher, --teacher's targets; avoid, --unlearn's
    classes (no pseudo-label there). -> (loss, (ce_l, ap_l, ce_u, ap_u, teacher, unlearn, kept share per exit))."""
    n, m, every = len(xb), len(u_weak), cfg.ssl_exits == "all"  # --ssl-exits deep: the deepest exit alone
    if cfg.ssl_forward == "one":
        with autocast(device):
            logits, feats = net(to_input(torch.cat([xb, u_weak, u_strong]), cfg.channels_last), every)
        logits_u_w, strong = [z[n:n + m] for z in logits], slice(n + m, None)
    else:
        with torch.no_grad(), autocast(device), frozen_bn_stats(net) if cfg.ssl_forward == "split" else nullcontext():
            logits_u_w, _ = net(to_input(u_weak, cfg.channels_last), every)
        with autocast(device):
            logits, feats = net(to_input(torch.cat([xb, u_strong]), cfg.channels_last), every)
        strong = slice(n, None)
    pseudo = [pseudo_labels(z.detach().float().softmax(1), cfg.threshold) for z in logits_u_w]  # eq. (6), per exit
    if avoid is not None:  # --unlearn's images: a trigger may still pick their pseudo-label; "not class c" only
        pseudo = [torch.where(avoid >= 0, -1, q) for q in pseudo]
    loss_x, ce_l, ap_l = sad_loss([z[:n] for z in logits], [f[:n] for f in feats], yb,
                                  weights, cfg.beta, cfg.p, cfg.detach_deep, cfg.ap_reduce)
    loss_u, ce_u, ap_u = ssl_loss([z[strong] for z in logits], [f[strong] for f in feats], pseudo,
                                  weights, cfg.beta, cfg.lambda_u, cfg.p, cfg.detach_deep, cfg.ap_reduce)
    taught = logits_u_w[-1] if cfg.ssl_forward == "one" else logits[-1][strong]  # the view with a gradient
    ce_t = teacher_loss(taught, teacher) if teacher is not None else loss_u.new_zeros(())
    ce_a = unlearn_loss(taught, avoid) if avoid is not None else loss_u.new_zeros(())
    masks = [(q >= 0).float().mean() for q in pseudo]
    return loss_x + loss_u + cfg.teacher_weight * ce_t + cfg.unlearn * ce_a, \
        torch.stack([ce_l, ap_l, ce_u, ap_u, ce_t, ce_a, *masks]).detach()


# ================================================================================================
# Stage 1: SAD on the clean labelled subset
# ================================================================================================

def stage1_sad(net: Branched, x: Tensor, y: Tensor, cfg: Config, device: torch.device, log: RunLog,
               state: RunState | None = None, stop=None) -> int:
    """Trains net (backbone and exits) on uint8 images x (N, C, H, W), labels y (N,), with eq. (7)'s labelled half.
    stop(epoch) -> True ends training after that epoch (--sad-early-check). -> the last epoch run."""
    weights = exit_weights(len(net.exits) + 1)
    steps = math.ceil(len(x) / cfg.batch_size)
    opt = sgd(net.parameters(), cfg.sad_lr, cfg)
    sched = SCHEDULES[cfg.sad_schedule](opt, cfg.sad_epochs * steps)
    start, _ = state.restore("sad", net, opt, sched, {"sad_lr": cfg.sad_lr}) if state else (1, {})
    log.begin("sad", cfg.sad_epochs, len(x), start)
    for epoch in range(start, cfg.sad_epochs + 1):
        net.train()
        sums, watch, lr_now = torch.zeros(2, device=device), FiniteWatch(device), sched.get_last_lr()[0]
        perm = torch.randperm(len(x), device=x.device)
        for step, i in enumerate(range(0, len(x), cfg.batch_size)):
            idx = perm[i:i + cfg.batch_size]
            loss, ce, ap = sad_forward(net, weak_augment(x[idx]), y[idx], weights, cfg, device)
            watch.see(loss, step)
            descend(opt, sched, loss)
            sums += torch.stack([ce, ap]).detach()
            log.step(len(idx), epoch)
        log.pause()
        watch.check("sad", epoch)
        ce, ap = (sums / steps).tolist()  # read once per epoch
        if state:
            state.save("sad", epoch, net, opt, sched, {"sad_lr": cfg.sad_lr})
        log.end_epoch(epoch, net.backbone, {"ce": ce, "ap": ap}, lr_now)
        if stop is not None and epoch < cfg.sad_epochs and stop(epoch):
            return epoch
    return cfg.sad_epochs


# ================================================================================================
# Stage 2: SAD + SSL, the labelled clean subset plus the unlabelled (poisoned) pool, FixMatch's names
# ================================================================================================

def ssl_schedule(n_unlabelled: int, cfg: Config) -> tuple[int, int]:
    """-> (steps per epoch, total): an epoch is n_unlabelled images at mu x batch_size a step (cosine spans all)."""
    steps = max(n_unlabelled // (cfg.mu * cfg.batch_size), 1)
    return steps, steps * cfg.ssl_epochs


def labelled_cycle(y: Tensor, suspect: int | None, draws: int) -> Tensor:
    """Beyond the paper (--suspect-draws): one cycle of stage 2's labelled batches, indices into y (N,): every image
    once, the suspect class's `draws` times (drop-suspect leaves that class no pool image, so no other target)."""
    times = torch.where(y == (suspect if suspect is not None else -1), draws, 1)
    return torch.arange(len(y), device=y.device).repeat_interleave(times)


def stage2_ssl(net: Branched, x_l: Tensor, y_l: Tensor, x_u: Tensor, cfg: Config, device: torch.device, log: RunLog,
               state: RunState | None = None, teacher: Tensor | None = None, suspect: int | None = None,
               avoid: Tensor | None = None, stamp: Tensor | None = None, epoch_images: int | None = None) -> nn.Module:
    """Trains net on the labelled x_l, y_l and the unlabelled x_u (uint8 (N, C, H, W)) with eq. (7) whole; teacher, avoid:
    --teacher's targets, --unlearn's classes, one per image of x_u; suspect: labelled_cycle's; stamp: --stamp's patch
    (rgba); epoch_images: --ssl-epoch kept's, drawn anew each epoch. -> the model to keep (EMA with cfg.ema > 0)."""
    weights = ssl_exit_weights(net, cfg)
    b, bu = cfg.batch_size, cfg.mu * cfg.batch_size
    steps, total_steps = ssl_schedule(min(epoch_images or len(x_u), len(x_u)), cfg)
    opt = sgd(net.parameters(), cfg.ssl_lr, cfg, nesterov=True, decay_all=cfg.ssl_decay_all)
    sched = cosine(opt, total_steps)
    names = ["ce_l", "ap_l", "ce_u", "ap_u", "teacher", "unlearn", *(f"mask{i}" for i in range(1, len(weights))), "mask"]
    ema = copy.deepcopy(net.backbone).requires_grad_(False) if cfg.ema > 0 else None
    cycle = labelled_cycle(y_l, suspect, cfg.suspect_draws)
    shuffled = lambda: cycle[torch.randperm(len(cycle), device=cycle.device)]
    perm_l, pos_l = shuffled(), 0
    start, extra = state.restore("ssl", net, opt, sched) if state else (1, {})
    if extra:  # where the labelled cycle stood, and the average
        perm_l, pos_l = extra["perm_l"].to(x_l.device), extra["pos_l"]
        if ema is not None:
            ema.load_state_dict(extra["ema"])
    log.begin("ssl", cfg.ssl_epochs, steps * bu, start)
    for epoch in range(start, cfg.ssl_epochs + 1):
        net.train()
        sums, watch, lr_now = torch.zeros(len(names), device=device), FiniteWatch(device), sched.get_last_lr()[0]
        perm_u = torch.randperm(len(x_u), device=x_u.device)
        for step in range(steps):
            if pos_l + b > len(perm_l):  # the labelled set is small: cycle through it, reshuffled
                perm_l, pos_l = shuffled(), 0
            idx_l, pos_l = perm_l[pos_l:pos_l + b], pos_l + b
            idx_u = perm_u[step * bu:(step + 1) * bu]
            u, xb = x_u[idx_u], x_l[idx_l]
            if stamp is not None:  # --stamp: a share of the labelled batch gets the patch, labels kept; own draws, so
                g = torch.Generator().manual_seed(cfg.seed + (epoch - 1) * steps + step)  # the rest is as without it
                coin = lambda n, r: (torch.rand(n, generator=g) < r).to(xb.device).view(-1, 1, 1, 1)
                xb = torch.where(coin(len(xb), cfg.stamp), patch(xb, stamp), xb)
            wx, wu, su = weak_augment(xb), weak_augment(u), strong_augment(u)
            if stamp is not None:  # --stamp-pool: a share of the pool's strong views too, pasted after their augmentation
                su = torch.where(coin(len(u), cfg.stamp_pool), patch(su, stamp), su)
            per_image = [t[idx_u] if t is not None else None for t in (teacher, avoid)]
            with bn_momentum(net, cfg.ssl_bn_momentum) if cfg.ssl_bn_momentum > 0 else nullcontext():
                loss, parts = ssl_forward(net, wx, y_l[idx_l], wu, su, weights, cfg, device, *per_image)
            watch.see(loss, step)
            descend(opt, sched, loss)
            if ema is not None:
                ema_update(ema, net.backbone, cfg.ema, (epoch - 1) * steps + step)
            sums += parts.float()
            log.step(len(u), epoch)
        log.pause()
        watch.check("ssl", epoch)
        off = {n for n, t in (("teacher", teacher), ("unlearn", avoid)) if t is None}
        parts = {n: v for n, v in zip(names, (sums / steps).tolist()) if n not in off}  # read once per epoch
        if state:
            state.save("ssl", epoch, net, opt, sched, {"perm_l": perm_l.cpu(), "pos_l": pos_l,
                                                       **({"ema": ema.state_dict()} if ema is not None else {})})
        log.end_epoch(epoch, ema if ema is not None else net.backbone, parts, lr_now)
    return ema if ema is not None else net.backbone


# ================================================================================================
# Beyond the paper: the pool check (no trigger needed), SAD's lr ladder, drop-suspect, --teacher, --unlearn, ...
# ================================================================================================

POOL_PROBE = 10000   # pool images predicted for the check (sampling error of a share about 0.3 points)
POOL_SIGNAL = 0.03   # an excess below 3 points before purification: the pool shows no backdoor to follow
POOL_KEEP = 0.25     # the suspect class keeps a quarter of its excess or more: the backdoor survived
POOL_MOVED = 0.5     # most of the images that left the suspect class (and POOL_SIGNAL of the pool) went to one class


def class_excess(pred: Tensor, labels: Tensor, k: int) -> Tensor:
    """The share of the unlabelled pool the model puts in each class minus that class's share of the clean subset:
    (k,), summing to 0. A backdoored model's target has an excess of about the pool's poisoned share."""
    share = lambda v: torch.bincount(v.flatten().cpu(), minlength=k).double() / max(v.numel(), 1)
    return share(pred) - share(labels)


def pool_report(excess: Tensor, suspect: int | None = None) -> dict:
    """class_excess -> JSON: its largest class, in percentage points, and the excess of `suspect`."""
    top, pp = int(excess.argmax()), lambda c: round(100 * float(excess[c]), 2)
    extra = {"suspect": suspect, "suspect_pp": pp(suspect)} if suspect is not None else {}
    return {"class": top, "excess_pp": pp(top), **extra}


def survived(before: Tensor, after: Tensor, suspect: int) -> bool:
    """The check's verdict from two class_excess vectors: the suspect class had a real excess (>= POOL_SIGNAL) and
    keeps POOL_KEEP of it or more (the excess is about the poisoned share times the ASR: a quarter of the ASR kept)."""
    return bool(before[suspect] >= POOL_SIGNAL and after[suspect] >= POOL_KEEP * before[suspect])


class PoolCheck:
    """The pool check on a fixed sample of the pool: the backdoored model's class_excess, taken once; after() compares
    a purified model with it. suspect: the class with the largest excess; visible: it is >= POOL_SIGNAL."""
    def __init__(self, model: nn.Module, x_pool: Tensor, y_labelled: Tensor, k: int, cfg: Config, device: torch.device,
                 held_out: tuple[Tensor, Tensor] | None = None):
        self.held_out = held_out  # (x, y): clean labelled images no stage trains on; after() adds ACC on them
        order = torch.randperm(len(x_pool), generator=torch.Generator().manual_seed(cfg.seed))[:POOL_PROBE]
        self.probe = probe = x_pool[order.to(x_pool.device)]  # also where purify's diagnostic re-estimates BatchNorm
        self.predict_on = lambda m, x: predictions(m, x, device, cfg.channels_last)
        self.predict = lambda m: self.predict_on(m, probe)
        self.y_labelled, self.k = y_labelled, k
        self.pred = self.predict(model) if len(x_pool) else None
        self.excess = class_excess(self.pred, y_labelled, k) if len(x_pool) else None
        self.suspect = int(self.excess.argmax()) if self.excess is not None else None
        self.visible = self.excess is not None and bool(self.excess[self.suspect] >= POOL_SIGNAL)
        if cfg.clean_label and self.excess is not None:  # its poisoned images carry their own, true label
            print("ftt: pool check: --clean-label: the attacker kept every label, so the pool shows no excess of the "
                  "target class; the check has nothing to see and is not used", flush=True)
            self.visible = False

    def held_out_acc(self, model: nn.Module, pool_pred: Tensor | None = None) -> dict:
        """ACC on the held-out clean images, on the suspect class's alone, net_excess with pool_pred: {} without them."""
        return {} if self.held_out is None else held_out_rates(self.predict_on(model, self.held_out[0]), self.held_out[1],
                                                               self.suspect, pool_pred, self.y_labelled, self.k)

    def after(self, stage: str, model: nn.Module, result: dict) -> bool:
        """result["pool"] for `model` after `stage`; True (and a warning line) when the backdoor survived; a
        warning line when most of the images that left the suspect class went to one other class (moved)."""
        pred = self.predict(model) if self.excess is not None else None
        result.update(self.held_out_acc(model, pred))
        if self.excess is None:
            return False
        excess = class_excess(pred, self.y_labelled, self.k)
        result["pool"] = report = pool_report(excess, self.suspect)
        s = self.suspect
        if self.visible:
            report["left_to"], share, size = moved(self.pred, pred, s, self.k)
            report["left_share"] = round(share, 3)
            if share >= POOL_MOVED and size >= POOL_SIGNAL:
                print(f"ftt: pool check: after {stage}, {100 * share:.0f}% of the pool images that left class {s} went to "
                      f"class {report['left_to']}: a trigger may still pick their class (RA shows it, not ASR)", flush=True)
        if survived(self.excess, excess, s):
            print(f"ftt: pool check: after {stage} the model still puts {100 * excess[s]:.1f}% more of the pool in class "
                  f"{s} than the clean subset holds ({100 * self.excess[s]:.1f}% before): the backdoor survived", flush=True)
            return True
        return False


def drop_suspect(pred: Tensor, check: PoolCheck) -> tuple[Tensor, dict | None]:
    """--ssl-pool drop-suspect: the pool images stage 2 keeps, those the backdoored model (pred (N,): its classes) puts
    outside the suspect class (SSL on Blended's triggered images taught the trigger a new target); all, with a line,
    when the pool shows no suspect class or all is in it. -> (keep (N,) bool, {"dropped", "kept", "suspect"} or None)."""
    keep = pred != check.suspect if check.visible else None
    if keep is not None and keep.any():
        info = {"dropped": int((~keep).sum()), "kept": int(keep.sum()), "suspect": check.suspect}
        print(f"ftt: --ssl-pool drop-suspect: stage 2 leaves out the {info['dropped']} pool images the backdoored "
              f"model puts in class {check.suspect}; {info['kept']} remain", flush=True)
        return keep, info
    why = "the pool shows no suspect class" if keep is None else f"the model puts every pool image in class {check.suspect}"
    print(f"ftt: --ssl-pool drop-suspect: {why}, so stage 2 uses all of it", flush=True)
    return torch.ones_like(pred, dtype=torch.bool), None


def unlearn_set(sad: nn.Module, x_dropped: Tensor, suspect: int, device: torch.device, channels_last: bool = True,
                confidence: float = 0.5, stay: bool = False) -> Tensor:
    """--unlearn: the indices of the images drop-suspect left out (the backdoored model's suspect class) that SAD's
    model puts in another class with probability >= confidence: on the development models 85-87% are triggered.
    stay (--readmit): those it keeps in the suspect class with probability >= confidence (there, 0-2% triggered)."""
    if not len(x_dropped):
        return torch.zeros(0, dtype=torch.long)
    conf, cls = logits_of(sad, x_dropped, device, channels_last).softmax(1).max(1)
    return torch.nonzero(((cls == suspect) == stay) & (conf >= confidence)).flatten()


def teacher_targets(probs: Tensor, check: PoolCheck, soft: bool, everywhere: bool = False) -> Tensor | None:
    """--teacher: from the backdoored model's probabilities of pool images (N, K), its prediction of each (soft: the
    probabilities, hard: the class), left out (a zero row, -1) in the suspect class unless everywhere (--readmit
    taught). None, with a line, when there is none: the trigger may have made any of them."""
    if not check.visible:
        print("ftt: --teacher: the pool check sees no suspect class, so the backdoored model's predictions may carry "
              "its trigger: stage 2 runs without them", flush=True)
        return None
    keep = (probs.argmax(1) != check.suspect) | everywhere
    return probs * keep[:, None] if soft else torch.where(keep, probs.argmax(1), -1)


@torch.no_grad()
def prior_shift(model: nn.Module, check: PoolCheck, channels_last: bool = True) -> dict:
    """--prior-shift: the least raise of the suspect class's bias in model.head[-1] that gives it the clean subset's
    share of the pool probe (harness.bias_for_share; the pool check is blind after it). -> {"class", "shift"}."""
    s, head = check.suspect, model.eval().head[-1]
    if not check.visible or head.bias is None:
        print("ftt: --prior-shift: no suspect class in the pool, or no bias: nothing shifted", flush=True)
        return {"class": None, "shift": 0.0}
    shift = bias_for_share(logits_of(model, check.probe, check.probe.device, channels_last), s,
                           float((check.y_labelled == s).float().mean()))
    head.bias[s] += shift
    return {"class": s, "shift": shift}


def sad_on_the_ladder(model: nn.Module, x_l: Tensor, y_l: Tensor, cfg: Config, check: PoolCheck, k: int,
                      device: torch.device, log: RunLog, state: RunState | None, results: dict) -> Branched:
    """Stage 1 at the ladder's least lr that passes the pool check, each attempt from the backdoored model with new
    exits; with nothing to check, once at the top. results["sad"] (with its lr), ["sad_tried"]. -> the Branched."""
    ladder = lr_ladder(cfg.sad_lr, cfg.sad_lr_max) if cfg.sad_epochs else [cfg.sad_lr]
    if not check.visible and len(ladder) > 1:
        top = f"largest excess {100 * check.excess[check.suspect]:+.1f} points" if check.excess is not None else "no pool"
        print(f"ftt: pool check: no class stands out in the unlabelled pool ({top}), so nothing tells whether SAD "
              f"removed a backdoor: SAD runs once at lr {ladder[-1]}", flush=True)
        ladder = ladder[-1:]
    backdoored = copy.deepcopy(model.state_dict()) if len(ladder) > 1 else None
    layout = torch.channels_last if cfg.channels_last else torch.preserve_format
    net = Branched(model, tuple(x_l.shape[1:]), k).to(device, memory_format=layout)
    if net.deep_shape[1:] == (1, 1):
        print(f"ftt: F_D is {net.deep_shape[0]} x 1 x 1 at this input size: attention maps of one pixel, so eq. (5)'s "
              f"AP term is 0 and SAD trains the exits' cross-entropy only", flush=True)
    if state and state.done("sad"):
        return net  # stage 2's resume state holds the weights
    tried = list(results.get("sad_tried", []))  # attempts the pool check failed (kept across --resume)
    for i, lr in enumerate(ladder[len(tried):], start=len(tried)):
        if i > 0:
            model.load_state_dict(backdoored)
            net = Branched(model, tuple(x_l.shape[1:]), k).to(device, memory_format=layout)
        early = max(1, round(cfg.sad_early_check * cfg.sad_epochs)) if cfg.sad_early_check and i < len(ladder) - 1 else 0
        part = {"lr": lr}  # the early check's pool report
        stop = lambda e: e == early and check.after(f"{e} of {cfg.sad_epochs} SAD epochs at lr {lr}", net.backbone, part)
        last = stage1_sad(net, x_l, y_l, dataclasses.replace(cfg, sad_lr=lr), device, log, state, stop if early else None)
        if last < cfg.sad_epochs:  # --sad-early-check: the backdoor survived part of the way; climb now
            tried.append({**part, "stopped_after_epoch": last})
            results["sad_tried"] = tried
            print(f"ftt: SAD again from the backdoored model at lr {ladder[i + 1]} (--sad-early-check)", flush=True)
            continue
        results["sad"] = {**measured(log.measure("sad", net.backbone)), "lr": lr}
        if not check.after("sad", net.backbone, results["sad"]) or i == len(ladder) - 1:
            break
        tried.append(results.pop("sad"))
        results["sad_tried"] = tried  # saved with the next checkpoint
        print(f"ftt: SAD again from the backdoored model at lr {ladder[i + 1]}", flush=True)
    return net


# ================================================================================================
# purify: the library entry point, plain tensors in
# ================================================================================================

def purify(model: nn.Module, x_labelled: Tensor, y_labelled: Tensor, x_pool: Tensor, cfg: Config | None = None,
           num_classes: int | None = None, device: torch.device | None = None, log: RunLog | None = None,
           state: RunState | None = None, timings: dict | None = None,
           held_out: tuple[Tensor, Tensor] | None = None) -> tuple[nn.Module, dict]:
    """FTT on a backdoored model with .stem, .stages, .head (ours, or yours): stage 1 on the clean x_labelled
    (N, C, H, W) uint8 with y_labelled (N,), then stage 2 on the unlabelled x_pool (M, C, H, W) uint8, in place.
    cfg: a Config; log: evaluation and progress (default: quiet); state: resume; held_out: (x, y) clean images no
    stage trains on, ACC on them after each stage (or --holdout). -> (purified model, results: "before" (pool
    check), "sad", "sad_tried", "ssl_pool", "ssl", each with ACC/ASR/RA where log evaluates)."""
    cfg = cfg or Config()
    device = device or next(model.parameters()).device
    log = log or RunLog(quiet=True)
    k = num_classes or model.head[-1].out_features
    results = state.results if state else {}
    timings = {} if timings is None else timings
    if held_out is not None and cfg.holdout > 0:
        raise ValueError("purify: held_out and cfg.holdout both name held-out images; give one of them")
    x_l, y_l, x_u = x_labelled.to(device), y_labelled.to(device), x_pool.to(device)
    held_out = tuple(t.to(device) for t in held_out) if held_out is not None else None
    if cfg.holdout > 0:  # --holdout: ACC on clean images that no stage trains on, for choices made on defender data
        order = torch.randperm(len(x_l), generator=torch.Generator().manual_seed(cfg.seed + 1)).to(device)
        n = round(cfg.holdout * len(x_l))
        held_out, x_l, y_l = (x_l[order[:n]], y_l[order[:n]]), x_l[order[n:]], y_l[order[n:]]
    check = PoolCheck(model, x_u, y_labelled.to(device), k, cfg, device, held_out)
    before = results.setdefault("before", {})
    if check.excess is not None:
        before["pool"] = pool_report(check.excess)
    before["acc_labelled"] = hit_rate(predictions(model, x_l, device, cfg.channels_last), y_l)
    before.update(check.held_out_acc(model, check.pred))

    def diagnose(m: nn.Module, result: dict) -> None:  # ACC, ASR, RA with BatchNorm's statistics from the pool
        if cfg.bn_diagnostic and log.evaluates and len(p := check.probe):
            result["bn_pool"] = measured(log.evaluate(bn_reestimated(m, p, device, weak_augment, cfg.channels_last)))
    diagnose(model, before)
    if not cfg.sad_epochs and not cfg.ssl_epochs:  # an attacker's run, a floor: no stage, the model as it is
        return model, results
    probs = logits_of(model, x_u, device, cfg.channels_last).softmax(1) if cfg.ssl_epochs and len(x_u) and \
        (cfg.ssl_pool == "drop-suspect" or cfg.teacher != "none") else None  # the backdoored model's, read once
    keep = torch.ones(len(x_u), dtype=torch.bool, device=x_u.device)
    if cfg.ssl_pool == "drop-suspect" and probs is not None:
        keep, info = drop_suspect(probs.argmax(1), check)
        results.update({"ssl_pool": info} if info else {})
    soft, n_kept, x_u, x_dropped = cfg.teacher == "soft", int(keep.sum()), x_u[keep], x_u[~keep]
    teacher = teacher_targets(probs[keep], check, soft) if cfg.teacher != "none" and probs is not None else None
    taught = teacher_targets(probs[~keep], check, soft, everywhere=True) \
        if cfg.readmit in ("taught", "unpatched") and teacher is not None and results.get("ssl_pool") else None
    backdoored = copy.deepcopy(model) if check.visible and "patch" not in results else None  # read_patch's "before"
    t = time.time()
    net = sad_on_the_ladder(model, x_l, y_l, cfg, check, k, device, log, state, results)
    timings["sad_s"] = time.time() - t
    if "bn_pool" not in results["sad"]:  # (a resumed stage 2 holds SAD's weights in its state, not in net yet)
        diagnose(net.backbone, results["sad"])
    t = time.time()
    purified, avoid, s = net.backbone, None, (results.get("ssl_pool") or {}).get("suspect")
    pp = results["sad"]["pool"]["suspect_pp"] if s is not None else None  # SAD's residue: its pool excess in class s
    back = results.setdefault("moved_back", {}) if s is not None and len(x_u) and cfg.ssl_epochs else None
    if back is not None and "index" not in back:  # kept while stage 2 runs: a resume has no SAD model
        back["index"] = unlearn_set(net.backbone, x_dropped, s, device, cfg.channels_last).cpu()
    rgba = read_patch(check, x_dropped[back["index"].to(x_u.device)], x_l, results,
                      {"before": backdoored, "sad": net.backbone}) if back is not None else None  # beyond the paper
    del backdoored
    if (cfg.unlearn > 0 or cfg.readmit != "none") and len(x_u) and cfg.ssl_epochs and s is None:
        why = "no suspect class in the pool" if cfg.ssl_pool == "drop-suspect" else "--ssl-pool all leaves nothing out"
        print(f"ftt: --unlearn, --readmit: {why}: stage 2 runs without them", flush=True)
    elif cfg.unlearn > 0 and len(x_u) and cfg.ssl_epochs and pp <= cfg.unlearn_residue:  # SAD left no residue there
        results["unlearn"] = {"suspect": s, "images": 0, "sad_suspect_pp": pp}
        print(f"ftt: --unlearn off: SAD left class {s} {pp} points of excess, not over {cfg.unlearn_residue}", flush=True)
    elif cfg.unlearn > 0 and len(x_u) and cfg.ssl_epochs:  # beyond the paper
        order = back["index"][torch.randperm(len(back["index"]), generator=torch.Generator().manual_seed(cfg.seed))]
        kept_out, x_t = order[:len(order) // 4], x_dropped[order[len(order) // 4:]]  # moved back reads the quarter
        u = results["unlearn"] = {"suspect": s, "images": len(x_t), "held": len(kept_out)}  # moved back's images
        print(f"ftt: --unlearn: {len(x_t)} pool images the backdoored model puts in class {s} and SAD's model "
              f"elsewhere join stage 2 with 'not class {s}' as their only target ({u['held']} kept out)", flush=True)
        x_u, teacher, avoid = join_pool(x_u, teacher, avoid, x_t, avoid_new=s)
    rejoin = cfg.readmit != "none" and s is not None and len(x_u) and cfg.ssl_epochs  # beyond the paper
    unpatched = cfg.readmit == "unpatched"  # the patch read back replaces the residue gate: it keeps them out
    if rejoin and (rgba is None if unpatched else pp > cfg.readmit_residue):  # no patch, or SAD left class s an excess
        results["readmit"] = {"images": 0, "sad_suspect_pp": pp}
        why = "no patch trigger read back" if unpatched else f"SAD left class {s} a pool excess above {cfg.readmit_residue}"
        print(f"ftt: --readmit: {why}: none join", flush=True)
    elif rejoin:
        r = results.setdefault("readmit", {})  # "index" stays while stage 2 runs, as --unlearn's does
        i = r["index"] = r["index"] if "index" in r else unpatched_set(x_dropped, rgba, back["index"]) if unpatched \
            else unlearn_set(net.backbone, x_dropped, s, device, cfg.channels_last, cfg.threshold, stay=True).cpu()
        r["images"] = len(i)
        print(f"ftt: --readmit: {len(i)} pool images that the backdoored model puts in class {s} rejoin stage 2 (" +
              ("none holds the patch, none moved by SAD)" if unpatched else f"SAD's too, p >= {cfg.threshold})"), flush=True)
        x_u, teacher, avoid = join_pool(x_u, teacher, avoid, x_dropped[i], None if taught is None else taught[i])
    if len(x_u) and cfg.ssl_epochs:
        purified = stage2_ssl(net, x_l, y_l, x_u, cfg, device, log, state, teacher, s, avoid,
                              rgba if cfg.stamp or cfg.stamp_pool else None, n_kept if cfg.ssl_epoch == "kept" else None)
        read = (lambda: stamped_to_suspect(purified, check, rgba)) if rgba is not None else lambda: None
        results["ssl"], reading = measured(log.measure("ssl", purified)), read()
        if cfg.prior_shift and (rgba is None or not cfg.stamp):  # a raised bias could hand the class to the trigger
            print("ftt: --prior-shift: no patch trigger read back and stamped (--stamp): nothing shifted", flush=True)
        elif cfg.prior_shift:  # beyond the paper; results["ssl"] and the reading: the model returned, after the shift
            unshifted = {**results["ssl"], **check.held_out_acc(purified), "to_suspect": reading}
            shifted = results["prior_shift"] = prior_shift(purified, check, cfg.channels_last)
            if shifted["shift"]:
                shifted["unshifted"], results["ssl"], reading = unshifted, measured(log.evaluate(purified)), read()
        if rgba is not None:
            results["patch"]["to_suspect"]["ssl"] = reading
        check.after("ssl", purified, results["ssl"])
        diagnose(purified, results["ssl"])
        results.get("readmit", {}).pop("index", None)
        if back is not None:  # beyond the paper: a relapse reading without the trigger (mostly triggered images)
            i = back.pop("index")
            i = i if avoid is None else kept_out  # --unlearn trains on the rest
            pred = predictions(purified, x_dropped[i], device, cfg.channels_last)
            back.update(images=len(i), share=hit_rate(pred, torch.tensor(s)) if len(i) else None)
            print(f"ftt: pool check: the purified model puts {back['share'] or 0:.1f}% of the {len(i)} pool images that SAD "
                  f"moved out of class {s} (and stage 2 did not train on) back in it (a relapse)", flush=True)
    elif not cfg.quiet:
        print("stage 2 skipped: " + ("--ssl-epochs 0" if len(x_u) else "no unlabelled images (--unlabeled-dir)"))
    timings["ssl_s"] = time.time() - t
    return purified, results


# ================================================================================================
# main: load (or backdoor) the model, purify it, report; the CLI
# ================================================================================================

def main(cfg: Config) -> dict:
    """One run: results.json, log.jsonl, backdoored.pt (when trained here) and purified.pt in cfg.out."""
    t_start = time.time()
    from attacker import backdoor, make_trigger  # the replication's attacker; it imports this module's operators
    p = prepare(cfg, build_backbone, make_trigger)
    cfg, device, d, model, k = p["cfg"], p["device"], p["d"], p["model"], p["num_classes"]
    out, results, timings = Path(cfg.out), {}, {"data_s": p["data_s"]}
    state = RunState(out / "checkpoint.pt", cfg, results)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("results.json", "checkpoint.pt", "log.jsonl") if cfg.overwrite and not cfg.resume else ():
        (out / name).unlink(missing_ok=True)  # a fresh run: nothing of the old one may be resumed or mistaken for ours
    train_attacker = not cfg.model and not state.done("attack")
    if cfg.compile and train_attacker:
        model.compile(mode=cfg.compile_mode)  # in place: its state_dict keeps its keys
    t = time.time()
    from bench import start_estimate  # from the steps bench.py times, on random images
    est = start_estimate(cfg, p, train_attacker)
    timings["estimate_s"], t = time.time() - t, time.time()
    log = RunLog(p["evaluate"], cfg.eval_every, out / "log.jsonl", cfg.quiet, est)
    if not cfg.model and state.done("attack"):  # resuming after the attacker's training finished
        model.load_state_dict(torch.load(out / "backdoored.pt", map_location=device, weights_only=True))
    elif not cfg.model:
        backdoor(model, d, cfg, device, log, state)
        torch.save(model.state_dict(), out / "backdoored.pt")
    timings["backdoor_s"] = time.time() - t
    results["before"] = measured(log.measure("attack", model))
    purified, results = purify(model, p["x_l"], p["y_l"], p["x_u"], cfg, k, device, log, state, timings, p["held_out"])
    timings["total_s"] = time.time() - t_start
    report = {"config": dataclasses.asdict(cfg), "seed": cfg.seed, "versions": versions(), "device": str(device),
              "trigger": d["trigger"], "counts": d["counts"], "timings": timings, "results": results,
              "model": p["read"], "argv": sys.argv, **({"classes": d["classes"]} if "classes" in d else {})}
    finish(out, cfg, purified, report)
    return report


def parse_args(argv: list[str] | None = None) -> Config:
    return parse_config(Config, argv, "ftt", "FTT backdoor purification (AAAI 2024)")


def cli(argv: list[str] | None = None) -> int:
    """Parse, validate, run. A bad flag or a missing dataset: one line on stderr, exit code 2."""
    cfg = parse_args(argv)
    return run_cli("ftt", lambda: main(cfg), cfg.out)


if __name__ == "__main__":
    sys.exit(cli())
