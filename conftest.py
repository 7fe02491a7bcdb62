"""Shared test setup: a hypothesis profile that stays fast and stable on 2 cores (first torch calls
are slow, so no deadline; few, small examples), and the location of optional real datasets."""
import json
import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

import ftt

settings.register_profile("ftt", deadline=None, max_examples=30, derandomize=True)
settings.load_profile("ftt")
torch.set_num_threads(min(2, torch.get_num_threads()))

CIFAR10_ROOT = os.environ.get("FTT_CIFAR10_ROOT", "")  # a folder holding cifar-10-batches-py/
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def needs_cifar10():
    if not (CIFAR10_ROOT and (Path(CIFAR10_ROOT) / "cifar-10-batches-py").is_dir()):
        pytest.skip("set FTT_CIFAR10_ROOT to a folder holding cifar-10-batches-py/ (.ci/run does)")
    return Path(CIFAR10_ROOT)


def needs_fashion():
    if not (FASHION_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST missing: apt-get install -y dataset-fashion-mnist (.ci/run does)")


def report(test: str, **values) -> None:
    """What a training test measured, printed beside its bound (shown with pytest -s; issue 11's table of
    values under each ATEN_CPU_CAPABILITY comes from these lines)."""
    print(f"\nMEASURED {test} {os.environ.get('ATEN_CPU_CAPABILITY', 'native')} {json.dumps(values)}", flush=True)


# The tiny setting: Fashion-MNIST (real), 5,000 training images, WRN-10-1, BadNets at 10%, trained by
# the attacker for 3 epochs without augmentation; the defender holds 10% clean (500 images) and runs
# SAD for 10 epochs. Bar (test_ftt.py): ASR >= 80% before, <= 20% after, ACC at most 10 points lower.
TINY = dict(dataset="fashion-mnist", arch="wrn10-1", attack="badnets", train_size=5000, test_size=1000,
            attack_epochs=3, attack_lr=0.05, attack_batch=64, attack_augment=False,
            clean_ratio=0.1, sad_epochs=10, ssl_epochs=0, quiet=True)  # SAD's lr: the default ladder


def tiny_ssl_setup(n_u=96, seed=0):
    """A WRN-10-1 with exits on random 8x8 images: 16 labelled (3 classes), n_u unlabelled; SSL labels everything."""
    g = torch.Generator().manual_seed(seed)
    x_l = torch.randint(0, 256, (16, 1, 8, 8), generator=g, dtype=torch.uint8)
    y_l = torch.randint(0, 3, (16,), generator=g)
    x_u = torch.randint(0, 256, (n_u, 1, 8, 8), generator=g, dtype=torch.uint8)
    torch.manual_seed(seed)
    net = ftt.Branched(ftt.build_backbone("wrn10-1", 1, 3), (1, 8, 8), 3)
    cfg = ftt.Config(batch_size=8, mu=2, ssl_epochs=2, threshold=0.0, quiet=True, channels_last=False)
    return net, x_l, y_l, x_u, cfg


@pytest.fixture(scope="session")
def tiny_backdoor(tmp_path_factory):
    """TINY's backdoored model, trained once per seed for the whole session (several tests defend the same one):
    get(seed) -> (path of its backdoored.pt, its "before" results)."""
    made = {}

    def get(seed: int = 0):
        if seed not in made:
            needs_fashion()
            root = tmp_path_factory.mktemp(f"tiny-backdoor-{seed}")
            cfg = ftt.Config(**{**TINY, "sad_epochs": 0}, seed=seed, out=str(root), cache=str(root / "cache"))
            made[seed] = (str(root / "backdoored.pt"), ftt.main(cfg)["results"]["before"])
        return made[seed]
    return get
