"""loading.py: the dataset readers, your own image folders, safe loading of checkpoints from elsewhere in the
layouts of published code (logits equal to a reference module written in that code's conventions), --normalize,
and the experiment's data (Table 3's pool, --attack none, --backdoor-dir, a trigger PNG)."""
import dataclasses
import gzip
import hashlib
import json
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from hypothesis import given, strategies as st
from torchvision.transforms import v2

import attacker
import attacks
import ftt
import harness
import loading
from conftest import needs_cifar10, needs_fashion

seeds = st.integers(0, 2**31 - 1)


# ------------------------------------------------------------------ data readers and the CLI

def test_cifar_reader_keeps_channel_planes_and_labels(tmp_path):
    data = torch.arange(2 * 3072, dtype=torch.int64).remainder(256).to(torch.uint8).view(2, 3072)
    with open(tmp_path / "b", "wb") as f:
        pickle.dump({"data": data.numpy(), "labels": [3, 8]}, f)
    x, y = loading.read_cifar_batches([tmp_path / "b"], "labels")
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.uint8 and y.tolist() == [3, 8]
    assert torch.equal(x[1, 2].flatten(), data[1, 2048:])  # rows of 1024 R, then G, then B


def test_idx_reader_reads_gzipped_and_plain(tmp_path):
    arr = torch.randint(0, 256, (3, 4, 5), dtype=torch.uint8)
    raw = bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in arr.shape) + arr.numpy().tobytes()
    (tmp_path / "a").write_bytes(raw)
    with gzip.open(tmp_path / "a.gz", "wb") as f:
        f.write(raw)
    assert torch.equal(loading.read_idx(tmp_path / "a"), arr)
    assert torch.equal(loading.read_idx(tmp_path / "a.gz"), arr)


def test_missing_dataset_without_network_is_one_clear_error(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(harness.DataError, match="cifar-10-batches-py") as e:
        loading.load_dataset("cifar10", tmp_path)
    assert "\n" not in str(e.value)


def test_real_cifar10_copy_reads_as_the_official_set():
    root = needs_cifar10()
    d = loading.load_dataset("cifar10", root)
    (x, y), (xt, yt) = d["train"], d["test"]
    assert x.shape == (50000, 3, 32, 32) and xt.shape == (10000, 3, 32, 32)
    assert torch.bincount(y).tolist() == [5000] * 10
    assert yt[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]

class Payload:  # a checkpoint whose unpickling would create a file
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import pathlib
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


@pytest.mark.parametrize("wrap", ["bare", "state_dict"])
def test_checkpoint_carrying_code_is_refused_and_nothing_in_it_runs(wrap, tmp_path, capsys):
    marker = tmp_path / "pwned"
    obj = {"stem.weight": Payload(str(marker))}
    torch.save(obj if wrap == "bare" else {"state_dict": obj}, tmp_path / "evil.pt")
    with pytest.raises(harness.ConfigError, match="refused"):
        loading.load_model(tmp_path / "evil.pt", ftt.build_backbone, "wrn16-1", 3, 10)
    assert not marker.exists()


def test_wrong_arch_or_class_count_names_the_mismatch(tmp_path):
    torch.save(ftt.build_backbone("wrn16-1", 3, 10).state_dict(), tmp_path / "m.pt")
    with pytest.raises(harness.ConfigError, match="not a --arch preact18 checkpoint in a known layout"):
        loading.load_model(tmp_path / "m.pt", ftt.build_backbone, "preact18", 3, 10)
    with pytest.raises(harness.ConfigError, match=r"head.4.weight has shape \(10, 64\).*\(100, 64\)"):
        loading.load_model(tmp_path / "m.pt", ftt.build_backbone, "wrn16-1", 3, 100)
    with pytest.raises(harness.ConfigError, match="stem.weight"):
        loading.load_model(tmp_path / "m.pt", ftt.build_backbone, "wrn16-1", 1, 10)


def test_a_given_reference_model_is_loaded_as_is_and_named_in_the_trigger_recipe(tmp_path):
    x = torch.randint(0, 256, (300, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(300) % 10
    ref = ftt.build_backbone("wrn10-1", 1, 10)
    torch.save(ref.state_dict(), tmp_path / "ref.pt")
    cfg = ftt.Config(dataset="fashion-mnist", arch="wrn10-1", attack="low-frequency",
                     reference_model=str(tmp_path / "ref.pt"), cache=str(tmp_path / "cache"))
    loaded = attacker.clean_reference(cfg, x, y, 10, torch.device("cpu"))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ref.state_dict().items())
    assert not (tmp_path / "cache").exists()  # nothing was trained or cached
    *_, how = attacker.make_trigger(cfg, x, y, 10, torch.device("cpu"))
    assert how["reference_sha256"] == hashlib.sha256((tmp_path / "ref.pt").read_bytes()).hexdigest()
    assert "reference_epochs" not in how
    torch.save(ftt.build_backbone("wrn10-1", 1, 5).state_dict(), tmp_path / "five.pt")
    with pytest.raises(harness.ConfigError, match=r"--reference-model: head.4.weight has shape \(5, 64\)"):
        attacker.clean_reference(dataclasses.replace(cfg, reference_model=str(tmp_path / "five.pt")), x, y, 10,
                            torch.device("cpu"))

# ------------------------------------------------------------------ your own data: ImageFolder in, purified model out

def image_folders(root, n_per_class=6, classes=3, size=16, seed=0):
    """Tiny ImageFolder trees written by the repo's own exporter: random RGB images, 3 classes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n_per_class * classes, 3, size, size), generator=g, dtype=torch.uint8)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    for name in ("clean", "test"):
        loading.export_image_folder(x, y, root / name, classes)
    loading.export_image_folder(x, torch.zeros_like(y), root / "unlabelled", classes)
    return x, y


def test_image_folder_round_trips_and_sorted_folder_names_are_class_indices(tmp_path):
    x, y = image_folders(tmp_path, classes=3)
    got_x, got_y, classes = loading.load_image_folder(str(tmp_path / "clean"), "--clean-dir")
    assert classes == ["0", "1", "2"] and torch.equal(got_y, y) and torch.equal(got_x, x)
    assert torch.equal(loading.load_unlabeled_folder(str(tmp_path / "unlabelled"), "--unlabeled-dir"), x)
    loading.export_image_folder(x[:2], torch.tensor([0, 10]), tmp_path / "wide", 11)
    assert sorted(p.name for p in (tmp_path / "wide").iterdir()) == ["00", "10"]


def test_own_folders_purify_a_handed_model_end_to_end(tmp_path):
    image_folders(tmp_path)
    torch.save(ftt.build_backbone("wrn10-1", 3, 3).state_dict(), tmp_path / "handed.pt")
    report = ftt.main(ftt.Config(model=str(tmp_path / "handed.pt"), arch="wrn10-1", clean_dir=str(tmp_path / "clean"),
                                 unlabeled_dir=str(tmp_path / "unlabelled"), test_dir=str(tmp_path / "test"),
                                 sad_epochs=1, ssl_epochs=1, batch_size=4, mu=1, quiet=True, out=str(tmp_path / "o")))
    # (an untrained handed model over-predicts some class on the pool, so SAD may have gone up its lr ladder)
    assert set(report["results"]) - {"sad_tried", "ssl_pool"} == {"before", "sad", "ssl"} and report["classes"] == ["0", "1", "2"]
    for r in [report["results"][k] for k in ("before", "sad", "ssl")] + report["results"].get("sad_tried", []):
        assert 0 <= r["acc"] <= 100 and 0 <= r["asr"] <= 100
    assert report["counts"] == {"clean": 18, "unlabelled": 18, "test": 18, "backdoor_test": 12}
    ftt.build_backbone("wrn10-1", 3, 3).load_state_dict(torch.load(tmp_path / "o" / "purified.pt", weights_only=True))

def test_own_folders_without_test_or_unlabelled_images_report_what_they_can(tmp_path):
    image_folders(tmp_path)
    torch.save(ftt.build_backbone("wrn10-1", 3, 3).state_dict(), tmp_path / "handed.pt")
    report = ftt.main(ftt.Config(model=str(tmp_path / "handed.pt"), arch="wrn10-1", clean_dir=str(tmp_path / "clean"),
                                 attack="none", sad_epochs=1, batch_size=4, quiet=True, out=str(tmp_path / "o")))
    assert set(report["results"]) == {"before", "sad"}  # no unlabelled images: no stage 2, and no pool check,
    # so SAD ran once at the top of its lr ladder; nothing to measure on, and valid JSON
    assert report["results"]["sad"] == {"acc": None, "asr": None, "lr": ftt.Config.sad_lr_max}
    json.loads((tmp_path / "o" / "results.json").read_text())


@pytest.mark.parametrize("problem", ["mixed sizes", "unknown test class", "wrong class count", "no images"])
def test_bad_own_data_ends_in_one_line_naming_the_problem(problem, tmp_path, capsys):
    image_folders(tmp_path)
    k = 4 if problem == "wrong class count" else 3
    torch.save(ftt.build_backbone("wrn10-1", 3, k).state_dict(), tmp_path / "handed.pt")
    if problem == "mixed sizes":
        v2.functional.to_pil_image(torch.zeros(3, 8, 8, dtype=torch.uint8)).save(tmp_path / "clean" / "1" / "odd.png")
    if problem == "unknown test class":
        (tmp_path / "test" / "7").mkdir()
    if problem == "no images":
        for p in (tmp_path / "clean").rglob("*.png"):
            p.unlink()
    code = ftt.cli(["--model", str(tmp_path / "handed.pt"), "--arch", "wrn10-1", "--clean-dir", str(tmp_path / "clean"),
                    "--test-dir", str(tmp_path / "test"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    want = {"mixed sizes": "odd.png", "unknown test class": "['7']", "wrong class count": "head",
            "no images": "no images"}[problem]
    assert code == 2 and len(err.splitlines()) == 1 and want in err, err
    assert not (tmp_path / "o").exists()  # refused before anything was written


@given(st.sampled_from([0.0, 0.25, 0.5, 0.75]), seeds)
def test_table3_pool_has_the_asked_poisoned_share_at_a_fixed_size(share, seed):
    g = torch.Generator().manual_seed(seed)
    poisoned = torch.randperm(400, generator=g)[:40]
    pool = torch.tensor(sorted(set(range(400)) - set(range(0, 400, 10))))  # a pool holding some of the poisoned
    pool = torch.cat([pool, poisoned]).unique()
    got = loading.pool_with_share(pool, poisoned, share, seed)
    assert len(got) == int(40 / 0.75) and len(got.unique()) == len(got) and torch.isin(got, pool).all()
    assert int(torch.isin(got, poisoned).sum()) == round(share * len(got))

# ------------------------------------------------------------------ --model from elsewhere: layouts, wrappers, --normalize
# Each reference module below is written the way its published code writes it (names, block rules, forward),
# so that a checkpoint saved from it is what a user would hand to --model.

class RefWRNBlock(nn.Module):  # WideResNet-pytorch's BasicBlock: the shortcut conv reads relu(bn1(x)) only when widths differ
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.bn1, self.relu1 = nn.BatchNorm2d(c_in), nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2, self.relu2 = nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.equal = c_in == c_out
        self.convShortcut = None if self.equal else nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False)

    def forward(self, x):
        if self.equal:
            out = self.relu1(self.bn1(x))
        else:
            x = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(out if self.equal else x))))
        return (x if self.equal else self.convShortcut(x)) + out


class RefWRN(nn.Module):  # conv1, block{1,2,3}.layer.{i}, bn1, relu, avg_pool2d(8), fc
    def __init__(self, depth, width, num_classes):
        super().__init__()
        n, ch = (depth - 4) // 6, [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        for g, stride in zip((1, 2, 3), (1, 2, 2)):
            blocks = nn.Module()
            blocks.layer = nn.Sequential(*[RefWRNBlock(ch[g - 1] if i == 0 else ch[g], ch[g], stride if i == 0 else 1)
                                           for i in range(n)])
            setattr(self, f"block{g}", blocks)
        self.bn1, self.relu, self.fc = nn.BatchNorm2d(ch[3]), nn.ReLU(inplace=True), nn.Linear(ch[3], num_classes)

    def forward(self, x):
        out = self.block3.layer(self.block2.layer(self.block1.layer(self.conv1(x))))
        return self.fc(F.avg_pool2d(self.relu(self.bn1(out)), 8).flatten(1))


class RefPreActBlock(nn.Module):  # pytorch-cifar / BackdoorBench: shortcut = Sequential(conv) on relu(bn1(x))
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c_in), nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if hasattr(self, "shortcut") else x
        return self.conv2(F.relu(self.bn2(self.conv1(out)))) + skip


class RefPreActResNet18(nn.Module):  # conv1, layer1..4, [bn], avgpool, linear; BackdoorBench has no final bn
    def __init__(self, num_classes, final_bn):
        super().__init__()
        self.conv1, c, self.final_bn = nn.Conv2d(3, 64, 3, 1, 1, bias=False), 64, final_bn
        for i, (w, s) in enumerate(zip((64, 128, 256, 512), (1, 2, 2, 2)), 1):
            setattr(self, f"layer{i}", nn.Sequential(RefPreActBlock(c, w, s), RefPreActBlock(w, w, 1)))
            c = w
        if final_bn:
            self.bn = nn.BatchNorm2d(512)
        self.avgpool, self.linear = nn.AdaptiveAvgPool2d((1, 1)), nn.Linear(512, num_classes)

    def forward(self, x):
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        out = F.relu(self.bn(out)) if self.final_bn else out
        return self.linear(self.avgpool(out).view(len(x), -1))


class RefBottleneck(nn.Module):  # pytorch-cifar's ResNet Bottleneck; torchvision names the shortcut `downsample`
    def __init__(self, c_in, width, stride, skip_name):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, 4 * width, 1, bias=False), nn.BatchNorm2d(4 * width)
        self.skip_name = skip_name
        setattr(self, skip_name, nn.Sequential(nn.Conv2d(c_in, 4 * width, 1, stride, bias=False), nn.BatchNorm2d(4 * width))
                if stride != 1 or c_in != 4 * width else nn.Sequential())

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
        return F.relu(out + getattr(self, self.skip_name)(x))


class RefResNet50(nn.Module):  # conv1 3x3, bn1, layer1..4, avg_pool2d(4), linear (torchvision names: downsample, fc)
    def __init__(self, num_classes, torchvision_names):
        super().__init__()
        self.conv1, self.bn1, c = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), 64
        skip = "downsample" if torchvision_names else "shortcut"
        for i, (w, n, s) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3), (1, 2, 2, 2)), 1):
            setattr(self, f"layer{i}", nn.Sequential(*[RefBottleneck(c if j == 0 else 4 * w, w, s if j == 0 else 1, skip)
                                                       for j in range(n)]))
            c = 4 * w
        self.head_name = "fc" if torchvision_names else "linear"
        setattr(self, self.head_name, nn.Linear(2048, num_classes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return getattr(self, self.head_name)(F.avg_pool2d(out, 4).flatten(1))


def randomised(model, seed=0):
    """Random weights and BatchNorm statistics (fresh ones would hide a swapped mean / var or scale / shift)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if name.endswith(("running_var", "weight")) and t.dim() == 1
                        else torch.randn(t.shape, generator=g) * (t[0].numel() ** -0.5 if t.dim() > 1 else 0.5))
    return model.eval()


LAYOUT_CASES = {  # layout -> (--arch, reference module, --normalize its code applies to the data, or "")
    "wideresnet-pytorch": ("wrn10-2", lambda: RefWRN(10, 2, 10), ""),
    "preact-resnet (BackdoorBench: no final bn)": ("preact18", lambda: RefPreActResNet18(10, False), "cifar10"),
    "preact-resnet (forks with a final bn)": ("preact18", lambda: RefPreActResNet18(10, True), "cifar10"),
    "resnet-cifar": ("resnet50", lambda: RefResNet50(10, False), ""),
    "resnet-torchvision-names": ("resnet50", lambda: RefResNet50(10, True), ""),
}


@pytest.mark.parametrize("case", LAYOUT_CASES)
def test_a_published_layout_loaded_through_model_gives_the_reference_logits(case, tmp_path):
    arch, make, norm = LAYOUT_CASES[case]
    ref = randomised(make())
    torch.save({"module." + k: v for k, v in ref.state_dict().items()}, tmp_path / "m.pt")  # DataParallel-saved
    model, read = loading.model_to_purify(ftt.Config(model=str(tmp_path / "m.pt"), arch=arch, normalize=norm),
                                          ftt.build_backbone, 3, 10)
    assert read["layout"] == case.split(" ")[0] and read["prefix"] == "module." and read["tensors"] == len(ref.state_dict())
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in loading.NORMALIZE_PRESETS[norm]) if norm else (0, 1)
    with torch.no_grad():
        want, got = ref((x - mean) / std), model.eval()(x)
    assert want.abs().max() < 100 and torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    assert loading.export_layout(model, read["layout"]).keys() == ref.state_dict().keys()  # and back, name for name


@pytest.mark.parametrize("wrap", ["bare", "state_dict", "model", "net", "model/state_dict"])
@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod."])
def test_every_wrapper_and_prefix_is_read(wrap, prefix, tmp_path):
    m = randomised(ftt.build_backbone("wrn10-1", 3, 10))
    obj = {prefix + k: v for k, v in m.state_dict().items()}
    for key in reversed([] if wrap == "bare" else wrap.split("/")):
        obj = {key: obj, "epoch": 25, "best_acc": 84.1, "arch": "wrn"}  # what training scripts store beside it
    torch.save(obj, tmp_path / "m.pt")
    got, read = loading.load_model(tmp_path / "m.pt", ftt.build_backbone, "wrn10-1", 3, 10)
    assert read["wrapper"] == ([] if wrap == "bare" else wrap.split("/")) and read["prefix"] == prefix
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), m.state_dict().values()))


def test_an_unknown_layout_is_one_line_naming_the_first_keys_and_the_known_layouts(tmp_path, capsys):
    image_folders(tmp_path)
    torch.save({"features.0.weight": torch.zeros(8, 3, 3, 3), "classifier.weight": torch.zeros(3, 8)}, tmp_path / "m.pt")
    code = ftt.cli(["--model", str(tmp_path / "m.pt"), "--arch", "wrn16-1", "--clean-dir", str(tmp_path / "clean"),
                    "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "features.0.weight" in err and "ftt" in err and "wideresnet-pytorch" in err and "preact-resnet" not in err
    assert not (tmp_path / "o").exists()


def test_normalize_lives_in_the_model_and_not_in_its_state_dict(tmp_path):
    m = randomised(ftt.build_backbone("wrn10-1", 3, 10))
    torch.save(m.state_dict(), tmp_path / "m.pt")
    model, read = loading.model_to_purify(ftt.Config(model=str(tmp_path / "m.pt"), arch="wrn10-1", normalize="0.5,2"),
                                          ftt.build_backbone, 3, 10)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), m((x - 0.5) / 2), atol=1e-6)
        assert torch.allclose(ftt.stage_outputs(model, x)[-1], ftt.stage_outputs(m, (x - 0.5) / 2)[-1], atol=1e-6)
    assert read["normalize"] == {"mean": [0.5] * 3, "std": [2.0] * 3}
    assert model.state_dict().keys() == m.state_dict().keys()  # purified.pt stays the plain backbone
    assert loading.normalization("0.1,0.2,0.3,1,2,3", 3) == ((0.1, 0.2, 0.3), (1.0, 2.0, 3.0))
    with pytest.raises(harness.ConfigError, match="std"):
        loading.normalization("0.5,0", 3)


def test_attack_none_poisons_nothing_and_leaves_asr_to_backdoor_dir():
    needs_fashion()
    cfg = ftt.Config(dataset="fashion-mnist", data_root="./data", attack="none", train_size=400, test_size=100)
    d = loading.benchmark_data(cfg, torch.device("cpu"), attacker.make_trigger)
    x, y = loading.load_dataset("fashion-mnist", "./data")["train"]
    assert d["counts"]["poisoned"] == 0 and len(d["x_bd"]) == 0 and d["trigger"]["attack"] == "none"
    assert torch.equal(d["x_poisoned"], x[:400]) and torch.equal(d["y_poisoned"], y[:400])
    assert len(d["x_l"]) + len(d["x_u"]) == 400


def test_backdoor_dir_asr_is_accuracy_on_those_images_as_the_target(tmp_path):
    x, _ = image_folders(tmp_path)
    bd = x[:7].clone()
    bd[..., -3:, -3:] = 255  # any images: the folder is the trigger
    loading.export_image_folder(bd, torch.zeros(7, dtype=torch.long), tmp_path / "bd", 3)
    m = randomised(ftt.build_backbone("wrn10-1", 3, 3))
    torch.save(m.state_dict(), tmp_path / "m.pt")
    report = ftt.main(ftt.Config(model=str(tmp_path / "m.pt"), arch="wrn10-1", clean_dir=str(tmp_path / "clean"),
                                 test_dir=str(tmp_path / "test"), backdoor_dir=str(tmp_path / "bd"), attack="none",
                                 target=2, sad_epochs=0, quiet=True, out=str(tmp_path / "o")))
    want = harness.accuracy(m, bd, torch.full((7,), 2), torch.device("cpu"))
    assert report["results"]["before"]["asr"] == want and report["counts"]["backdoor_test"] == 7
    assert report["trigger"]["asr_images"] == {"dir": str(tmp_path / "bd"), "n": 7, "label": 2}


def test_a_patch_trigger_png_poisons_and_measures_the_same_way_in_a_run(tmp_path):
    image_folders(tmp_path)
    rgba = attacks.checkerboard_rgba(3, 16, 16)
    attacks.write_trigger_png(rgba, tmp_path / "t.png")
    m = randomised(ftt.build_backbone("wrn10-1", 3, 3))
    torch.save(m.state_dict(), tmp_path / "m.pt")
    report = ftt.main(ftt.Config(model=str(tmp_path / "m.pt"), arch="wrn10-1", clean_dir=str(tmp_path / "clean"),
                                 test_dir=str(tmp_path / "test"), attack="patch", trigger=str(tmp_path / "t.png"),
                                 sad_epochs=0, quiet=True, out=str(tmp_path / "o")))
    x_te, y_te, _ = loading.load_image_folder(str(tmp_path / "test"), "--test-dir")
    x_bd, y_bd = attacks.backdoor_test_set(x_te, y_te, lambda im: attacks.patch(im, rgba), 0)
    assert report["results"]["before"]["asr"] == harness.accuracy(m, x_bd, y_bd, torch.device("cpu"))
    assert report["trigger"]["pixels"] == report["trigger"]["opaque_pixels"] == 9


# ------------------------------------------------------------------ torchvision architectures (--arch tv:NAME)

@pytest.mark.parametrize("name", ["resnet18", "vgg19_bn"])
def test_a_torchvision_file_loads_with_its_own_keys_and_equal_logits_and_takes_a_sad_step(name, tmp_path):
    ref = randomised(torchvision.models.get_model(name, num_classes=10))  # saved by torchvision's own constructor
    torch.save({"model_state_dict": ref.state_dict()}, tmp_path / "m.pt")
    model, read = loading.model_to_purify(ftt.Config(model=str(tmp_path / "m.pt"), arch=f"tv:{name}", normalize="cifar10"),
                                          ftt.build_backbone, 3, 10)
    assert read["layout"] == "torchvision" and read["wrapper"] == ["model_state_dict"]
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in loading.NORMALIZE_PRESETS["cifar10"])
    with torch.no_grad():
        want, got = ref((x - mean) / std), model.eval()(x)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
    assert list(loading.export_layout(model, "torchvision")) == list(ref.state_dict())  # back, in torchvision's order
    net = ftt.Branched(model, (3, 32, 32), 10).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    logits, feats = net(x)
    loss, ce, ap = ftt.sad_loss(logits, feats, torch.tensor([0, 1, 2]), ftt.exit_weights(len(logits)))
    loss.backward()
    opt.step()
    assert len(net.exits) == len(model.stages) - 1 >= 3 and torch.isfinite(loss)
    assert all(p.grad is not None for p in net.exits.parameters())
    # at 32 px an ImageNet-shaped network ends in 1 x 1 maps: one pixel of attention, so eq. (5) is 0 there
    assert feats[-1].shape[-2:] == (1, 1) and ap == 0 and net.deep_shape[-2:] == (1, 1)


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "mobilenet_v2", "efficientnet_b0", "densenet121",
                                  "convnext_tiny", "resnext50_32x4d"])
def test_every_cut_family_gives_torchvisions_logits_and_an_exit_per_stage_but_the_last(name):
    model = randomised(ftt.build_backbone(f"tv:{name}", 3, 10))
    ref = torchvision.models.get_model(name, num_classes=10).eval()
    ref.load_state_dict(loading.export_layout(model, "torchvision"))  # torchvision's forward, its own keys
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=1e-4, rtol=1e-4)
        sizes = [f.shape[-1] for f in ftt.stage_outputs(model, x)]
    assert len(sizes) >= 4 and sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
    assert len(ftt.Branched(model, (3, 32, 32), 10).exits) == len(sizes) - 1


@pytest.mark.parametrize("arch,says", [("tv:vit_b_16", "token"), ("tv:alexnet", "resnet, vgg"),
                                       ("tv:nosuchnet", "resnet, vgg")])
def test_what_cannot_take_exits_is_refused_in_one_line(arch, says, tmp_path, capsys):
    image_folders(tmp_path)
    code = ftt.cli(["--arch", arch, "--attack", "none", "--model", str(tmp_path / "clean" / "0" / "000000.png"),
                    "--clean-dir", str(tmp_path / "clean"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and says in err and arch in err, err


def test_a_cifar_resnet18_in_pytorch_cifar_names_gives_the_reference_logits(tmp_path):
    class Basic(nn.Module):  # pytorch-cifar's BasicBlock, written out
        def __init__(self, c_in, c, s):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(c_in, c, 3, s, 1, bias=False), nn.BatchNorm2d(c)
            self.conv2, self.bn2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
            self.shortcut = (nn.Sequential(nn.Conv2d(c_in, c, 1, s, bias=False), nn.BatchNorm2d(c))
                             if s != 1 or c_in != c else nn.Sequential())

        def forward(self, x):
            return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.shortcut(x))

    class Ref(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1, c = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), 64
            for i, (w, s) in enumerate(zip((64, 128, 256, 512), (1, 2, 2, 2)), 1):
                setattr(self, f"layer{i}", nn.Sequential(Basic(c, w, s), Basic(w, w, 1)))
                c = w
            self.linear = nn.Linear(512, 10)

        def forward(self, x):
            out = self.layer4(self.layer3(self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x)))))))
            return self.linear(F.avg_pool2d(out, 4).flatten(1))

    ref = randomised(Ref())
    torch.save(ref.state_dict(), tmp_path / "m.pt")
    model, read = loading.load_model(tmp_path / "m.pt", ftt.build_backbone, "resnet18", 3, 10)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), ref(x), atol=1e-5)
    assert read["layout"] == "resnet-cifar"


# ------------------------------------------------------------------ BackdoorBench records (--backdoorbench)

def fake_cifar10(root, n_train=120, n_test=60, seed=0):
    """CIFAR-10's python batches, small: random images, every class equally often."""
    g = torch.Generator().manual_seed(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    x = torch.randint(0, 256, (n_train + n_test, 3072), dtype=torch.uint8, generator=g)
    y = torch.arange(n_train + n_test) % 10
    parts = [(f"data_batch_{i + 1}", slice(i * n_train // 5, (i + 1) * n_train // 5)) for i in range(5)]
    for name, sl in parts + [("test_batch", slice(n_train, None))]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": x[sl].numpy(), "labels": y[sl].tolist()}, f)
    return x[:n_train].view(-1, 3, 32, 32), y[:n_train], x[n_train:].view(-1, 3, 32, 32), y[n_train:]


def bd_state(record, folder, x, y, indices, target, rgba, subset):
    """A prepro_cls_DatasetBD_v2.retrieve_state(), as BackdoorBench writes it: numpy index arrays, numpy int keys,
    the poisoned images as PNGs under <folder>/<original label>/<index>.png, paths as its own cwd saw them."""
    import numpy as np
    n = len(x)
    indicator = np.zeros(n)
    data_dict = {}
    for i in indices:
        indicator[i] = 1
        label = int(y[i])
        (record / folder / str(label)).mkdir(parents=True, exist_ok=True)
        v2.functional.to_pil_image(attacks.patch(x[i:i + 1], rgba)[0]).save(record / folder / str(label) / f"{i}.png")
        data_dict[np.int64(i)] = {"path": f"./record/{record.name}/{folder}/{label}/{i}.png", "other_info": [target, label]}
    return {"bd_data_container": {"save_folder_path": f"./record/{record.name}/{folder}", "data_dict": data_dict,
                                  "save_file_format": ".png"},
            "getitem_all": True, "getitem_all_switch": False,
            "original_index_array": np.array(indices if subset else range(n), dtype=np.int64),
            "poison_indicator": indicator, "save_folder_path": f"./record/{record.name}/{folder}"}


def bb_record(tmp_path, model_name="preactresnet18", extra=None):
    """A small BackdoorBench v2 record (save_attack_result's keys) over fake CIFAR-10 in tmp_path/data: a
    randomised BackdoorBench PreActResNet18, 12 poisoned training images, bd_test = every non-target test image."""
    x, y, xt, yt = fake_cifar10(tmp_path / "data")
    rgba = attacks.nad_grid_rgba(3, 32, 32)
    record = tmp_path / "record" / "badnet_demo"
    record.mkdir(parents=True)
    ref = randomised(RefPreActResNet18(10, False))
    poisoned = [int(i) for i in (y != 0).nonzero().flatten()[::9][:12]]
    non_target = [int(i) for i in (yt != 0).nonzero().flatten()]
    torch.save({"model_name": model_name, "num_classes": 10, "model": ref.state_dict(), "data_path": "./data/cifar10",
                "img_size": [32, 32, 3], "clean_data": "cifar10",
                "bd_train": bd_state(record, "bd_train_dataset", x, y, poisoned, 0, rgba, subset=False),
                "bd_test": bd_state(record, "bd_test_dataset", xt, yt, non_target, 0, rgba, subset=True),
                **(extra or {})}, record / "attack_result.pt")
    return record, ref, (x, y, xt, yt), poisoned, rgba


def test_a_backdoorbench_record_is_read_as_its_code_writes_it(tmp_path):
    record, ref, (x, y, xt, yt), poisoned, rgba = bb_record(tmp_path)
    cfg = loading.with_backdoorbench(ftt.Config(backdoorbench=str(record), data_root=str(tmp_path / "data"),
                                                clean_ratio=0.1))
    assert (cfg.arch, cfg.dataset, cfg.normalize, cfg.attack) == ("preact18", "cifar10", "cifar10", "none")
    d = loading.backdoorbench_data(cfg)
    non_target = yt != 0
    assert torch.equal(d["x_bd"], attacks.patch(xt[non_target], rgba))  # the PNGs, found under the record
    assert (d["y_bd"] == 0).all() and torch.equal(d["y_bd_true"], yt[non_target])
    assert d["counts"]["poisoned"] == 12 and len(d["x_l"]) == 12 and len(d["x_u"]) == 120 - 12
    triggered = attacks.patch(x[poisoned], rgba)
    in_pool = (d["x_u"][:, None] == triggered[None]).flatten(2).all(2).any(0)
    assert in_pool.all()  # every poisoned image is in the pool, triggered
    assert not (d["x_l"][:, None] == triggered[None]).flatten(2).all(2).any()  # and none in the clean subset
    model, read = loading.model_to_purify(cfg, ftt.build_backbone, 3, 10)
    assert read["layout"] == "preact-resnet" and read["wrapper"] == ["model"] and read.get("head")
    (tmp_path / "idx.txt").write_text("\n".join(str(i) for i in range(5, 25)) + "\n")  # np.savetxt(fmt="%d")
    d = loading.backdoorbench_data(dataclasses.replace(cfg, clean_index=str(tmp_path / "idx.txt")))
    assert torch.equal(d["x_l"], x[5:25]) and torch.equal(d["y_l"], y[5:25]) and len(d["x_u"]) == 100


def test_a_backdoorbench_record_is_purified_end_to_end_and_written_back_in_its_format(tmp_path):
    import csv
    record, ref, (x, y, xt, yt), poisoned, rgba = bb_record(tmp_path)
    report = ftt.main(ftt.Config(backdoorbench=str(record), data_root=str(tmp_path / "data"), clean_ratio=0.1,
                                 sad_epochs=1, sad_lr_max=0.01, ssl_epochs=1, batch_size=8, mu=1, quiet=True,
                                 out=str(tmp_path / "o")))
    r = report["results"]
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in loading.NORMALIZE_PRESETS["cifar10"])
    x_bd = attacks.patch(xt[yt != 0], rgba).float() / 255
    with torch.no_grad():
        want = 100 * (ref((x_bd - mean) / std).argmax(1) == 0).float().mean().item()
    assert abs(r["before"]["asr"] - want) < 1e-6 and report["trigger"]["model_name"] == "preactresnet18"
    out = record / "defense" / "ftt"
    saved = torch.load(out / "defense_result.pt", weights_only=True)
    assert saved["model_name"] == "preactresnet18" and saved["num_classes"] == 10
    bb_keys = RefPreActResNet18(10, False).state_dict()  # BackdoorBench's PreActResNet18 key set
    assert list(saved["model"]) == list(bb_keys) and all(saved["model"][k].shape == v.shape for k, v in bb_keys.items())
    purified = RefPreActResNet18(10, False)
    purified.load_state_dict(saved["model"])
    row = next(csv.DictReader(open(out / "ftt_df_summary.csv")))
    last = r["ssl"]
    assert abs(float(row["test_acc"]) - last["acc"] / 100) < 1e-6 and abs(float(row["test_asr"]) - last["asr"] / 100) < 1e-6
    assert abs(float(row["test_ra"]) - last["ra"] / 100) < 1e-6


def test_numpy_arrays_load_under_numpy_1x_and_2x_module_names_and_nothing_else_is_allowed(tmp_path):
    import zipfile
    import numpy as np
    torch.save({"model": {"w": torch.arange(3.0)}, "idx": np.arange(4), "by": {np.int64(2): 1}}, tmp_path / "now.pt")
    # the same file as numpy 1.x writes it: its pickle names numpy.core.multiarray (numpy 2.x: numpy._core)
    with zipfile.ZipFile(tmp_path / "now.pt") as zin, zipfile.ZipFile(tmp_path / "old.pt", "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            zout.writestr(info, data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
                          if info.filename.endswith("data.pkl") else data)
    for name in ("now.pt", "old.pt"):
        obj = loading.safe_load(tmp_path / name, "--model")
        assert obj["idx"].tolist() == [0, 1, 2, 3] and list(obj["by"]) == [2] and torch.equal(obj["model"]["w"], torch.arange(3.0))
    rebuilders = {f"{m}.{f}" for m in ("numpy.core.multiarray", "numpy._core.multiarray") for f in ("_reconstruct", "scalar")}
    allowed = {n for _, n in loading.numpy_globals()}
    assert rebuilders | {"numpy.ndarray", "numpy.dtype"} <= allowed
    assert all(n.startswith("numpy.dtypes.") and n.endswith("DType") for n in allowed - rebuilders - {"numpy.ndarray", "numpy.dtype"})


class Opaque:  # any class: unpickling it means running code named in the file
    pass


def test_a_record_that_names_any_other_global_is_refused_by_name(tmp_path, capsys):
    record, *_ = bb_record(tmp_path, extra={"args": Opaque()})
    code = ftt.cli(["--backdoorbench", str(record), "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "test_loading.Opaque" in err, err
    assert not (tmp_path / "o").exists() and not (record / "defense").exists()


@pytest.mark.parametrize("name,says", [("senet18", "BackdoorBench's own code"), ("vit_b_16", "token")])
def test_a_record_of_a_model_not_built_here_is_refused_naming_it(name, says, tmp_path, capsys):
    record, *_ = bb_record(tmp_path, model_name=name)
    code = ftt.cli(["--backdoorbench", str(record), "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and name in err and says in err, err


def test_holdout_unseen_takes_labelled_images_past_train_size_that_the_attacker_never_saw():
    needs_fashion()
    cfg = ftt.Config(dataset="fashion-mnist", data_root="./data", train_size=400, test_size=100, holdout_unseen=50)
    d = loading.benchmark_data(cfg, torch.device("cpu"), attacker.make_trigger)
    x, y = loading.load_dataset("fashion-mnist", "./data")["train"]
    assert torch.equal(d["held_out"][0], x[400:450]) and torch.equal(d["held_out"][1], y[400:450])
    assert len(d["x_poisoned"]) == 400  # the attacker's training set ends where the held-out images begin
    for bad in (dict(train_size=0), dict(holdout=0.2), dict(holdout_unseen=-1)):
        with pytest.raises(harness.ConfigError, match="--holdout-unseen"):
            harness.validate(dataclasses.replace(cfg, **bad))
    with pytest.raises(harness.ConfigError, match="exceed"):
        loading.benchmark_data(dataclasses.replace(cfg, train_size=59990), torch.device("cpu"), attacker.make_trigger)
