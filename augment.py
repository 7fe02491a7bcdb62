"""Batched image augmentations for FTT's two views: pure functions of uint8 batches (B, C, H, W), on any
device, each image drawing its own randomness. No PIL and no per-image Python loop, so on a GPU the whole
pipeline stays on the GPU. torchvision's v2 transforms draw one set of parameters per call, which on a
batched tensor would augment every image alike; the ops themselves are torchvision's wherever they can be.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

Tensor = torch.Tensor

def crop(x: Tensor, oy: Tensor, ox: Tensor, pad: int) -> Tensor:
    """The (H, W) window at offsets (oy[i], ox[i]) of each image zero-padded by `pad`. With pad 0 and
    offsets 0 it is the identity."""
    b, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    rows = torch.arange(h, device=x.device)[None] + oy.to(x.device)[:, None]    # (B, H)
    cols = torch.arange(w, device=x.device)[None] + ox.to(x.device)[:, None]    # (B, W)
    bi = torch.arange(b, device=x.device)[:, None, None]
    return xp.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def hflip(x: Tensor, which: Tensor) -> Tensor:
    """Mirror left-right the images where which (B,) is True; twice is the identity."""
    return torch.where(which.to(x.device)[:, None, None, None], x.flip(-1), x)


def draw_on(x: Tensor, generator: torch.Generator | None) -> torch.device:
    """Where an augmentation draws its randomness: on the generator's device if one is given, else on
    the batch's, so that a GPU batch never waits for numbers from the host."""
    return generator.device if generator is not None else x.device


def random_crop_flip(x: Tensor, pad: int = 4, generator: torch.Generator | None = None) -> Tensor:
    """Weak view: random crop after zero-padding by `pad`, and a horizontal flip with p = 0.5, each
    image its own offset and coin (v2.RandomCrop on a batch would crop all images alike)."""
    b, dev = len(x), draw_on(x, generator)
    oy, ox = torch.randint(0, 2 * pad + 1, (2, b), generator=generator, device=dev)
    return hflip(crop(x, oy, ox, pad), torch.rand(b, generator=generator, device=dev) < 0.5)


def cutout(x: Tensor, size: int, generator: torch.Generator | None = None) -> Tensor:
    """Cutout (DeVries & Taylor 2017): a size x size square, centred anywhere (clipped at the
    border), set to gray (128), per image. (B, C, H, W) -> same."""
    b, _, h, w = x.shape
    cy = torch.randint(0, h, (b, 1, 1), generator=generator, device=draw_on(x, generator)).to(x.device)
    cx = torch.randint(0, w, (b, 1, 1), generator=generator, device=draw_on(x, generator)).to(x.device)
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    box = ((ys - cy).abs() * 2 < size) & ((xs - cx).abs() * 2 < size)  # (B, H, W)
    return torch.where(box[:, None], torch.full_like(x, 128), x)


# RandAugment's 14 ops with torchvision's magnitude scale (31 bins; v2.RandAugment's defaults:
# 2 ops, magnitude 9, nearest interpolation, fill 0). Signed ops take a random sign per image.
RAND_AUGMENT_OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness",
                    "Color", "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
SIGNED_OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness")


@functools.lru_cache(maxsize=None)
def rand_augment_level(lo: float, hi: float, bins: int, magnitude: int) -> float:
    """v2.RandAugment's magnitude scale, to the bit (a float32 linspace); computed once per setting, so
    that an augmentation step reads nothing back from a tensor."""
    return torch.linspace(lo, hi, bins)[magnitude].item()


@functools.lru_cache(maxsize=None)
def posterize_bits(bins: int, magnitude: int) -> int:
    return int((8 - torch.arange(bins) / ((bins - 1) / 4)).round()[magnitude])


def geometric_op(x: Tensor, op: str, sign: int, magnitude: int, bins: int) -> Tensor:
    """RandAugment's geometric ops (ShearX/Y, TranslateX/Y, Rotate) by torchvision's functional ops, with
    the magnitude v2.RandAugment would give them (nearest interpolation, fill 0)."""
    TF = v2.functional
    level = lambda lo, hi: rand_augment_level(lo, hi, bins, magnitude)
    h, w = x.shape[-2:]
    if op in ("ShearX", "ShearY"):
        deg = math.degrees(math.atan(sign * level(0.0, 0.3)))
        return TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0, center=[0, 0],
                         shear=[deg, 0.0] if op == "ShearX" else [0.0, deg])
    if op in ("TranslateX", "TranslateY"):
        t = int(sign * level(0.0, 150.0 / 331.0 * (w if op == "TranslateX" else h)))
        return TF.affine(x, angle=0.0, translate=[t, 0] if op == "TranslateX" else [0, t], scale=1.0, shear=[0.0, 0.0])
    assert op == "Rotate", op
    return TF.rotate(x, sign * level(0.0, 30.0))


GEOMETRIC_OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")


@functools.lru_cache(maxsize=None)
def source_pixels(op: str, sign: int, magnitude: int, bins: int, h: int, w: int, device: str) -> Tensor:
    """Where each output pixel of a geometric op comes from, as a (H*W,) index into the image's pixels
    counted from 1, with 0 for the fill. Made once per setting and device by torchvision's own op, run on
    an image whose pixels hold their own positions: nearest interpolation copies values, and the fill is 0.
    (torchvision's affine builds its matrix on the host at every call, which on a GPU is a copy the host
    waits for; a cached map is not.)"""
    positions = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, 1, h, w)
    return geometric_op(positions, op, sign, magnitude, bins).round().long().flatten().to(device)


def move_pixels(x: Tensor, source: Tensor) -> Tensor:
    """Output pixel i of every image and channel = input pixel source[i] - 1, or 0 where source[i] is 0."""
    b, c, h, w = x.shape
    return F.pad(x.flatten(2), (1, 0))[:, :, source].view(b, c, h, w)


def adjust_sharpness(x: Tensor, factor: float) -> Tensor:
    """v2.functional.adjust_sharpness on uint8 images, with the same arithmetic, to the bit: the 13-weight
    3x3 smoothing (centre 5), rounded, blended by `factor` inside the 1-pixel border, which stays. Written
    out because torchvision builds its kernel from a host list at every call (a GPU copy the host waits for);
    this one is filled on the batch's device."""
    c, h, w = x.shape[-3:]
    if h <= 2 or w <= 2:
        return x
    kernel = torch.full((c, 1, 3, 3), 1.0 / 13.0, device=x.device)
    kernel[:, :, 1, 1] = 5.0 / 13.0
    out = x.to(torch.float32, copy=True)
    smooth = F.conv2d(out, kernel, groups=c).round_()
    inner = out[..., 1:-1, 1:-1]
    inner.add_(smooth.sub_(inner), alpha=1.0 - factor)
    return out.clamp_(0, 255).to(torch.uint8)


def rand_augment_op(x: Tensor, op: str, sign: int = 1, magnitude: int = 9, bins: int = 31) -> Tensor:
    """One RandAugment op, applied alike to every image of the uint8 batch x, with the magnitude
    v2.RandAugment would give it (sign: +1 or -1): torchvision's functional ops, except the geometric ops
    (a cached pixel map made by torchvision's op) and Sharpness (written out), which give the same images
    without the host synchronisations torchvision's versions cost on a GPU."""
    TF = v2.functional
    level = lambda lo, hi: rand_augment_level(lo, hi, bins, magnitude)
    if op in GEOMETRIC_OPS:
        return move_pixels(x, source_pixels(op, sign, magnitude, bins, *x.shape[-2:], str(x.device)))
    factor = 1.0 + sign * level(0.0, 0.9)
    simple = {"Identity": lambda: x, "Brightness": lambda: TF.adjust_brightness(x, factor),
              "Color": lambda: TF.adjust_saturation(x, factor), "Contrast": lambda: TF.adjust_contrast(x, factor),
              "Sharpness": lambda: adjust_sharpness(x, factor),
              "Posterize": lambda: TF.posterize(x, posterize_bits(bins, magnitude)),
              "Solarize": lambda: TF.solarize(x, 255.0 * level(1.0, 0.0)),
              "AutoContrast": lambda: TF.autocontrast(x), "Equalize": lambda: TF.equalize(x)}
    return simple[op]()


def rand_augment(x: Tensor, num_ops: int = 2, magnitude: int = 9, generator: torch.Generator | None = None,
                 gather: bool | None = None) -> Tensor:
    """RandAugment (Cubuk et al. 2020) on a uint8 batch with per-image randomness, batched: each image
    draws num_ops ops uniformly and a sign each, as v2.RandAugment does for one image. (v2.RandAugment on
    a batch would give every image the same ops.) Two ways to the same images: gather (the CPU's
    default) runs each (op, sign) on the images that drew it, which needs their count on the host;
    otherwise (a GPU's) each (op, sign) runs on the whole batch and each image keeps its own draw: more
    arithmetic, but no host synchronisation."""
    b, dev = len(x), draw_on(x, generator)
    gather = x.device.type == "cpu" if gather is None else gather
    for _ in range(num_ops):
        key = torch.randint(len(RAND_AUGMENT_OPS), (b,), generator=generator, device=dev) * 2 + \
            (torch.rand(b, generator=generator, device=dev) < 0.5)  # op index * 2 + (sign is -1)
        key = key.to(x.device)
        if gather:
            out = torch.empty_like(x)
            for k in key.unique().tolist():
                idx = (key == k).nonzero().flatten()
                out[idx] = rand_augment_op(x[idx], RAND_AUGMENT_OPS[k // 2], -1 if k % 2 else 1, magnitude)
        else:
            out = x
            for i, op in enumerate(RAND_AUGMENT_OPS):
                for sign in ((1, -1) if op in SIGNED_OPS else (1,)):
                    drew = key // 2 == i if op not in SIGNED_OPS else key == 2 * i + (sign == -1)
                    out = torch.where(drew[:, None, None, None], rand_augment_op(x, op, sign, magnitude), out)
        x = out
    return x
