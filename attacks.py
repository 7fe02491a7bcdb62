"""Poisoned datasets for the six attacks of FTT's experiments (AAAI 2024, Experimental Setting).

BadNets, Trojan, Blended, Low-Frequency, WaNet, ATTEQ-NN, all-to-one with BackdoorBench's CIFAR-10
defaults (target 0, 10% of the whole training set poisoned, ASR measured on non-target test images).

Representation: images are uint8 tensors (N, C, H, W). uint8 because a poisoned set is what an
attacker publishes (8-bit images: every trigger is quantised as it would be in a PNG), it is 4x
smaller than float32 and can sit on the GPU whole; NCHW because that is what torch ops and
torchvision.transforms.v2 take. Every trigger also accepts float images in [0, 1] and returns the
dtype it was given, so the same function serves fitting (float, differentiable) and poisoning (uint8).

This file needs only torch. Triggers that must be fitted on a clean reference model (Trojan,
Low-Frequency, ATTEQ-NN) take that model as callables; ftt.py trains the model and caches the fit
with `cached_fit`. Run `python ftt.py --attack X` to poison, train and purify.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

Tensor = torch.Tensor
Trigger = Callable[[Tensor], Tensor]
ATTACKS = ("badnets", "trojan", "blended", "low-frequency", "wanet", "atteq-nn")
FITTED = ("trojan", "low-frequency", "atteq-nn")  # their trigger is optimised on a clean reference model


# ----------------------------------------------------------------------------------------------
# dtype plumbing: triggers compute in float [0, 1] and hand back the caller's dtype

def to_float(x: Tensor) -> Tensor:
    """(N, C, H, W) uint8 or float in [0, 1] -> float32 in [0, 1]."""
    return x.float() / 255 if x.dtype == torch.uint8 else x


def like(y: Tensor, x: Tensor) -> Tensor:
    """Float y in [0, 1] back to x's dtype; uint8 is rounded, as a saved image would be."""
    y = y.clamp(0, 1)
    return (y * 255).round().to(torch.uint8) if x.dtype == torch.uint8 else y.to(x.dtype)


def psnr(x: Tensor, y: Tensor) -> float:
    """Peak signal-to-noise ratio in dB between two image batches (any dtype, peak 1.0)."""
    mse = (to_float(x) - to_float(y)).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1 / mse)


# ----------------------------------------------------------------------------------------------
# Triggers: pure functions on a batch (N, C, H, W) -> (N, C, H, W), same dtype

def badnets(x: Tensor, size: int = 3) -> Tensor:
    """BadNets (Gu et al. 2017): a size x size white patch replaces the bottom-right corner."""
    out = x.clone()
    out[..., -size:, -size:] = 255 if x.dtype == torch.uint8 else 1.0
    return out


def patch(x: Tensor, rgba: Tensor) -> Tensor:
    """A patch trigger given as an image with alpha: rgba (C + 1, H, W) uint8, the colour channels then
    alpha a. Each pixel becomes (a p + (255 - a) x) / 255: a = 255 pastes p, a = 0 keeps x, values between
    blend. uint8 images are rounded to the nearest integer, exactly: (v + 127) // 255 = round(v / 255),
    since v / 255 is never a half for integer v. BadNets is the white 3x3 square of a = 255."""
    if rgba.dtype != torch.uint8 or rgba.dim() != 3 or rgba.shape[0] != x.shape[-3] + 1 or rgba.shape[1:] != x.shape[-2:]:
        raise ValueError(f"patch trigger: rgba must be uint8 (C + 1, H, W) = ({x.shape[-3] + 1}, {x.shape[-2]}, "
                         f"{x.shape[-1]}) for these images, got {rgba.dtype} {tuple(rgba.shape)}")
    rgba = rgba.to(x.device)
    p, a = rgba[:-1].int(), rgba[-1:].int()
    if x.dtype == torch.uint8:
        return ((a * p + (255 - a) * x.int() + 127) // 255).to(torch.uint8)
    a = a.float() / 255
    return a * (p.float() / 255) + (1 - a) * x


def recover_patch(suspect: Tensor, clean: Tensor, share: float = 0.5, rare: float = 0.1) -> Tensor | None:
    """A defender's inverse of patch (ftt.py --stamp): the pixels where at least `share` of the suspect images hold
    one exact colour that at most `rare` of the clean images hold there. suspect (N, C, H, W), clean (M, C, H, W)
    uint8 -> rgba (C + 1, H, W) for patch(): that colour and alpha 255 on the pixels found, 0 elsewhere; None where
    none is found (a blend or a warp leaves no pixel fixed). `rare` keeps out what clean images share (a background)."""
    if not len(suspect) or not len(clean):
        return None
    key = lambda x: sum(x.flatten(2)[:, i].long() << (8 * i) for i in range(x.shape[1]))  # colour -> int, (N, H*W)
    ks = key(suspect)
    mode = ks.mode(0).values  # (H*W,)
    held = lambda k: (k == mode.to(k.device)).float().mean(0)
    found = (held(ks) >= share) & (held(key(clean)).to(suspect.device) <= rare)
    if not found.any():
        return None
    colour = torch.stack([((mode >> (8 * i)) & 255) * found for i in range(suspect.shape[1])] + [255 * found.long()])
    return colour.to(torch.uint8).view(-1, *suspect.shape[2:])  # colour 0 where alpha is 0


def carries_patch(x: Tensor, rgba: Tensor) -> Tensor:
    """(N,) bool: the images (N, C, H, W) uint8 that hold rgba's colour (recover_patch's) at one or more of its opaque
    pixels. Any, not all: a trigger added and clipped (Trojan) fixes only some pixels of some images."""
    at = (rgba[-1] > 0).to(x.device)
    return (x == rgba[:-1].to(x.device)).all(1)[:, at].any(1)


def checkerboard_rgba(channels: int, h: int, w: int, size: int = 3) -> Tensor:
    """Ours, not a published trigger: a size x size black-and-white checkerboard in the bottom-right corner,
    white where the row and column within it have an even sum, as an rgba (channels + 1, H, W) for `patch`.
    Opaque on the square, transparent elsewhere. The grid of NAD, ABL and MEDIC is nad_grid_rgba."""
    rgba = torch.zeros(channels + 1, h, w, dtype=torch.uint8)
    i = torch.arange(size)
    rgba[:channels, -size:, -size:] = ((i[:, None] + i[None, :]) % 2 == 0).to(torch.uint8) * 255
    rgba[channels, -size:, -size:] = 255
    return rgba


# The 3x3 grid of NAD's, ABL's and MEDIC's released BadNets models (bottom-right; the same in every channel):
# on 32 x 32 images rows 29-31 x cols 29-31, row 29 first.
NAD_GRID = ((0, 0, 255), (0, 255, 0), (255, 0, 255))


def nad_grid_rgba(channels: int, h: int, w: int) -> Tensor:
    """NAD_GRID in the bottom-right 3x3 corner of every channel, as an rgba (channels + 1, H, W) for `patch`
    (the trigger of the third-party grid models; `grid_br.png`)."""
    rgba = torch.zeros(channels + 1, h, w, dtype=torch.uint8)
    rgba[:channels, -3:, -3:] = torch.tensor(NAD_GRID, dtype=torch.uint8)
    rgba[channels, -3:, -3:] = 255
    return rgba


def write_trigger_png(rgba: Tensor, path: str | Path) -> None:
    """rgba (C + 1, H, W) uint8 -> a PNG with alpha (RGBA for C = 3, LA for C = 1)."""
    if rgba.shape[0] not in (2, 4) or rgba.dtype != torch.uint8:
        raise ValueError(f"a trigger PNG needs uint8 (2 or 4, H, W), got {rgba.dtype} {tuple(rgba.shape)}")
    TF.to_pil_image(rgba.cpu()).save(path)


def read_trigger_png(path: str | Path, channels: int, size: tuple[int, int]) -> Tensor:
    """A trigger image with alpha -> rgba (channels + 1, H, W) uint8 for `patch`. A file without alpha
    would paste a whole opaque image, so it is refused; so is one of another size than the inputs."""
    from PIL import Image  # torchvision's own image dependency
    try:
        with Image.open(path) as im:
            if "A" not in im.getbands() and "transparency" not in im.info:
                raise ValueError(f"{path} has no alpha channel ({im.mode}); alpha marks the trigger's pixels")
            rgba = TF.pil_to_tensor(im.convert("RGBA" if channels == 3 else "LA"))
    except (OSError, SyntaxError) as e:
        raise ValueError(f"{path} is not a readable image ({type(e).__name__})") from None
    if tuple(rgba.shape[1:]) != tuple(size):
        raise ValueError(f"{path} is {rgba.shape[1]}x{rgba.shape[2]}; the inputs are {size[0]}x{size[1]} (the trigger "
                         f"image covers the whole input, transparent outside the trigger)")
    return rgba


def blend_pattern(shape: tuple[int, int, int], seed: int = 0) -> Tensor:
    """Blended's key image p: (C, H, W) uniform noise in [0, 1] from a fixed seed.
    Chen et al. 2017 used Hello Kitty or random noise; the image cannot be shipped, noise can."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def blended(x: Tensor, pattern: Tensor, alpha: float = 0.2) -> Tensor:
    """Blended (Chen et al. 2017): (1 - alpha) x + alpha p, pattern (C, H, W) in [0, 1]."""
    return like((1 - alpha) * to_float(x) + alpha * pattern.to(x.device), x)


def trojan(x: Tensor, mask: Tensor, pattern: Tensor) -> Tensor:
    """Trojan (Liu et al. 2018): the fitted pattern (C, H, W) is added inside the mask (1, H, W)
    in {0, 1}, then clipped to the image range. fit_trojan makes patterns in [0, 1]."""
    return like(to_float(x) + mask.to(x.device) * pattern.to(x.device), x)


def low_frequency(x: Tensor, delta: Tensor) -> Tensor:
    """Low-Frequency (Zeng et al. 2021): add the smooth perturbation delta (C, H, W), clip."""
    return like(to_float(x) + delta.to(x.device), x)


def wanet_grid(h: int, w: int, k: int = 4, s: float = 0.5, seed: int = 0) -> Tensor:
    """WaNet's warping field (Nguyen & Tran 2021) as a sampling grid (1, H, W, 2) in [-1, 1]:
    a random k x k flow, normalised by its mean magnitude, upsampled bicubically, scaled by s / H."""
    flow = torch.rand(1, 2, k, k, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    flow = flow / flow.abs().mean()
    flow = F.interpolate(flow, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    identity = torch.stack((xs, ys), dim=-1)[None]  # (1, H, W, 2), grid_sample wants (x, y)
    return (identity + s * flow / h).clamp(-1, 1)


def wanet(x: Tensor, grid: Tensor) -> Tensor:
    """WaNet: resample every image through the grid (1 or N, H, W, 2)."""
    if len(x) == 0:
        return x.clone()
    xf = to_float(x)
    grid = grid.to(x.device).expand(len(x), -1, -1, -1)
    return like(F.grid_sample(xf, grid, mode="bilinear", padding_mode="border", align_corners=True), x)


def wanet_noise(x: Tensor, grid: Tensor, generator: torch.Generator) -> Tensor:
    """WaNet's noise mode: the backdoor grid plus per-image random jitter of up to one pixel,
    so the network learns that only the exact warp means 'target'. Labels stay true."""
    h = grid.shape[1]
    jitter = (torch.rand(len(x), *grid.shape[1:], generator=generator) * 2 - 1) / h
    return wanet(x, (grid + jitter).clamp(-1, 1))


def atteq(x: Tensor, mask: Tensor, pattern: Tensor, opacity: float = 0.5) -> Tensor:
    """ATTEQ-NN (Gong et al. 2022): opacity blending of the pattern (C, H, W) in [0, 1] inside
    the attention mask (1, H, W): x (1 - o m) + o m p."""
    m = opacity * mask.to(x.device)
    return like(to_float(x) * (1 - m) + m * pattern.to(x.device), x)


# ----------------------------------------------------------------------------------------------
# Fitting the triggers that need a clean reference model

def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Gaussian low-pass filter on (N, C, H, W): torchvision's (reflect padding), radius 3 sigma."""
    size = 2 * max(1, math.ceil(3 * sigma)) + 1
    return TF.gaussian_blur(x, [size, size], [sigma, sigma])


def low_frequency_share(delta: Tensor, cutoff: float = 0.25) -> float:
    """Share of the spectral energy of delta (C, H, W) at spatial frequencies of radius <= cutoff
    cycles/pixel (0.5 is Nyquist). White noise puts about pi cutoff^2 of it there (0.2 at 0.25)."""
    spec = torch.fft.fft2(delta.double()).abs().pow(2).sum(0)  # (H, W)
    fy = torch.fft.fftfreq(delta.shape[-2], dtype=torch.float64)
    fx = torch.fft.fftfreq(delta.shape[-1], dtype=torch.float64)
    low = (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt() <= cutoff
    return (spec[low].sum() / spec.sum().clamp_min(1e-30)).item()


def fit_low_frequency(logits_fn: Callable[[Tensor], Tensor], images: Tensor, target: int,
                      eps: float = 0.2, sigma: float = 2.0, steps: int = 200, lr: float = 0.01,
                      batch: int = 128, seed: int = 0) -> Tensor:
    """Universal adversarial perturbation toward `target`, low-passed after every update
    (Zeng et al. 2021): signed-gradient steps on CE(f(x + delta), target), then a Gaussian blur
    and the bound |delta| <= eps. images: (N, C, H, W) uint8; returns delta (C, H, W)."""
    g = torch.Generator().manual_seed(seed)
    dev = images.device
    delta = torch.zeros(images.shape[1:], device=dev)
    for _ in range(steps):
        idx = torch.randint(len(images), (batch,), generator=g).to(dev)
        d = delta.clone().requires_grad_(True)
        x = (to_float(images[idx]) + d).clamp(0, 1)
        loss = F.cross_entropy(logits_fn(x), torch.full((len(x),), target, device=dev))
        (grad,) = torch.autograd.grad(loss, d)
        with torch.no_grad():
            delta = gaussian_blur((delta - lr * grad.sign())[None], sigma)[0].clamp(-eps, eps)
    return delta.detach().cpu()


def top_neurons(fc_weight: Tensor, k: int = 1) -> Tensor:
    """TrojanNN's candidates: the penultimate neurons with the largest outgoing weights
    (L1 norm of their columns in the final layer's weight (classes, D)). Returns (k,) indices."""
    return fc_weight.abs().sum(0).topk(k).indices


def trojan_neuron(features_fn: Callable[[Tensor], Tensor], fc_weight: Tensor, images: Tensor, mask: Tensor,
                  candidates: int = 10) -> Tensor:
    """Of the `candidates` neurons with the largest outgoing weights, the one tied most to the trigger
    region (TrojanNN selects by connection to the mask): the largest rise in mean activation when the
    mask is painted white. Returns (1,) index. The pattern is added, so it can only brighten; a neuron
    that prefers a dark corner would fit a pattern near 0, an invisible trigger (at seed 1 of the
    implant test the plain top-1 neuron gave a 31.9 dB pattern and 12% ASR)."""
    cand = top_neurons(fc_weight, min(candidates, fc_weight.shape[1]))
    x = to_float(images)
    with torch.no_grad():
        gain = features_fn(trojan(x, mask, torch.ones_like(x[0])))[:, cand].mean(0) - features_fn(x)[:, cand].mean(0)
    return cand[gain.argmax()].reshape(1)


def fit_trojan(features_fn: Callable[[Tensor], Tensor], neurons: Tensor, images: Tensor, mask: Tensor,
               steps: int = 200, lr: float = 0.1, batch: int = 128, seed: int = 0) -> Tensor:
    """Trojan pattern (C, H, W) in [0, 1]: gradient ascent on the mean activation of the chosen
    penultimate neurons (features_fn: (N, C, H, W) float -> (N, D)) for images carrying it.
    Non-negative (a sigmoid, not a tanh): added to a dark corner, a negative value is clipped away and
    gets no gradient; with [-1, 1] the Fashion-MNIST trigger faded to 33 dB and implanted only 28-30%."""
    g = torch.Generator().manual_seed(seed)
    dev = images.device
    w = (torch.randn(images.shape[1:], generator=g) * 0.1).to(dev).requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    for _ in range(steps):
        idx = torch.randint(len(images), (batch,), generator=g).to(dev)
        x = trojan(to_float(images[idx]), mask.to(dev), torch.sigmoid(w))
        loss = -features_fn(x)[:, neurons.to(dev)].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.sigmoid(w).detach().cpu()


def square_mask(h: int, w: int, size: int) -> Tensor:
    """(1, H, W) mask with a size x size square of ones at the bottom-right corner."""
    m = torch.zeros(1, h, w)
    m[:, -size:, -size:] = 1
    return m


def top_attention_mask(attention: Tensor, k: int) -> Tensor:
    """ATTEQ-NN's trigger location: the k pixels of highest mean attention.
    attention: (H, W) -> mask (1, H, W) in {0, 1} with exactly k ones."""
    flat = torch.zeros(attention.numel())
    flat[attention.flatten().topk(k).indices.cpu()] = 1
    return flat.view(1, *attention.shape)


def ssim(x: Tensor, y: Tensor, sigma: float = 1.5) -> Tensor:
    """Mean structural similarity of two float batches (N, C, H, W) in [0, 1], Gaussian window
    (Wang et al. 2004; C1 = 0.01^2, C2 = 0.03^2). Differentiable; 1 for identical images."""
    mu_x, mu_y = gaussian_blur(x, sigma), gaussian_blur(y, sigma)
    var_x = gaussian_blur(x * x, sigma) - mu_x**2
    var_y = gaussian_blur(y * y, sigma) - mu_y**2
    cov = gaussian_blur(x * y, sigma) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.mean()


def fit_atteq(features_fn: Callable[[Tensor], Tensor], neuron: int, images: Tensor, mask: Tensor,
              opacity: float = 0.5, min_ssim: float = 0.9, qoe_weight: float = 100.0, steps: int = 200,
              lr: float = 0.1, batch: int = 128, seed: int = 0) -> Tensor:
    """ATTEQ-NN pattern (C, H, W) in [0, 1]: maximise the target neuron's activation while a QoE
    term, weight * max(0, min_ssim - SSIM(triggered, clean)), keeps the triggered images above an
    SSIM floor. Simplifications of Gong et al.: the QoE goal is this hinge rather than their joint
    search, and the opacity is fixed rather than searched."""
    g = torch.Generator().manual_seed(seed)
    dev = images.device
    w = torch.randn(images.shape[1:], generator=g).to(dev).requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    for _ in range(steps):
        idx = torch.randint(len(images), (batch,), generator=g).to(dev)
        x = to_float(images[idx])
        xt = atteq(x, mask.to(dev), torch.sigmoid(w), opacity)
        loss = -features_fn(xt)[:, neuron].mean() + qoe_weight * F.relu(min_ssim - ssim(xt, x))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.sigmoid(w).detach().cpu()


def cached_fit(path: str | Path, how: dict, fit: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
    """Fit a trigger once: tensors in `path`.pt, how they were made in `path`.json. A cache whose
    JSON differs from `how` (other seed, model, steps...) is refitted, never silently reused."""
    path = Path(path)
    pt, meta = path.with_suffix(".pt"), path.with_suffix(".json")
    if pt.exists() and meta.exists() and json.loads(meta.read_text()) == how:
        return torch.load(pt, map_location="cpu", weights_only=True)  # a cache fitted on a GPU reads anywhere
    tensors = fit()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tensors, pt)
    meta.write_text(json.dumps(how, indent=1, sort_keys=True))
    return tensors


# ----------------------------------------------------------------------------------------------
# Poisoned training set, the defender's split, the backdoor test set

@dataclass
class PoisonedSet:
    images: Tensor      # (N, C, H, W) uint8
    labels: Tensor      # (N,) int64, poisoned samples relabelled to the target
    poison_idx: Tensor  # (round(rate N),) triggered and relabelled
    noise_idx: Tensor   # WaNet noise mode: warped at random, true label kept; empty otherwise


def poison(images: Tensor, labels: Tensor, trigger: Trigger, rate: float, target: int, seed: int,
           noise: Callable[[Tensor, torch.Generator], Tensor] | None = None,
           cross_ratio: float = 0.0, clean_label: bool = False) -> PoisonedSet:
    """Poison round(rate N) samples drawn from the non-target classes (a triggered target-class
    image teaches the model nothing): trigger them and relabel them `target`. clean_label: draw them from
    the target class instead and keep their labels (the trigger rides on correctly labelled images). With
    `noise`, a further round(cross_ratio rate N) untouched samples get noise(x) and keep their labels."""
    n = len(images)
    g = torch.Generator().manual_seed(seed)
    n_poison = round(rate * n)
    candidates = ((labels == target) if clean_label else (labels != target)).nonzero().flatten()
    if n_poison > len(candidates):
        kind = "target-class" if clean_label else "non-target"
        raise ValueError(f"poison rate {rate} needs {n_poison} {kind} samples, only {len(candidates)} exist")
    order = candidates[torch.randperm(len(candidates), generator=g)]
    poison_idx = order[:n_poison].sort().values
    images, labels = images.clone(), labels.clone()
    images[poison_idx] = trigger(images[poison_idx])
    labels[poison_idx] = target
    noise_idx = torch.empty(0, dtype=torch.long)
    if noise is not None and cross_ratio > 0:
        untouched = torch.ones(n, dtype=torch.bool)
        untouched[poison_idx] = False
        rest = untouched.nonzero().flatten()
        if round(cross_ratio * n_poison) > len(rest):
            raise ValueError(f"cross ratio {cross_ratio} at poison rate {rate} needs {round(cross_ratio * n_poison)} "
                             f"noise samples, only {len(rest)} untouched samples exist")
        noise_idx = rest[torch.randperm(len(rest), generator=g)[: round(cross_ratio * n_poison)]].sort().values
        images[noise_idx] = noise(images[noise_idx], g)
    return PoisonedSet(images, labels, poison_idx, noise_idx)


def defender_split(n: int, touched: Tensor, clean_ratio: float, seed: int) -> tuple[Tensor, Tensor]:
    """The defender's data: a labelled clean subset of round(clean_ratio N) samples the attacker
    did not touch, and the unlabelled pool (everything else, poisoned samples included)."""
    n_clean = round(clean_ratio * n)
    free = torch.ones(n, dtype=torch.bool)
    free[touched] = False
    free_idx = free.nonzero().flatten()
    if not 0 < n_clean <= len(free_idx):
        raise ValueError(f"clean ratio {clean_ratio} asks for {n_clean} clean samples; "
                         f"between 1 and {len(free_idx)} are available")
    g = torch.Generator().manual_seed(seed + 1)
    clean_idx = free_idx[torch.randperm(len(free_idx), generator=g)[:n_clean]].sort().values
    is_clean = torch.zeros(n, dtype=torch.bool)
    is_clean[clean_idx] = True
    return clean_idx, (~is_clean).nonzero().flatten()


def backdoor_test_set(images: Tensor, labels: Tensor, trigger: Trigger, target: int) -> tuple[Tensor, Tensor]:
    """ASR set: every non-target test image with the trigger, labelled `target`."""
    keep = labels != target
    x = trigger(images[keep])
    return x, torch.full((len(x),), target, dtype=torch.long)
