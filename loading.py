"""What a run reads: published checkpoint layouts (--model), safe loading, --normalize, the dataset readers,
your own image folders, and the experiment's data (poisoned, split for the defender). One prepare(cfg) gives
ftt.main and baselines.py the same data, evaluation and model to purify. Everything ends as uint8 NCHW
tensors; nothing is decoded in a training loop.
"""
from __future__ import annotations

import gzip
import json
import pickle
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torchvision
from torchvision.transforms import v2

import attacks
from harness import ConfigError, DataError, evaluator, pick_device, results_table, save_atomic_text, validate

Tensor = torch.Tensor

# ================================================================================================
# --normalize: models trained on normalised inputs get a Normalize module in front of their stem
# ================================================================================================

# presets: (mean, std) per channel, as published backdoor code normalises its inputs
# (BackdoorBench and WaNet for CIFAR; torchvision's ImageNet figures)
NORMALIZE_PRESETS = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)),
                     "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
                     "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}


class Normalize(nn.Module):
    """(x - mean) / std per channel, for models trained on normalised inputs (--normalize). mean and std
    are buffers that are not saved (persistent=False): the backbone's state_dict stays the plain model,
    and results.json records the normalisation to use it with. (torchvision's v2.Normalize keeps them as
    Python lists and rebuilds the tensors on every call; as buffers they move with the model.)"""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def normalization(spec: str, channels: int | None = None) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """--normalize: a preset name, or MEAN,STD numbers (one of each, or one per channel: all means, then all
    stds) -> (mean, std) with `channels` entries each; None for no normalisation."""
    if not spec:
        return None
    if spec in NORMALIZE_PRESETS:
        mean, std = NORMALIZE_PRESETS[spec]
    else:
        try:
            v = tuple(float(t) for t in spec.split(","))
        except ValueError:
            v = ()
        if not v or len(v) % 2:
            raise ConfigError(f"--normalize: {spec!r} is neither a preset ({', '.join(NORMALIZE_PRESETS)}) nor "
                              f"MEAN,STD numbers (one of each, or one per channel)")
        mean, std = v[:len(v) // 2], v[len(v) // 2:]
    if not all(s > 0 for s in std):
        raise ConfigError(f"--normalize: std {std} must be > 0")
    if channels is None:
        return mean, std
    if len(mean) == 1:
        mean, std = mean * channels, std * channels
    if len(mean) != channels:
        raise ConfigError(f"--normalize: {spec} has {len(mean)} channels, the images have {channels}")
    return mean, std



# ================================================================================================
# --arch tv:NAME: torchvision's own model, cut into stem / stages / head (ftt.stage_outputs' interface), so
# the exits attach after its stages and its state_dict keys stay torchvision's
# ================================================================================================

# family -> (trunk: its modules in forward order, how many of them form the stem, head: what follows the trunk).
# Each is what torchvision's forward does, written as modules (mobilenet_v2 and densenet pool in their forward).
TV_FAMILIES = {
    "resnet": (lambda m: [m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4], 4,
               lambda m: [m.avgpool, nn.Flatten(1), m.fc]),
    "vgg": (lambda m: list(m.features), 0, lambda m: [m.avgpool, nn.Flatten(1), *m.classifier]),
    "mobilenet_v2": (lambda m: list(m.features), 1, lambda m: [nn.AdaptiveAvgPool2d(1), nn.Flatten(1), *m.classifier]),
    "mobilenet_v3": (lambda m: list(m.features), 1, lambda m: [m.avgpool, nn.Flatten(1), *m.classifier]),
    "efficientnet": (lambda m: list(m.features), 1, lambda m: [m.avgpool, nn.Flatten(1), *m.classifier]),
    "densenet": (lambda m: list(m.features), 4,
                 lambda m: [nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1), m.classifier]),
    "convnext": (lambda m: list(m.features), 1, lambda m: [m.avgpool, *m.classifier]),
}
TV_TOKENS = ("vit_", "swin_", "maxvit_")  # transformers: their features are tokens, not (C, H, W) maps


def tv_family(name: str) -> str:
    """torchvision model name -> TV_FAMILIES key (resnext and wide_resnet are ResNets)."""
    if name.startswith(TV_TOKENS):
        raise ConfigError(f"--arch tv:{name}: a transformer; its exits would need a token form of the attention "
                          f"maps of eq. (2)-(4), not built yet")
    for family in TV_FAMILIES:
        if name.startswith(family):
            return family
    if name.startswith(("resnext", "wide_resnet")):
        return "resnet"
    raise ConfigError(f"--arch tv:{name}: where its stages end is not known here; cut families: "
                      f"{', '.join(TV_FAMILIES)} (and resnext, wide_resnet)")


def group_by_resolution(modules: list[nn.Module], x: Tensor) -> list[list[nn.Module]]:
    """Split a trunk into stages: a module with parameters that lowers the resolution (a strided conv or
    block) opens a new stage; one without (a pooling) closes the stage it ends, as VGG's max-pools do."""
    stages, closed = [], False
    for mod in modules:
        size = x.shape[-1]
        x = mod(x)
        lowered, pooling = x.shape[-1] < size, not any(True for _ in mod.parameters())
        if not stages or closed or (lowered and not pooling):
            stages.append([mod])
        else:
            stages[-1].append(mod)
        closed = lowered and pooling
    return stages


class TorchvisionBackbone(nn.Module):
    """torchvision.models.get_model(name) as .stem, .stages, .head (the very same modules). `tv_keys` maps this
    module's state_dict keys to torchvision's, the "torchvision" layout of --model and export_layout."""

    def __init__(self, name: str, num_classes: int):
        super().__init__()
        family = tv_family(name)
        try:
            tv = torchvision.models.get_model(name, num_classes=num_classes)
        except ValueError:
            raise ConfigError(f"--arch tv:{name}: torchvision {torchvision.__version__} has no model of that name") from None
        trunk, n_stem, head = TV_FAMILIES[family]
        modules = trunk(tv)
        self.normalize = nn.Identity()
        self.stem = nn.Sequential(*modules[:n_stem])
        tv.eval()
        with torch.no_grad():  # 64 px: every halving of the input shows as its own resolution
            stages = group_by_resolution(modules[n_stem:], self.stem(torch.zeros(1, 3, 64, 64)))
            self.stages = nn.ModuleList(nn.Sequential(*s) for s in stages)
            self.head = nn.Sequential(*head(tv))
            x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
            if not torch.allclose(self.head(self._trunk(x)), tv(x), atol=1e-4):
                raise ConfigError(f"--arch tv:{name}: the cut into stem / stages / head does not reproduce "
                                  f"torchvision's forward; not built")
        where = {id(m): n for n, m in tv.named_modules()}
        self.tv_keys = {}
        for k in self.state_dict():
            path, _, leaf = k.rpartition(".")
            self.tv_keys[k] = f"{where[id(self.get_submodule(path))]}.{leaf}".lstrip(".")
        assert sorted(self.tv_keys.values()) == sorted(tv.state_dict()), name  # every tensor, once

    def _trunk(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        for stage in self.stages:
            h = stage(h)
        return h

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self._trunk(self.normalize(x)))


def check_tv_arch(arch: str) -> None:
    """--arch tv:NAME is refused (one ConfigError line) before any data is read when it cannot be built here."""
    if arch.startswith("tv:"):
        tv_family(arch[3:])
        if arch[3:] not in torchvision.models.list_models(module=torchvision.models):
            raise ConfigError(f"--arch {arch}: torchvision {torchvision.__version__} has no classification model "
                              f"of that name")


def torchvision_backbone(name: str, in_channels: int, num_classes: int) -> TorchvisionBackbone:
    """--arch tv:NAME, built as BackdoorBench builds it: get_model(NAME, num_classes=K), no weights."""
    if in_channels != 3:
        raise ConfigError(f"--arch tv:{name}: torchvision's models take 3-channel images, these have {in_channels}")
    return TorchvisionBackbone(name, num_classes)


# ================================================================================================
# Checkpoints from elsewhere (--model): wrappers, prefixes, and the key layouts of published CIFAR code
# ================================================================================================

@dataclass(frozen=True)
class Layout:
    """A published model's state_dict names. `rules` rename our keys into the file's, in order (re.sub),
    starting from our keys with the head's BatchNorm called head.bn and its Linear head.fc. A file is in
    this layout when its keys are exactly our renamed keys for --arch (so nothing is guessed)."""
    source: str
    arch: str  # a regex over --arch
    rules: tuple = ()


def group(prefix: str):
    """A rule's replacement: our stages.N. -> prefix with N + 1 (published code counts its groups from 1)."""
    return lambda m: prefix.format(int(m[1]) + 1)


# pytorch-cifar's ResNet (models/resnet.py): 3x3 conv1 + bn1, no max-pool, layerN.i.{conv,bn}{1,2,3}, shortcut.{0,1}
RESNET_RULES = ((r"^stem\.0\.", "conv1."), (r"^stem\.1\.", "bn1."), (r"^stages\.(\d+)\.", group("layer{}.")),
                *((rf"\.body\.{i}\.", f".{name}.") for i, name in
                  ((0, "conv1"), (1, "bn1"), (3, "conv2"), (4, "bn2"), (6, "conv3"), (7, "bn3"))))


LAYOUTS = {
    "ftt": Layout("this repo's own backbones (ftt.py)", r".*"),
    # xternalz/WideResNet-pytorch (wideresnet.py), copied by NAD and much backdoor code. Its BasicBlock
    # feeds convShortcut relu(bn1(x)) when the widths differ and adds x itself when they match: our
    # PreActBlock's rule, since a WRN changes width exactly where it has a shortcut conv.
    "wideresnet-pytorch": Layout("xternalz/WideResNet-pytorch, as in NAD", r"wrn\d+-\d+", (
        (r"^stem\.", "conv1."), (r"^stages\.(\d+)\.", group("block{}.layer.")), (r"\.shortcut\.", ".convShortcut."),
        (r"^head\.bn\.", "bn1."), (r"^head\.fc\.", "fc."))),
    # kuangliu/pytorch-cifar's PreActResNet18, as in BackdoorBench and WaNet: no BatchNorm after layer4
    # (read as our head_bn=False). Forks that add one name it bn.
    "preact-resnet": Layout("pytorch-cifar's PreActResNet18, as in BackdoorBench and WaNet", r"preact18", (
        (r"^stem\.", "conv1."), (r"^stages\.(\d+)\.", group("layer{}.")), (r"\.shortcut\.weight$", ".shortcut.0.weight"),
        (r"^head\.bn\.", "bn."), (r"^head\.fc\.", "linear."))),
    "resnet-cifar": Layout("pytorch-cifar's ResNet (3x3 stem), as in backdoor-toolbox", r"resnet(18|50)",
                           RESNET_RULES + ((r"^head\.fc\.", "linear."),)),
    # the same CIFAR ResNet-50 with torchvision's names (downsample, fc); torchvision's own ImageNet ResNet-50 has
    # a 7x7 stem and a max-pool, and fails the shape check at conv1.weight
    "resnet-torchvision-names": Layout("a CIFAR ResNet with torchvision's key names", r"resnet(18|50)",
                                       RESNET_RULES + ((r"\.shortcut\.", ".downsample."), (r"^head\.fc\.", "fc."))),
    # --arch tv:NAME: torchvision's own names, as its constructors (and BackdoorBench) save them
    "torchvision": Layout("torchvision.models, as in BackdoorBench", r"tv:.+"),
}
# {"state_dict": ...} etc., as training scripts save them (model_state_dict: PyTorch's tutorials; net_state_dict: MEDIC)
WRAPPERS = ("state_dict", "model", "net", "model_state_dict", "net_state_dict")
PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DistributedDataParallel, torch.compile


def layout_keys(model: nn.Module, layout: str) -> dict[str, str]:
    """Our backbone's state_dict keys -> the names `layout` gives them (the map that --model inverts)."""
    if layout == "torchvision":
        return dict(model.tv_keys)
    rules = LAYOUTS[layout].rules
    last = len(model.head) - 1
    out = {}
    for k in model.state_dict():
        name = k
        if rules:
            name = re.sub(r"^head\.0\.", "head.bn.", re.sub(rf"^head\.{last}\.", "head.fc.", k))
            for pattern, repl in rules:
                name = re.sub(pattern, repl, name)
        out[k] = name
    return out


def unwrap_state(obj, flag: str, path) -> tuple[dict[str, Tensor], dict]:
    """A loaded checkpoint -> (plain state_dict, how it was wrapped): WRAPPERS nested up to twice, then
    one of PREFIXES stripped when every key has it."""
    how = {"wrapper": [], "prefix": ""}
    for _ in range(3):
        if isinstance(obj, dict) and obj and all(isinstance(v, Tensor) for v in obj.values()):
            break
        key = next((w for w in WRAPPERS if isinstance(obj, dict) and isinstance(obj.get(w), dict)), None)
        if key is None:
            kind = f"a dict with keys {list(obj)[:6]}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
            raise ConfigError(f"{flag}: {path} holds {kind}, not a state_dict of tensors (nor one under "
                              f"{', '.join(repr(w) for w in WRAPPERS)})")
        how["wrapper"].append(key)
        obj = obj[key]
    else:
        raise ConfigError(f"{flag}: {path}: no state_dict of tensors under {' -> '.join(how['wrapper'])}")
    for prefix in PREFIXES:
        if all(k.startswith(prefix) for k in obj):
            obj, how["prefix"] = {k[len(prefix):]: v for k, v in obj.items()}, how["prefix"] + prefix
    return obj, how


def numpy_globals() -> list[tuple]:
    """The only globals a checkpoint may name besides torch's own: numpy's array and scalar rebuilders, under
    numpy 1.x's and 2.x's module names (a BackdoorBench record stores its index arrays as numpy arrays)."""
    import numpy as np
    core = getattr(np, "_core", None) or np.core
    names = [(core.multiarray._reconstruct, f"numpy.{m}.multiarray._reconstruct") for m in ("core", "_core")]
    names += [(core.multiarray.scalar, f"numpy.{m}.multiarray.scalar") for m in ("core", "_core")]
    names += [(np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype")]
    if hasattr(np, "dtypes"):  # numpy >= 1.25 builds each dtype as an instance of its own class (Int64DType, ...)
        names += [(type(np.dtype(c)), f"numpy.dtypes.{type(np.dtype(c)).__name__}") for c in "?bBhHiIlLqQefdFD"]
    return names


def safe_load(path: str | Path, flag: str):
    """torch.load(weights_only=True) with numpy_globals() allowed and nothing else: a file that names any other
    global (a class, a function: code that would run) is refused by name, one ConfigError line, before loading."""
    allowed = {name for _, name in numpy_globals()}
    try:
        other = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - allowed)
    except Exception:  # not a zip checkpoint (torch < 1.6's format, or not torch's): torch.load below decides
        other = []
    if other:
        raise ConfigError(f"{flag}: {path} needs {', '.join(other[:4])}{' ...' if len(other) > 4 else ''} to load; "
                          f"refused without running anything in it (only tensors and numpy arrays are read)")
    try:
        with torch.serialization.safe_globals(numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"{flag}: {path} is not a plain tensor checkpoint ({type(e).__name__}); refused without "
                          f"running anything in it") from None


def load_model(path: str | Path, build, arch: str, in_channels: int, num_classes: int,
               flag: str = "--model") -> tuple[nn.Module, dict]:
    """Build --arch (build(arch, in_channels, num_classes, head_bn): ftt.build_backbone) and load a checkpoint
    into it, never running code: torch.load(weights_only=True) refuses pickled objects. Reads any of WRAPPERS
    and PREFIXES and any of LAYOUTS that matches --arch key for key; anything else is one ConfigError line
    naming `flag`. -> (model, what was read)."""
    obj = safe_load(path, flag)
    state, how = unwrap_state(obj, flag, path)
    variants = (True, False) if arch == "preact18" else (True,)  # with and without the head's BatchNorm
    tried = []
    for head_bn in variants:
        model = build(arch, in_channels, num_classes, head_bn)
        for name, layout in LAYOUTS.items():
            if not re.fullmatch(layout.arch, arch):
                continue
            names = layout_keys(model, name)
            theirs = set(names.values())
            if theirs == set(state):
                shapes = {k: v.shape for k, v in model.state_dict().items()}
                for ours, key in names.items():
                    want = shapes[ours]
                    if state[key].shape != want:
                        raise ConfigError(f"{flag}: {key} has shape {tuple(state[key].shape)}, --arch {arch} here "
                                          f"expects {tuple(want)} (check --dataset: input channels and class count)")
                model.load_state_dict({ours: state[key] for ours, key in names.items()})
                info = {"layout": name, "source": layout.source, **how, "tensors": len(state), "arch": arch}
                if not head_bn:
                    info["head"] = "no BatchNorm before pooling"
                return model, info
            tried.append((len(theirs ^ set(state)), name, sorted(theirs - set(state)), sorted(set(state) - theirs)))
    known = ", ".join(n for n, l in LAYOUTS.items() if re.fullmatch(l.arch, arch))
    _, near, missing, extra = min(tried)
    eg = lambda keys: f" (e.g. {keys[0]})" if keys else ""
    raise ConfigError(f"{flag}: not a --arch {arch} checkpoint in a known layout ({known}); first keys "
                      f"{list(state)[:3]}; closest {near}: {len(missing)} keys missing{eg(missing)}, "
                      f"{len(extra)} unexpected{eg(extra)}")


def export_layout(model: nn.Module, layout: str) -> dict[str, Tensor]:
    """Our backbone's state_dict with `layout`'s names: to hand a purified model back to code of that layout."""
    names = layout_keys(model, layout)
    return {names[k]: v for k, v in model.state_dict().items()}



def model_to_purify(cfg, build, in_channels: int, num_classes: int) -> tuple[nn.Module, dict]:
    """The model to defend: --model read in any known layout (else a fresh --arch backbone from build, for the
    attacker to train), with --normalize inside it. -> (model on the CPU, what was read and applied)."""
    if cfg.model:
        model, info = load_model(cfg.model, build, cfg.arch, in_channels, num_classes)
    else:
        model, info = build(cfg.arch, in_channels, num_classes), {}
    norm = normalization(cfg.normalize, in_channels)
    if norm:
        model.normalize = Normalize(*norm)
        info["normalize"] = {"mean": list(norm[0]), "std": list(norm[1])}
    return model, info


def model_line(cfg, read: dict) -> str:
    """One line: what --model was read as and the normalisation applied."""
    parts = []
    if "layout" in read:
        wrapped = "".join(f"[{w!r}]" for w in read["wrapper"])
        parts.append(f"--model: {read['layout']} layout ({read['source']}{', ' + read['head'] if 'head' in read else ''})"
                     f"{', under ' + wrapped if wrapped else ''}{', prefix ' + repr(read['prefix']) + ' stripped' if read['prefix'] else ''}"
                     f": {read['tensors']} tensors -> {cfg.arch}")
    if "normalize" in read:
        parts.append(f"inputs normalised: mean {read['normalize']['mean']} std {read['normalize']['std']}")
    return " | ".join(parts)



# ================================================================================================
# Datasets: one reader for CIFAR's python batches, one for idx files
# ================================================================================================

def read_cifar_batches(files: list[Path], label_key: str) -> tuple[Tensor, Tensor]:
    """CIFAR python-version batch files -> images (N, 3, 32, 32) uint8, labels (N,) int64."""
    xs, ys = [], []
    for f in files:
        with open(f, "rb") as fh:
            d = pickle.load(fh, encoding="latin1")
        xs.append(torch.as_tensor(d["data"], dtype=torch.uint8).view(-1, 3, 32, 32))
        ys.append(torch.as_tensor(d[label_key], dtype=torch.long))
    return torch.cat(xs), torch.cat(ys)


def load_cifar(root: Path, name: str) -> dict:
    # Our own reader, not torchvision's dataset: a copy whose pickles were rewritten (same images,
    # other checksums) fails torchvision's integrity check but reads fine here.
    folder, train, test, key, tv = {
        "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels",
                    torchvision.datasets.CIFAR10),
        "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", torchvision.datasets.CIFAR100),
    }[name]
    if not all((root / folder / f).exists() for f in train + test):
        try:
            tv(str(root), train=True, download=True)
        except Exception as e:  # no network, disk full, ...: one line, not a traceback
            raise DataError(f"{name}: {root / folder} not found and the download failed ({type(e).__name__}); "
                            f"put the python-version batches there or pass --data-root DIR that holds {folder}/") from None
    xtr, ytr = read_cifar_batches([root / folder / f for f in train], key)
    xte, yte = read_cifar_batches([root / folder / f for f in test], key)
    return {"train": (xtr, ytr), "test": (xte, yte), "num_classes": 100 if name == "cifar100" else 10}


def read_idx(path: Path) -> Tensor:
    """An idx file (MNIST format), gzipped or not -> uint8 tensor of its shape."""
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return torch.frombuffer(bytearray(raw[4 + 4 * ndim:]), dtype=torch.uint8).view(shape)


FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian: dataset-fashion-mnist
FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def load_fashion_mnist(root: Path) -> dict:
    def find(folder: Path) -> list[Path] | None:
        paths = [next((p for p in (folder / f, folder / f"{f}.gz") if p.exists()), None) for f in FASHION_FILES]
        return paths if all(paths) else None

    paths = find(root / "FashionMNIST" / "raw") or find(FASHION_SYSTEM_DIR)
    if paths is None:
        try:
            torchvision.datasets.FashionMNIST(str(root), train=True, download=True)
        except Exception as e:
            raise DataError(f"fashion-mnist: not in {root}/FashionMNIST/raw nor {FASHION_SYSTEM_DIR}, and the download "
                            f"failed ({type(e).__name__}); run: apt-get install -y dataset-fashion-mnist") from None
        paths = find(root / "FashionMNIST" / "raw")
    xtr, ytr, xte, yte = (read_idx(p) for p in paths)
    return {"train": (xtr[:, None].contiguous(), ytr.long()), "test": (xte[:, None].contiguous(), yte.long()),
            "num_classes": 10}


def load_dataset(name: str, root: str | Path) -> dict:
    """-> {"train": (x, y), "test": (x, y), "num_classes": int}, x uint8 (N, C, H, W), y int64 (N,)."""
    root = Path(root)
    return load_fashion_mnist(root) if name == "fashion-mnist" else load_cifar(root, name)


# Your own data: ImageFolder layout (torchvision's find_classes / make_dataset), decoded once by PIL
# into the same uint8 (N, C, H, W) tensors; nothing is decoded in the training loop.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def read_images(paths: list[str], flag: str) -> Tensor:
    """Image files of one size -> uint8 (N, C, H, W); C = 3 if any image has colour, else 1."""
    if not paths:
        raise DataError(f"{flag}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    from PIL import Image  # torchvision's own image dependency; used once, at load time
    images = []
    for p in paths:
        try:
            with Image.open(p) as pil:
                gray = pil.mode in ("1", "L", "LA", "I", "I;16", "F")
                im = v2.functional.pil_to_tensor(pil.convert("L" if gray else "RGB"))
        except Exception as e:
            raise DataError(f"{flag}: cannot decode {p} ({type(e).__name__})") from None
        images.append(im)
        if images[-1].shape[1:] != images[0].shape[1:]:
            raise DataError(f"{flag}: {p} is {tuple(im.shape[1:])}, {paths[0]} is {tuple(images[0].shape[1:])}; "
                            f"all images must share one size")
    c = max(im.shape[0] for im in images)
    return torch.stack([im.expand(c, -1, -1) for im in images])


def load_image_folder(root: str, flag: str, classes: list[str] | None = None) -> tuple[Tensor, Tensor, list[str]]:
    """root/<class>/<image> -> (images uint8 (N, C, H, W), labels, class names). Labels are the
    positions of the folder names in `classes` (default: root's own sorted folders, ImageFolder's rule)."""
    from torchvision.datasets.folder import find_classes, make_dataset
    try:
        found, _ = find_classes(root)
    except FileNotFoundError:
        raise DataError(f"{flag}: {root} has no class sub-folders (ImageFolder layout: {root}/<class>/<image>)") from None
    classes = classes or found
    if set(found) - set(classes):
        raise DataError(f"{flag}: folders {sorted(set(found) - set(classes))} are not classes of --clean-dir {classes}")
    index = {c: i for i, c in enumerate(classes)}
    samples = make_dataset(root, {c: index[c] for c in found}, extensions=IMAGE_EXTENSIONS, allow_empty=True)
    x = read_images([p for p, _ in samples], flag)
    return x, torch.tensor([y for _, y in samples], dtype=torch.long), classes


def load_unlabeled_folder(root: str, flag: str) -> Tensor:
    """Every image below root, in sorted path order, labels (if any folders) ignored."""
    return read_images(sorted(str(p) for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS), flag)


def export_image_folder(x: Tensor, y: Tensor, root: str | Path, num_classes: int) -> None:
    """Write uint8 images (N, C, H, W) as PNGs in ImageFolder layout, class folders named by zero-padded
    index (so sorted names = indices). docs/your-model.md's own-data example is made with it."""
    width = len(str(num_classes - 1))
    for i, (im, label) in enumerate(zip(x, y.tolist())):
        folder = Path(root) / f"{label:0{width}d}"
        folder.mkdir(parents=True, exist_ok=True)
        v2.functional.to_pil_image(im.cpu()).save(folder / f"{i:06d}.png")



# ================================================================================================
# The experiment's data: poisoned by the attacker, split for the defender
# ================================================================================================

def pool_with_share(pool: Tensor, poisoned: Tensor, share: float, seed: int) -> Tensor:
    """Table 3: an unlabelled pool of fixed size, len(poisoned) / 0.75 (so that even 75% is possible),
    of which round(share x size) are poisoned samples and the rest clean ones of the original pool."""
    size = int(len(poisoned) / 0.75)
    is_p = torch.isin(pool, poisoned)
    g = torch.Generator().manual_seed(seed + 2)
    pick = lambda idx, k: idx[torch.randperm(len(idx), generator=g)[:k]]
    n_p = round(share * size)
    return torch.cat([pick(pool[is_p], n_p), pick(pool[~is_p], size - n_p)]).sort().values


def benchmark_data(cfg, device: torch.device, make_trigger) -> dict:
    """--dataset: read it, make the trigger (make_trigger(cfg, x, y, k, device): attacker.make_trigger), poison,
    split for the defender, build the ASR set."""
    data = load_dataset(cfg.dataset, cfg.data_root)
    (x_train, y_train), (x_test, y_test) = data["train"], data["test"]
    held_out = None
    if getattr(cfg, "holdout_unseen", 0):  # images past --train-size: the attacker never trained on them
        if cfg.train_size + cfg.holdout_unseen > len(x_train):
            raise ConfigError(f"--holdout-unseen: {cfg.holdout_unseen} images past --train-size {cfg.train_size} "
                              f"exceed {cfg.dataset}'s {len(x_train)} training images")
        held_out = (x_train[cfg.train_size:cfg.train_size + cfg.holdout_unseen],
                    y_train[cfg.train_size:cfg.train_size + cfg.holdout_unseen])
    if cfg.train_size:
        x_train, y_train = x_train[:cfg.train_size], y_train[:cfg.train_size]
    if cfg.test_size:
        x_test, y_test = x_test[:cfg.test_size], y_test[:cfg.test_size]
    k = data["num_classes"]
    if cfg.target >= k:
        raise ConfigError(f"--target: {cfg.target} must be below the {k} classes of {cfg.dataset}")
    n_free = len(x_train) - round(cfg.poison_rate * len(x_train)) * (3 if cfg.attack == "wanet" else 1)
    if round(cfg.clean_ratio * len(x_train)) > n_free:
        raise ConfigError(f"--clean-ratio: {cfg.clean_ratio} asks for {round(cfg.clean_ratio * len(x_train))} clean "
                          f"samples; only {n_free} of {len(x_train)} are untouched by the attack")
    print(f"ftt: {cfg.dataset} {tuple(x_train.shape)} train, {len(x_test)} test | {cfg.arch} | {cfg.attack} "
          f"rate {cfg.poison_rate} target {cfg.target} | device {device}", flush=True)
    if cfg.attack == "none":  # purifying a --model: our pool stays clean; ASR only from --backdoor-dir
        trigger, noise, how = (lambda im: im[:0]), None, {"attack": "none"}
        ps = attacks.PoisonedSet(x_train, y_train, torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))
    else:
        trigger, noise, how = make_trigger(cfg, x_train, y_train, k, device)
        ps = attacks.poison(x_train, y_train, trigger, cfg.poison_rate, cfg.target, cfg.seed, noise,
                            cross_ratio=2.0 if noise is not None else 0.0, clean_label=cfg.clean_label)
    clean_idx, unl_idx = attacks.defender_split(len(x_train), torch.cat([ps.poison_idx, ps.noise_idx]),
                                                cfg.clean_ratio, cfg.seed)
    if cfg.pool_poison_share >= 0:
        unl_idx = pool_with_share(unl_idx, ps.poison_idx, cfg.pool_poison_share, cfg.seed)
    x_bd, y_bd = attacks.backdoor_test_set(x_test, y_test, trigger, cfg.target)
    y_bd_true = y_test[y_test != cfg.target]  # the same images' own classes, for RA
    psnr = attacks.psnr(x_test[:1000], trigger(x_test[:1000])) if cfg.attack != "none" else float("nan")
    print(f"poisoned {len(ps.poison_idx)} (+{len(ps.noise_idx)} noise) | clean subset {len(clean_idx)} | "
          f"unlabelled pool {len(unl_idx)} | trigger PSNR {psnr:.1f} dB", flush=True)
    return {"num_classes": k, "x_poisoned": ps.images, "y_poisoned": ps.labels, "x_clean_train": x_train,
            "y_clean_train": y_train, "x_l": ps.images[clean_idx], "y_l": ps.labels[clean_idx],
            "x_u": ps.images[unl_idx], "x_test": x_test, "y_test": y_test, "x_bd": x_bd, "y_bd": y_bd,
            "y_bd_true": y_bd_true, "trigger": {**how, "psnr_db": psnr}, "held_out": held_out,
            "counts": {"train": len(x_train), "test": len(x_test), "poisoned": len(ps.poison_idx),
                       "noise": len(ps.noise_idx), "clean": len(clean_idx), "unlabelled": len(unl_idx)}}


def own_data(cfg, make_trigger) -> dict:
    """--clean-dir / --unlabeled-dir / --test-dir: your images, for purifying your --model. ASR is
    measured only for a trigger we can rebuild from flags (badnets, blended, wanet with --seed)."""
    x_l, y_l, classes = load_image_folder(cfg.clean_dir, "--clean-dir")
    c, h, w = x_l.shape[1:]
    x_u = load_unlabeled_folder(cfg.unlabeled_dir, "--unlabeled-dir") if cfg.unlabeled_dir else x_l[:0]
    x_te, y_te = (load_image_folder(cfg.test_dir, "--test-dir", classes)[:2] if cfg.test_dir
                  else (x_l[:0], y_l[:0]))
    for flag, x in (("--unlabeled-dir", x_u), ("--test-dir", x_te)):
        if len(x) and x.shape[1:] != x_l.shape[1:]:
            raise DataError(f"{flag}: images are {tuple(x.shape[1:])} (C, H, W), --clean-dir's are {(c, h, w)}")
    if cfg.target >= len(classes):
        raise ConfigError(f"--target: {cfg.target} must be below the {len(classes)} classes of --clean-dir")
    x_bd, y_bd, y_bd_true, trigger = x_te[:0], y_te[:0], y_te[:0], {"attack": "none"}
    if cfg.attack != "none" and len(x_te):
        fn, _, how = make_trigger(cfg, x_l, y_l, len(classes), torch.device("cpu"))
        x_bd, y_bd = attacks.backdoor_test_set(x_te, y_te, fn, cfg.target)
        y_bd_true = y_te[y_te != cfg.target]
        trigger = {"attack": cfg.attack, **how, "target": cfg.target}
    print(f"ftt: your data {tuple(x_l.shape)} clean ({len(classes)} classes), {len(x_u)} unlabelled, "
          f"{len(x_te)} test | {cfg.arch} from {cfg.model}", flush=True)
    return {"num_classes": len(classes), "x_l": x_l, "y_l": y_l, "x_u": x_u, "x_test": x_te, "y_test": y_te,
            "x_bd": x_bd, "y_bd": y_bd, "y_bd_true": y_bd_true, "trigger": trigger, "classes": classes,
            "counts": {"clean": len(x_l), "unlabelled": len(x_u), "test": len(x_te), "backdoor_test": len(x_bd)}}


def load_data(cfg, device: torch.device, make_trigger) -> dict:
    """--dataset, your folders or a --backdoorbench record, then --backdoor-dir's images (labelled --target) as
    the ASR set."""
    if getattr(cfg, "backdoorbench", ""):
        d = backdoorbench_data(cfg)
    else:
        d = own_data(cfg, make_trigger) if cfg.clean_dir else benchmark_data(cfg, device, make_trigger)
    if cfg.backdoor_dir:
        x_bd = load_unlabeled_folder(cfg.backdoor_dir, "--backdoor-dir")
        if x_bd.shape[1:] != d["x_l"].shape[1:]:
            raise DataError(f"--backdoor-dir: images are {tuple(x_bd.shape[1:])} (C, H, W), the clean data's are "
                            f"{tuple(d['x_l'].shape[1:])}")
        d["x_bd"], d["y_bd"] = x_bd, torch.full((len(x_bd),), cfg.target, dtype=torch.long)
        d["y_bd_true"] = None  # their own classes are unknown: no RA
        d["trigger"] = {**d["trigger"], "asr_images": {"dir": cfg.backdoor_dir, "n": len(x_bd), "label": cfg.target}}
        d["counts"] = {**d["counts"], "backdoor_test": len(x_bd)}
        print(f"ASR on --backdoor-dir: {len(x_bd)} images, all counted as class {cfg.target}", flush=True)
    return d


# ================================================================================================
# --backdoorbench RECORD_DIR: a BackdoorBench record (record/<name>/attack_result.pt and its PNG folders), read
# as its utils/save_load_attack.py and utils/bd_dataset_v2.py write it; defense/ftt/ written as its defences do
# ================================================================================================

BB_DATASETS = ("cifar10", "cifar100")  # its clean_data names that have a reader here; its normalisation = our presets
BB_OWN_ARCHS = {"preactresnet18": "preact18"}  # its models/preact_resnet.py; the rest are torchvision's constructors


def bb_arch(model_name: str) -> str:
    """A record's model_name -> --arch: preact18, or tv:NAME where torchvision builds it and its stages are known."""
    if model_name in BB_OWN_ARCHS:
        return BB_OWN_ARCHS[model_name]
    if model_name in torchvision.models.list_models(module=torchvision.models):
        try:
            tv_family(model_name)
            return f"tv:{model_name}"
        except ConfigError as e:
            raise ConfigError(f"--backdoorbench: model_name {model_name}: {str(e).split(': ', 1)[1]}") from None
    raise ConfigError(f"--backdoorbench: model_name {model_name!r} is BackdoorBench's own code, not built here "
                      f"(built: preactresnet18 and torchvision's resnet, vgg, densenet, mobilenet, efficientnet, convnext)")


def read_record(record_dir: str | Path) -> dict:
    """RECORD_DIR/attack_result.pt, loaded with only numpy's array globals allowed (safe_load), its keys checked."""
    path = Path(record_dir) / "attack_result.pt"
    if not path.is_file():
        raise ConfigError(f"--backdoorbench: {path} not found (give the record folder, record/<attack name>)")
    rec = safe_load(path, "--backdoorbench")
    need = ("model_name", "num_classes", "model", "img_size", "clean_data", "bd_test")
    if not isinstance(rec, dict) or any(k not in rec for k in need):
        raise ConfigError(f"--backdoorbench: {path} lacks {[k for k in need if k not in rec]} of a BackdoorBench "
                          f"v2 attack_result.pt")
    return rec


def with_backdoorbench(cfg):
    """cfg with what the record decides filled in: --model (the record; its state_dict is under "model"), --arch
    from model_name, --dataset from clean_data, BackdoorBench's --normalize for it, --attack none (we poison
    nothing: its own poisoned images are read). Anything else is refused in one line."""
    import dataclasses
    if not getattr(cfg, "backdoorbench", ""):
        return cfg
    rec = read_record(cfg.backdoorbench)
    if rec["clean_data"] not in BB_DATASETS:
        raise ConfigError(f"--backdoorbench: clean_data {rec['clean_data']!r} has no reader here ({', '.join(BB_DATASETS)})")
    if cfg.train_size or cfg.clean_dir or cfg.unlabeled_dir:
        raise ConfigError("--backdoorbench: the record fixes the data: drop --train-size and the --*-dir flags")
    if cfg.model and Path(cfg.model) != Path(cfg.backdoorbench) / "attack_result.pt":
        raise ConfigError("--backdoorbench: the record holds the model to purify: drop --model")
    return dataclasses.replace(cfg, model=str(Path(cfg.backdoorbench) / "attack_result.pt"), arch=bb_arch(rec["model_name"]),
                               dataset=rec["clean_data"], normalize=rec["clean_data"], attack="none")


def record_images(state: dict, record_dir: Path, which: str, x_clean: Tensor, y_clean: Tensor,
                  subset: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A prepro_cls_DatasetBD_v2 state -> (indices, images, labels, original labels). Poisoned samples are the
    PNGs of its container (the stored path, or the same last three parts under record_dir when that path does
    not exist); clean ones, where subset keeps them, are the dataset's own. subset: the state's original_index_array
    (bd_test); else every poisoned index (bd_train)."""
    box = state["bd_data_container"]
    if box.get("save_folder_path") is None:
        raise ConfigError(f"--backdoorbench: {which} keeps its images in the pickle (no save_folder_path); "
                          f"only records with PNG folders are read")
    poisoned = {int(i) for i in (state["poison_indicator"] == 1).nonzero()[0]}
    order = [int(i) for i in state["original_index_array"]] if subset else sorted(poisoned)
    entries = {int(k): v for k, v in box["data_dict"].items()}
    paths, bd, orig = [], [], []
    for i in order:
        if i in poisoned:
            p = Path(entries[i]["path"])
            if not p.exists():
                p = record_dir.joinpath(*p.parts[-3:])
            paths.append(str(p))
            bd.append(int(entries[i]["other_info"][0]))
            orig.append(int(entries[i]["other_info"][1]))
    idx = torch.tensor(order, dtype=torch.long)
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise DataError(f"--backdoorbench: {which}: {len(missing)} of {len(paths)} PNGs missing, e.g. {missing[0]}")
    images, labels, original = x_clean[idx].clone(), y_clean[idx].clone(), y_clean[idx].clone()
    is_p = torch.tensor([i in poisoned for i in order], dtype=torch.bool)
    if paths:
        images[is_p] = read_images(paths, f"--backdoorbench {which}")
        labels[is_p], original[is_p] = torch.tensor(bd), torch.tensor(orig)
    return idx, images, labels, original


def backdoorbench_data(cfg) -> dict:
    """The record's experiment as the defender sees it: the clean subset (--clean-index, else --clean-ratio of
    the images bd_train left clean), the pool (the training set with bd_train's poisoned images at their
    indices, labels dropped), the test set, and bd_test as the ASR set with RA from its original labels."""
    import numpy as np
    rec, root = read_record(cfg.backdoorbench), Path(cfg.backdoorbench)
    data = load_dataset(rec["clean_data"], cfg.data_root)
    (x_train, y_train), (x_test, y_test) = data["train"], data["test"]
    h, w, c = (list(rec["img_size"]) + [3])[:3]
    if (c, h, w) != tuple(x_train.shape[1:]):
        raise ConfigError(f"--backdoorbench: img_size {rec['img_size']} differs from {rec['clean_data']}'s "
                          f"{tuple(x_train.shape[1:])} (C, H, W); resized records are not read")
    pool, poisoned = x_train.clone(), torch.empty(0, dtype=torch.long)
    if rec.get("bd_train") is not None:
        poisoned, images, _, _ = record_images(rec["bd_train"], root, "bd_train", x_train, y_train, subset=False)
        pool[poisoned] = images
    else:
        print("ftt: --backdoorbench: the record has no bd_train: the pool is the clean training set", flush=True)
    bd_idx, x_bd, y_bd, y_bd_true = record_images(rec["bd_test"], root, "bd_test", x_test, y_test, subset=True)
    if cfg.test_size:  # the first N test images, and the triggered versions of those only
        first = bd_idx < cfg.test_size
        x_test, y_test, x_bd, y_bd, y_bd_true = (x_test[:cfg.test_size], y_test[:cfg.test_size], x_bd[first],
                                                 y_bd[first], y_bd_true[first])
    if cfg.clean_index:
        clean_idx = torch.as_tensor(np.loadtxt(cfg.clean_index, dtype=np.int64).reshape(-1))
        if len(clean_idx) == 0 or clean_idx.min() < 0 or clean_idx.max() >= len(x_train):
            raise ConfigError(f"--clean-index: {cfg.clean_index} must list indices in [0, {len(x_train)})")
        rest = torch.ones(len(x_train), dtype=torch.bool)
        rest[clean_idx] = False
        unl_idx = rest.nonzero().flatten()
    else:
        clean_idx, unl_idx = attacks.defender_split(len(x_train), poisoned, cfg.clean_ratio, cfg.seed)
    targets = torch.bincount(y_bd).argmax().item() if len(y_bd) else -1
    print(f"ftt: BackdoorBench record {root} | {rec['model_name']} on {rec['clean_data']} | {len(poisoned)} poisoned "
          f"training images | bd_test {len(x_bd)} images (target {targets}) | clean subset {len(clean_idx)} | "
          f"unlabelled pool {len(unl_idx)}", flush=True)
    return {"num_classes": int(rec["num_classes"]), "x_l": x_train[clean_idx], "y_l": y_train[clean_idx],
            "x_u": pool[unl_idx], "x_test": x_test, "y_test": y_test, "x_bd": x_bd, "y_bd": y_bd, "y_bd_true": y_bd_true,
            "trigger": {"attack": "backdoorbench", "record": str(root), "model_name": rec["model_name"],
                        "target": targets, "asr_images": len(x_bd)},
            "counts": {"train": len(x_train), "test": len(x_test), "poisoned": len(poisoned), "clean": len(clean_idx),
                       "unlabelled": len(unl_idx), "backdoor_test": len(x_bd)}}


def write_defense_result(model: nn.Module, read: dict, results: dict, cfg) -> Path:
    """RECORD_DIR/defense/ftt/: defense_result.pt as save_defense_result writes it ({model_name, num_classes,
    model: the state_dict in the record's own key names}) and ftt_df_summary.csv (test_acc, test_asr, test_ra as
    fractions, BackdoorBench's metric names), so its analysis scripts read FTT like any of its defences."""
    rec = read_record(cfg.backdoorbench)
    out = Path(cfg.backdoorbench) / "defense" / "ftt"
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in export_layout(model, read["layout"]).items()}
    torch.save({"model_name": rec["model_name"], "num_classes": int(rec["num_classes"]), "model": state},
               out / "defense_result.pt")
    frac = lambda v: "" if v is None else f"{v / 100:.6f}"
    (out / "ftt_df_summary.csv").write_text(",test_acc,test_asr,test_ra\n"
                                            f"0,{frac(results.get('acc'))},{frac(results.get('asr'))},{frac(results.get('ra'))}\n")
    return out


def prepare(cfg, build, make_trigger) -> dict:
    """What ftt.main and every baseline share, made once: the flags checked, the device, the data (read,
    poisoned, split: the same for the same flags and seed), on the device as uint8, the evaluation, and the
    model to purify (--model, or a fresh backbone from build for the attacker to train), on the device.
    p["cfg"] is the configuration in effect (a --backdoorbench record fills in --model, --arch, --dataset)."""
    cfg = with_backdoorbench(cfg)
    validate(cfg)
    check_tv_arch(cfg.arch)
    normalization(cfg.normalize)  # its syntax; the channel count is checked once the data is read
    t0 = time.time()
    device = pick_device(cfg.device, cfg.keep_memory)
    torch.manual_seed(cfg.seed)
    d = load_data(cfg, device, make_trigger)
    x_l, y_l, x_u = d["x_l"].to(device), d["y_l"].to(device), d["x_u"].to(device)
    x_te, y_te, x_bd, y_bd = (d[n].to(device) for n in ("x_test", "y_test", "x_bd", "y_bd"))
    y_ra = d.get("y_bd_true")  # RA where the triggered images' own classes are known
    evaluate = evaluator(x_te, y_te, x_bd, y_bd, y_ra.to(device) if y_ra is not None and len(y_ra) else None,
                         device, cfg.channels_last)
    torch.manual_seed(cfg.seed)  # training starts from the seed, whatever fitting the trigger consumed
    model, read = model_to_purify(cfg, build, x_l.shape[1], d["num_classes"])  # a mismatch ends here
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if read:
        print(model_line(cfg, read), flush=True)
    return {"cfg": cfg, "device": device, "d": d, "x_l": x_l, "y_l": y_l, "x_u": x_u, "evaluate": evaluate, "model": model,
            "held_out": d.get("held_out"),  # --holdout-unseen; purify moves it to the device
            "read": read, "num_classes": d["num_classes"], "shape": tuple(x_l.shape[1:]), "data_s": time.time() - t0,
            "counts": {**d["counts"], "train": len(d.get("x_poisoned", ())), "clean": len(x_l),
                       "unlabelled": len(x_u), "test": len(x_te), "backdoor_test": len(x_bd)}}


def finish(out: Path, cfg, purified: nn.Module, report: dict) -> None:
    """ftt.main's last step: purified.pt, then results.json (report), the checkpoint gone, BackdoorBench's files under
    --backdoorbench, and the results table on stdout."""
    results, minutes = report["results"], report["timings"]["total_s"] / 60
    torch.save(purified.state_dict(), out / "purified.pt")
    save_atomic_text(json.dumps(report, indent=1), out / "results.json")
    (out / "checkpoint.pt").unlink(missing_ok=True)  # the run is finished; purified.pt is what remains
    if cfg.backdoorbench:
        print(f"wrote {write_defense_result(purified, report['model'], results[list(results)[-1]], cfg)}"
              f"/defense_result.pt and ftt_df_summary.csv (BackdoorBench's format)")
    title = (f"BackdoorBench record {Path(cfg.backdoorbench).name} ({cfg.dataset}, {cfg.arch})" if cfg.backdoorbench
             else f"{cfg.attack} ({cfg.dataset if not cfg.clean_dir else 'your data'}, {cfg.arch})")
    print("\n" + results_table(title, results))
    print(f"\nwrote {out / 'purified.pt'} and {out / 'results.json'} ({minutes:.1f} min)")
