"""What a run reads: published checkpoint layouts (--model), safe loading, --normalize, the dataset readers,
your own image folders, and the experiment's data (poisoned, split for the defender). One prepare(cfg) gives
ftt.main and baselines.py the same data, evaluation and model to purify. Everything ends as uint8 NCHW
tensors; nothing is decoded in a training loop.
"""
from __future__ import annotations

import gzip
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
from harness import ConfigError, DataError, evaluator, pick_device, validate

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
    "resnet-cifar": Layout("pytorch-cifar's ResNet50 (3x3 stem)", r"resnet50", RESNET_RULES + ((r"^head\.fc\.", "linear."),)),
    # the same CIFAR ResNet-50 with torchvision's names (downsample, fc); torchvision's own ImageNet ResNet-50 has
    # a 7x7 stem and a max-pool, and fails the shape check at conv1.weight
    "resnet-torchvision-names": Layout("a CIFAR ResNet-50 with torchvision's key names", r"resnet50",
                                       RESNET_RULES + ((r"\.shortcut\.", ".downsample."), (r"^head\.fc\.", "fc."))),
}
WRAPPERS = ("state_dict", "model", "net")  # {"state_dict": ...} etc., as training scripts save them
PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DistributedDataParallel, torch.compile


def layout_keys(model: nn.Module, layout: str) -> dict[str, str]:
    """Our backbone's state_dict keys -> the names `layout` gives them (the map that --model inverts)."""
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


def load_model(path: str | Path, build, arch: str, in_channels: int, num_classes: int,
               flag: str = "--model") -> tuple[nn.Module, dict]:
    """Build --arch (build(arch, in_channels, num_classes, head_bn): ftt.build_backbone) and load a checkpoint
    into it, never running code: torch.load(weights_only=True) refuses pickled objects. Reads any of WRAPPERS
    and PREFIXES and any of LAYOUTS that matches --arch key for key; anything else is one ConfigError line
    naming `flag`. -> (model, what was read)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError for code, others for a corrupt file
        raise ConfigError(f"{flag}: {path} is not a plain tensor state_dict ({type(e).__name__}); "
                          f"refused without running anything in it") from None
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
    """--dataset: read it, make the trigger (make_trigger(cfg, x, y, k, device): ftt.make_trigger), poison,
    split for the defender, build the ASR set."""
    data = load_dataset(cfg.dataset, cfg.data_root)
    (x_train, y_train), (x_test, y_test) = data["train"], data["test"]
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
                            cross_ratio=2.0 if noise is not None else 0.0)
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
            "y_bd_true": y_bd_true, "trigger": {**how, "psnr_db": psnr},
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
    """--dataset or your folders, then --backdoor-dir's images (labelled --target) as the ASR set."""
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


def prepare(cfg, build, make_trigger) -> dict:
    """What ftt.main and every baseline share, made once: the flags checked, the device, the data (read,
    poisoned, split: the same for the same flags and seed), on the device as uint8, the evaluation, and the
    model to purify (--model, or a fresh backbone from build for the attacker to train), on the device."""
    validate(cfg)
    normalization(cfg.normalize)  # its syntax; the channel count is checked once the data is read
    t0 = time.time()
    device = pick_device(cfg.device)
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
    return {"device": device, "d": d, "x_l": x_l, "y_l": y_l, "x_u": x_u, "evaluate": evaluate, "model": model,
            "read": read, "num_classes": d["num_classes"], "shape": tuple(x_l.shape[1:]), "data_s": time.time() - t0,
            "counts": {**d["counts"], "train": len(d.get("x_poisoned", ())), "clean": len(x_l),
                       "unlabelled": len(x_u), "test": len(x_te), "backdoor_test": len(x_bd)}}
