"""The attacker's side of a replication (ftt.py's --dataset runs): its trigger, fitted ones on a clean reference
model of the defender's architecture, and its training of the backdoored model. Not the method: ftt.main calls it
only when no --model is given. The triggers themselves (pure functions) are in attacks.py.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import attacks
from ftt import Config, attention_sum_p, build_backbone, stage_outputs
from harness import SCHEDULES, ConfigError, RunLog, RunState, to_input, train_supervised
from loading import load_model

Tensor = torch.Tensor


def penultimate(backbone: nn.Module, x: Tensor) -> Tensor:
    """The pooled feature the last nn.Linear reads (TrojanNN's neurons): (B, C, H, W) -> (B, D)."""
    return backbone.head[:-1](stage_outputs(backbone, x)[-1])


def clean_reference(cfg: Config, x: Tensor, y: Tensor, num_classes: int, device: torch.device) -> nn.Module:
    """The attacker's clean model of cfg.arch: --reference-model when given, else trained
    cfg.reference_epochs on the clean training set and cached."""
    if cfg.reference_model:
        model = load_model(cfg.reference_model, build_backbone, cfg.arch, x.shape[1], num_classes, "--reference-model")[0]
        return model.to(device).eval().requires_grad_(False)
    model = build_backbone(cfg.arch, x.shape[1], num_classes).to(device)
    x, y = x.to(device), y.to(device)
    path = Path(cfg.cache) / f"reference_{cfg.dataset}_{cfg.arch}_e{cfg.reference_epochs}_n{len(x)}_s{cfg.seed}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, map_location=device, weights_only=True))
    else:
        torch.manual_seed(cfg.seed + 7)
        train_supervised(model, lambda e: (x, y), cfg.reference_epochs, 0.05, cfg.attack_batch, cfg, device,
                         "ref", RunLog(quiet=cfg.quiet))
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model.eval().requires_grad_(False)


def make_trigger(cfg: Config, x: Tensor, y: Tensor, num_classes: int, device: torch.device):
    """-> (trigger: uint8 batch -> uint8 batch, noise function or None, how it was made)."""
    c, h, w = x.shape[1:]
    a = cfg.attack
    if a == "badnets":
        return attacks.badnets, None, {"size": 3}
    if a == "patch":
        try:
            rgba = attacks.read_trigger_png(cfg.trigger, c, (h, w))
        except ValueError as e:
            raise ConfigError(f"--trigger: {e}") from None
        alpha = rgba[-1]
        return (lambda im: attacks.patch(im, rgba)), None, {
            "png": cfg.trigger, "sha256": hashlib.sha256(Path(cfg.trigger).read_bytes()).hexdigest(),
            "pixels": int((alpha > 0).sum()), "opaque_pixels": int((alpha == 255).sum())}
    if a == "blended":
        pattern = attacks.blend_pattern((c, h, w), seed=cfg.seed)
        return (lambda im: attacks.blended(im, pattern, 0.2)), None, {"alpha": 0.2, "pattern": "uniform noise"}
    if a == "wanet":
        grid = attacks.wanet_grid(h, w, k=4, s=0.5, seed=cfg.seed)
        return (lambda im: attacks.wanet(im, grid)), (lambda im, g: attacks.wanet_noise(im, grid, g)), \
            {"k": 4, "s": 0.5, "cross_ratio": 2}
    # fitted triggers: a clean reference model of the same arch (the attacker has clean data)
    ref = clean_reference(cfg, x, y, num_classes, device)
    fit_x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed))[:5000]].to(device)
    made_by = ({"reference_sha256": hashlib.sha256(Path(cfg.reference_model).read_bytes()).hexdigest()}
               if cfg.reference_model else {"reference_epochs": cfg.reference_epochs})
    how = {"attack": a, "dataset": cfg.dataset, "arch": cfg.arch, **made_by, "n": len(x), "seed": cfg.seed,
           "target": cfg.target}
    feats = lambda im: penultimate(ref, im)
    stem = Path(cfg.cache) / f"trigger_{a}_{cfg.dataset}_{cfg.arch}_s{cfg.seed}"
    if a == "trojan":
        how["pattern_range"] = [0, 1]  # caches of the earlier [-1, 1] patterns no longer match
        how["neuron"] = "of the top 10 by outgoing weight, the one a white mask raises most"
        mask = attacks.square_mask(h, w, max(3, h // 6))
        def fit():
            neuron = attacks.trojan_neuron(feats, ref.head[-1].weight, fit_x[:1000], mask)
            return {"mask": mask, "neuron": neuron, "pattern": attacks.fit_trojan(feats, neuron, fit_x, mask, seed=cfg.seed)}
        t = attacks.cached_fit(stem, how, fit)
        return (lambda im: attacks.trojan(im, t["mask"], t["pattern"])), None, how
    if a == "low-frequency":
        t = attacks.cached_fit(stem, how, lambda: {"delta": attacks.fit_low_frequency(
            ref, fit_x, cfg.target, seed=cfg.seed)})
        return (lambda im: attacks.low_frequency(im, t["delta"])), None, how
    if a == "atteq-nn":
        def fit():
            with torch.no_grad():  # mean A^2_sum of the first stage over clean images, at input size
                att = torch.cat([attention_sum_p(stage_outputs(ref, to_input(fit_x[i:i + 500], False))[0])
                                 for i in range(0, len(fit_x), 500)]).mean(0)
                att = F.interpolate(att[None, None], size=(h, w), mode="bilinear")[0, 0]
            mask = attacks.top_attention_mask(att, k=max(9, h * w // 32))
            neuron = int(ref.head[-1].weight[cfg.target].argmax())
            return {"mask": mask, "attention": att.cpu(),
                    "pattern": attacks.fit_atteq(feats, neuron, fit_x, mask, seed=cfg.seed)}
        t = attacks.cached_fit(stem, how, fit)
        return (lambda im: attacks.atteq(im, t["mask"], t["pattern"], 0.5)), None, how
    raise ValueError(f"--attack: unknown attack {a!r}; choose from {', '.join(attacks.ATTACKS)}")


def backdoor(model: nn.Module, d: dict, cfg: Config, device: torch.device, log: RunLog, state: RunState) -> None:
    """The attacker trains model on its poisoned training set (ATTEQ-NN: every other epoch on the clean one)."""
    x_p, y_p = d["x_poisoned"].to(device), d["y_poisoned"].to(device)
    x_c, y_c = d["x_clean_train"].to(device), d["y_clean_train"].to(device)
    epoch_data = lambda e: (x_c, y_c) if cfg.attack == "atteq-nn" and e % 2 else (x_p, y_p)
    train_supervised(model, epoch_data, cfg.attack_epochs, cfg.attack_lr, cfg.attack_batch, cfg, device, "attack",
                     log, cfg.attack_augment, state, SCHEDULES[cfg.attack_schedule])
