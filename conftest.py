"""Shared test setup: a hypothesis profile that stays fast and stable on 2 cores (first torch calls
are slow, so no deadline; few, small examples), and the location of optional real datasets."""
import json
import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

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
