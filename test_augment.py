"""augment.py and ftt.py's two views: per-image randomness, exact crop and flip arithmetic, and RandAugment ops
that give torchvision's own images, on a batch, without host synchronisations on a GPU."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from torchvision.transforms import v2

import augment
import ftt

seeds = st.integers(0, 2**31 - 1)


def test_rand_augment_gives_the_same_images_on_either_path():
    x = torch.randint(0, 256, (32, 3, 8, 8), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    a, b = (augment.rand_augment(x, generator=torch.Generator().manual_seed(5), gather=g) for g in (True, False))
    assert torch.equal(a, b)

# ------------------------------------------------------------------ augmentations

@given(seeds)
def test_crop_with_pad_0_is_identity_or_flip_per_image(seed):
    x = torch.randint(0, 256, (6, 3, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    y = augment.random_crop_flip(x, pad=0, generator=torch.Generator().manual_seed(seed))
    for a, b in zip(x, y):
        assert torch.equal(a, b) or torch.equal(a.flip(-1), b)


@given(seeds)
def test_weak_crop_is_a_window_of_the_padded_image(seed):
    x = torch.randint(1, 256, (4, 2, 6, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    y = augment.random_crop_flip(x, pad=2, generator=torch.Generator().manual_seed(seed))
    assert y.shape == x.shape and y.dtype == torch.uint8
    for a, b in zip(F.pad(x, (2, 2, 2, 2)), y):
        windows = [a[:, i:i + 6, j:j + 6] for i in range(5) for j in range(5)]
        assert any(torch.equal(w, b) or torch.equal(w.flip(-1), b) for w in windows)


def test_weak_augmentation_is_random_per_image():
    x = torch.randint(1, 256, (1, 3, 8, 8), dtype=torch.uint8).repeat(16, 1, 1, 1)
    y = augment.random_crop_flip(x, generator=torch.Generator().manual_seed(0))
    assert len({bytes(img.numpy()) for img in y}) > 1


def test_cutout_greys_at_most_one_square_per_image():
    x = torch.zeros(8, 3, 12, 12, dtype=torch.uint8)
    y = augment.cutout(x, 6, generator=torch.Generator().manual_seed(0))
    changed = (y != x).any(1)  # (B, H, W)
    assert ((y == 0) | (y == 128)).all()
    assert (changed.flatten(1).sum(1) <= 36).all() and (changed.flatten(1).sum(1) > 0).all()


small_batches = st.tuples(st.integers(1, 5), st.sampled_from([1, 3]), st.integers(1, 6), st.integers(1, 6))


def images(shape, seed):
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@given(small_batches, seeds)
def test_crop_with_pad_0_and_offset_0_is_the_identity(shape, seed):
    x = images(shape, seed)
    zero = torch.zeros(shape[0], dtype=torch.long)
    assert torch.equal(augment.crop(x, zero, zero, pad=0), x)


@given(small_batches, seeds, st.integers(0, 3))
def test_crop_is_the_window_of_the_padded_image_at_each_images_offsets(shape, seed, pad):
    x = images(shape, seed)
    g = torch.Generator().manual_seed(seed)
    oy, ox = torch.randint(0, 2 * pad + 1, (2, shape[0]), generator=g)
    y, xp = augment.crop(x, oy, ox, pad), F.pad(x, (pad,) * 4)
    for i in range(shape[0]):
        assert torch.equal(y[i], xp[i, :, oy[i]:oy[i] + shape[2], ox[i]:ox[i] + shape[3]])


@given(small_batches, seeds)
def test_flip_twice_is_the_identity_and_flips_only_the_chosen_images(shape, seed):
    x = images(shape, seed)
    which = torch.rand(shape[0], generator=torch.Generator().manual_seed(seed)) < 0.5
    y = augment.hflip(x, which)
    assert torch.equal(augment.hflip(y, which), x)
    for i in range(shape[0]):
        assert torch.equal(y[i], x[i].flip(-1) if which[i] else x[i])


@pytest.mark.parametrize("c", [1, 3])
def test_each_rand_augment_op_is_one_of_torchvisions_randaugment_outcomes(c):
    # v2.RandAugment with one op on one image must land on one of our 14 ops x 2 signs
    x = images((1, c, 12, 12), c)
    outcomes = [augment.rand_augment_op(x, op, s)[0] for op in augment.RAND_AUGMENT_OPS for s in (1, -1)]
    assert all(o.dtype == torch.uint8 and o.shape == x.shape[1:] for o in outcomes)
    tv = v2.RandAugment(num_ops=1)
    for seed in range(40):
        torch.manual_seed(seed)
        y = tv(x[0])
        assert any(torch.equal(y, o) for o in outcomes), f"seed {seed}: torchvision gave an outcome we cannot make"


@pytest.mark.parametrize("shape", [(4, 3, 12, 12), (3, 1, 9, 7), (2, 3, 32, 32)])
def test_geometric_ops_and_sharpness_give_torchvisions_images_to_the_bit(shape):
    # the cached pixel maps and the written-out sharpness replace torchvision's calls on the training path;
    # they must give exactly its images, both signs, odd sizes and grey images included
    x = images(shape, 7)
    for op in augment.GEOMETRIC_OPS:
        for sign in (1, -1):
            for magnitude in (0, 9, 30):
                assert torch.equal(augment.rand_augment_op(x, op, sign, magnitude),
                                   augment.geometric_op(x, op, sign, magnitude, 31)), (op, sign, magnitude)
    for factor in (0.1, 1.0, 1.9):
        assert torch.equal(augment.adjust_sharpness(x, factor), v2.functional.adjust_sharpness(x, factor)), factor


def test_the_batched_rand_augment_makes_no_tensor_from_host_numbers_once_warm(monkeypatch):
    # on a GPU a tensor made from Python numbers (torch.tensor / as_tensor) is a copy the host waits for;
    # torchvision's affine, rotate and sharpness made 22 per round of RandAugment (44 per SSL step on an H100).
    # Once the per-setting tables are filled, the batched path (the GPU's) makes none.
    x = images((16, 3, 10, 10), 3)
    augment.rand_augment(x, gather=False)
    made = []
    for name in ("tensor", "as_tensor"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _real=real, _name=name, **k: made.append(_name) or _real(*a, **k))
    v2.functional.affine(x, angle=10.0, translate=[0, 0], scale=1.0, shear=[0.0, 0.0])
    assert made, "the probe must see torchvision's affine make its matrix from host numbers"
    made.clear()
    augment.cutout(augment.rand_augment(augment.random_crop_flip(x), gather=False), 5)
    assert made == []


@given(st.integers(2, 12), seeds)
def test_rand_augment_is_per_image_and_each_image_depends_only_on_itself(b, seed):
    x = images((1, 3, 10, 10), seed).repeat(b, 1, 1, 1)
    x2 = x.clone()
    x2[1:] = images((b - 1, 3, 10, 10), seed + 1)  # other images in the batch, same draws
    y, y2 = (augment.rand_augment(v, generator=torch.Generator().manual_seed(seed)) for v in (x, x2))
    assert y.shape == x.shape and y.dtype == torch.uint8
    assert torch.equal(y[0], y2[0])  # batching couples no images
    if b >= 8:  # 28 equally likely (op, sign) draws per round: 8 identical images all alike is ~1e-10
        assert len({bytes(img.numpy()) for img in y}) > 1


def test_strong_augmentation_keeps_shape_dtype_and_differs_per_image():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8).repeat(8, 1, 1, 1)
    y = ftt.strong_augment(x)
    assert y.shape == x.shape and y.dtype == torch.uint8
    assert len({bytes(img.numpy()) for img in y}) == 8
    assert ftt.strong_augment(x[:0]).shape == (0, 3, 16, 16)

