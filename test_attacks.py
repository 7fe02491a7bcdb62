"""The executable specification of attacks.py: trigger arithmetic, the poisoned-set builder, the
defender's split, the fitting steps (on a tiny random model: they must optimise, not pass through), and
at the end, through ftt.main, that each attack implants a real backdoor in a small model."""
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, strategies as st

import attacks
from conftest import needs_fashion, report

seeds = st.integers(0, 2**31 - 1)
C, H, W = 3, 12, 12


def images(n, seed=0, c=C, h=H, w=W):
    return torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def triggers(c=C, h=H, w=W):
    """Every attack's trigger with fixed parameters (fitted ones replaced by seeded stand-ins)."""
    mask = attacks.square_mask(h, w, 3)
    trojan_pattern = torch.rand(c, h, w, generator=torch.Generator().manual_seed(1)) * 2 - 1
    grid = attacks.wanet_grid(h, w, k=4, s=0.5, seed=0)
    return {
        "badnets": attacks.badnets,
        "trojan": lambda x: attacks.trojan(x, mask, trojan_pattern),
        "blended": lambda x: attacks.blended(x, attacks.blend_pattern((c, h, w), 0), 0.2),
        "low-frequency": lambda x: attacks.low_frequency(x, torch.full((c, h, w), 0.1)),
        "wanet": lambda x: attacks.wanet(x, grid),
        "atteq-nn": lambda x: attacks.atteq(x, mask, torch.full((c, h, w), 0.7), 0.5),
    }


@pytest.mark.parametrize("name", attacks.ATTACKS)
def test_trigger_keeps_shape_dtype_and_range(name):
    trig = triggers()[name]
    x = images(5)
    y = trig(x)
    assert y.shape == x.shape and y.dtype == torch.uint8
    xf = x.float() / 255
    yf = trig(xf)
    assert yf.shape == xf.shape and yf.dtype == torch.float32 and yf.min() >= 0 and yf.max() <= 1
    assert (yf * 255 - y.float()).abs().max() <= 0.5 + 1e-3  # uint8 = the float result, rounded


@pytest.mark.parametrize("name", attacks.ATTACKS)
def test_trigger_is_deterministic_and_takes_an_empty_batch(name):
    trig = triggers()[name]
    x = images(4)
    assert torch.equal(trig(x), trig(x))
    assert trig(x[:0]).shape == (0, C, H, W)


def test_seeded_trigger_parameters_repeat_for_a_seed_and_differ_across_seeds():
    assert torch.equal(attacks.blend_pattern((3, 8, 8), 5), attacks.blend_pattern((3, 8, 8), 5))
    assert not torch.equal(attacks.blend_pattern((3, 8, 8), 5), attacks.blend_pattern((3, 8, 8), 6))
    assert torch.equal(attacks.wanet_grid(8, 8, seed=3), attacks.wanet_grid(8, 8, seed=3))
    assert not torch.equal(attacks.wanet_grid(8, 8, seed=3), attacks.wanet_grid(8, 8, seed=4))


@given(seeds, st.integers(1, 3))
def test_badnets_changes_only_the_patch_pixels(seed, c):
    x = images(3, seed, c=c)
    y = attacks.badnets(x)
    patch = torch.zeros(H, W, dtype=torch.bool)
    patch[-3:, -3:] = True
    assert (y[..., patch] == 255).all()
    assert torch.equal(y[..., ~patch], x[..., ~patch])


def random_rgba(seed, c=C, h=H, w=W):
    """Colours and alphas anywhere in 0..255, with fully transparent and fully opaque pixels forced in."""
    g = torch.Generator().manual_seed(seed)
    rgba = torch.randint(0, 256, (c + 1, h, w), dtype=torch.uint8, generator=g)
    rgba[-1, 0, :3] = torch.tensor([0, 255, 128], dtype=torch.uint8)
    return rgba


@given(seeds, st.integers(1, 3))
def test_patch_is_the_alpha_blend_rounded_to_the_nearest_integer(seed, c):
    x, rgba = images(4, seed, c=c), random_rgba(seed, c)
    p, a = rgba[:-1].double(), rgba[-1:].double()
    want = ((a * p + (255 - a) * x.double()) / 255).round()  # never a tie: v / 255 is no half for integer v
    got = attacks.patch(x, rgba)
    assert got.dtype == torch.uint8 and torch.equal(got.double(), want)
    assert torch.equal(got[..., rgba[-1] == 0], x[..., rgba[-1] == 0])  # alpha 0 keeps the image
    assert torch.equal(got[..., rgba[-1] == 255], rgba[:-1, rgba[-1] == 255].expand(4, -1, -1))  # 255 pastes
    assert (attacks.patch(attacks.to_float(x), rgba) * 255 - want).abs().max() <= 0.5 + 1e-4  # float: unrounded


@given(seeds, st.integers(1, 3))
def test_badnets_is_the_patch_of_an_opaque_white_3x3_square(seed, c):
    white = torch.zeros(c + 1, H, W, dtype=torch.uint8)
    white[:, -3:, -3:] = 255
    x = images(3, seed, c=c)
    assert torch.equal(attacks.patch(x, white), attacks.badnets(x))


def test_nad_grid_pins_the_27_pixels_of_nad_abl_and_medic():
    # the released models' grid, read off their code: rows 29-31 x cols 29-31 of each channel, row 29 first
    rgba = attacks.nad_grid_rgba(3, 32, 32)
    for ch in range(3):
        assert rgba[ch, 29:, 29:].tolist() == [[0, 0, 255], [0, 255, 0], [255, 0, 255]]
    assert (rgba[-1, 29:, 29:] == 255).all() and rgba[-1].sum() == 9 * 255  # opaque there, nowhere else
    x = torch.full((1, 3, 32, 32), 77, dtype=torch.uint8)
    y = attacks.patch(x, rgba)
    assert (y[..., :29, :] == 77).all() and (y[..., :, :29] == 77).all()
    assert y[0, :, 29:, 29:].flatten().tolist() == [0, 0, 255, 0, 255, 0, 255, 0, 255] * 3
    assert not torch.equal(rgba, attacks.checkerboard_rgba(3, 32, 32))  # ours is another pattern


def test_our_checkerboard_is_a_3x3_black_and_white_square_opaque_in_the_corner_only():
    rgba = attacks.checkerboard_rgba(3, H, W)
    assert rgba[-1].sum() == 9 * 255 and (rgba[-1, -3:, -3:] == 255).all()
    assert rgba[0, -3:, -3:].tolist() == [[255, 0, 255], [0, 255, 0], [255, 0, 255]]
    assert (rgba[:3] == rgba[:1]).all()  # black and white: the same in every channel


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("c", [1, 3])
def test_trigger_png_round_trips_exactly(seed, c, tmp_path):
    rgba = random_rgba(seed, c)
    attacks.write_trigger_png(rgba, tmp_path / "t.png")
    assert torch.equal(attacks.read_trigger_png(tmp_path / "t.png", c, (H, W)), rgba)


def test_patch_from_a_png_gives_the_hand_computed_pixels(tmp_path):
    # one grey pixel (100) under a colour p = (200, 0, 255) at five alphas; round((a p + (255 - a) 100) / 255) by hand:
    # a=0: 100, 100, 100 | a=1: 100.39, 99.61, 100.61 -> 100, 100, 101 | a=128: 150.20, 49.80, 177.80 -> 150, 50, 178
    # a=254: 199.61, 0.39, 254.39 -> 200, 0, 254 | a=255: 200, 0, 255
    rgba = torch.zeros(4, 1, 5, dtype=torch.uint8)
    rgba[:3] = torch.tensor([200, 0, 255], dtype=torch.uint8).view(3, 1, 1)
    rgba[3, 0] = torch.tensor([0, 1, 128, 254, 255], dtype=torch.uint8)
    attacks.write_trigger_png(rgba, tmp_path / "t.png")
    got = attacks.patch(torch.full((1, 3, 1, 5), 100, dtype=torch.uint8), attacks.read_trigger_png(tmp_path / "t.png", 3, (1, 5)))
    assert got[0, :, 0].T.tolist() == [[100, 100, 100], [100, 100, 101], [150, 50, 178], [200, 0, 254], [200, 0, 255]]


def test_trigger_png_of_another_size_or_without_alpha_is_refused(tmp_path):
    from PIL import Image
    attacks.write_trigger_png(attacks.checkerboard_rgba(3, H, W), tmp_path / "t.png")
    with pytest.raises(ValueError, match=f"{H}x{W}.*16x16"):
        attacks.read_trigger_png(tmp_path / "t.png", 3, (16, 16))
    Image.new("RGB", (W, H)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="no alpha"):
        attacks.read_trigger_png(tmp_path / "rgb.png", 3, (H, W))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="not a readable image"):
        attacks.read_trigger_png(tmp_path / "bad.png", 3, (H, W))


@given(seeds, st.integers(1, 3), st.floats(0.6, 1.0))
def test_recover_patch_reads_back_exactly_the_opaque_pixels_most_suspect_images_share(seed, c, share):
    # random images, a random opaque patch on a share of the suspect ones: the patch comes back pixel for pixel
    g = torch.Generator().manual_seed(seed)
    rgba = torch.randint(0, 256, (c + 1, H, W), generator=g, dtype=torch.uint8)
    rgba[-1] = 255 * (torch.rand(H, W, generator=g) < 0.1)
    rgba[-1, 0, 0] = 255  # at least one pixel
    suspect, clean = images(200, seed, c=c), images(100, seed + 1, c=c)
    n = round(share * len(suspect))
    suspect[:n] = attacks.patch(suspect[:n], rgba)
    got = attacks.recover_patch(suspect, clean)
    on = rgba[-1] == 255
    assert got is not None and torch.equal(got, rgba * on)  # the patch's pixels, and 0 (colour, alpha) elsewhere
    x = images(5, seed + 2, c=c)
    assert torch.equal(attacks.patch(x, got), attacks.patch(x, rgba))


def test_recover_patch_finds_nothing_in_a_blend_clean_images_or_what_clean_images_share():
    x, clean = images(300, 0), images(100, 1)
    blend = attacks.blended(x, attacks.blend_pattern((C, H, W), 0), 0.2)
    assert attacks.recover_patch(blend, clean) is None and attacks.recover_patch(x, clean) is None
    assert attacks.recover_patch(x[:0], clean) is None
    black = lambda v: torch.cat([v[..., :1, :] * 0, v[..., 1:, :]], -2)  # every image's first row black
    found = attacks.recover_patch(attacks.badnets(black(x)), black(clean))
    assert found is not None and found[-1, 0].sum() == 0  # the shared black row is no trigger
    assert torch.equal(found[-1] == 255, attacks.badnets(torch.zeros(1, 1, H, W, dtype=torch.uint8))[0, 0] == 255)


@given(seeds, st.integers(1, 3))
def test_carries_patch_is_true_where_any_opaque_pixel_holds_the_patch_colour_in_every_channel(seed, c):
    # a reference written differently: a loop over the opaque pixels
    g = torch.Generator().manual_seed(seed)
    rgba = torch.zeros(c + 1, H, W, dtype=torch.uint8)
    rgba[:-1, :2, :2] = torch.randint(0, 4, (c, 2, 2), generator=g, dtype=torch.uint8)
    rgba[-1, :2, :2] = 255
    x = torch.randint(0, 4, (40, c, H, W), generator=g, dtype=torch.uint8)  # 4 levels: matches by chance are common
    want = torch.tensor([any(bool((x[n, :, i, j] == rgba[:-1, i, j]).all()) for i in range(2) for j in range(2))
                         for n in range(len(x))])
    assert torch.equal(attacks.carries_patch(x, rgba), want)
    assert attacks.carries_patch(attacks.patch(x, rgba), rgba).all()  # pasted: every image carries it


@given(seeds, st.floats(0, 1))
def test_blended_is_convex_mix_to_rounding(seed, alpha):
    x = images(3, seed)
    p = attacks.blend_pattern((C, H, W), seed)
    want = (1 - alpha) * x.float() + alpha * 255 * p
    assert (attacks.blended(x, p, alpha).float() - want).abs().max() <= 0.5 + 1e-3


@given(seeds)
def test_wanet_with_zero_strength_is_identity_up_to_interpolation(seed):
    x = torch.rand(2, C, H, W, generator=torch.Generator().manual_seed(seed))
    y = attacks.wanet(x, attacks.wanet_grid(H, W, s=0.0, seed=seed))
    assert (y - x).abs().max() < 1e-5


def test_wanet_warp_moves_pixels_and_noise_mode_differs_per_image():
    x = images(4)
    grid = attacks.wanet_grid(H, W, s=0.5, seed=0)
    assert not torch.equal(attacks.wanet(x, grid), x)
    noisy = attacks.wanet_noise(x[:1].repeat(4, 1, 1, 1), grid, torch.Generator().manual_seed(0))
    assert len({bytes(im.numpy()) for im in noisy}) == 4


@given(seeds, st.integers(1, 20))
def test_attention_mask_covers_exactly_the_k_highest_pixels(seed, k):
    att = torch.rand(H, W, generator=torch.Generator().manual_seed(seed))
    m = attacks.top_attention_mask(att, k)[0].bool()
    assert m.sum() == k
    assert att[m].min() >= att[~m].max()


def test_ssim_is_1_for_identical_images_symmetric_and_lower_for_noise():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    y = (x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert attacks.ssim(x, x).item() == pytest.approx(1, abs=1e-5)
    assert attacks.ssim(x, y).item() == pytest.approx(attacks.ssim(y, x).item(), abs=1e-6)
    assert attacks.ssim(x, y).item() < 0.9


def test_psnr_is_infinite_for_identical_and_falls_with_distortion():
    x = images(2)
    assert attacks.psnr(x, x) == math.inf
    assert attacks.psnr(x, attacks.blended(x, attacks.blend_pattern((C, H, W)), 0.1)) > \
        attacks.psnr(x, attacks.blended(x, attacks.blend_pattern((C, H, W)), 0.4))


# ------------------------------------------------------------------ fitting, on a tiny random model

class TinyNet(nn.Module):
    def __init__(self, c=C, classes=4):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(c, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        return self.fc(self.body(x))


def test_low_frequency_trigger_is_bounded_and_its_energy_sits_in_low_frequencies():
    net = TinyNet().requires_grad_(False)
    delta = attacks.fit_low_frequency(net, images(64, c=C, h=32, w=32), target=1, eps=0.2, steps=30, batch=32)
    assert delta.abs().max() <= 0.2 + 1e-6 and delta.abs().max() > 0
    # cut-off 0.25 cycles/px (half of Nyquist): white noise keeps ~20% of its energy below it
    assert attacks.low_frequency_share(delta, 0.25) >= 0.9
    assert attacks.low_frequency_share(torch.randn(3, 32, 32), 0.25) < 0.4  # the measure can fail


def test_low_frequency_trigger_pushes_toward_the_target():
    net = TinyNet().requires_grad_(False)
    x = images(64, h=16, w=16)
    delta = attacks.fit_low_frequency(net, x, target=2, eps=0.2, sigma=1.0, steps=40, batch=32)
    p = lambda im: net(im.float() / 255).softmax(1)[:, 2].mean()
    assert p(attacks.low_frequency(x, delta)) > p(x)


def test_trojan_pattern_raises_the_chosen_neurons_activation():
    net = TinyNet().requires_grad_(False)
    x = images(64)
    mask = attacks.square_mask(H, W, 4)
    neurons = attacks.top_neurons(net.fc.weight, 2)
    assert torch.equal(neurons, net.fc.weight.abs().sum(0).topk(2).indices)
    pattern = attacks.fit_trojan(net.body, neurons, x, mask, steps=40, batch=32)
    assert pattern.min() >= 0 and pattern.max() <= 1
    assert torch.equal(attacks.trojan(x, mask, pattern)[..., mask[0] == 0], x[..., mask[0] == 0])  # only the mask changes
    act = lambda im: net.body(im.float() / 255)[:, neurons].mean()
    assert act(attacks.trojan(x, mask, pattern)) > act(x)


def test_trojan_neuron_is_the_top_candidate_a_white_mask_raises_most():
    net = TinyNet().requires_grad_(False)
    x = images(64)
    mask = attacks.square_mask(H, W, 4)
    cand = attacks.top_neurons(net.fc.weight, 5)
    n = attacks.trojan_neuron(net.body, net.fc.weight, x, mask, candidates=5)
    assert n.shape == (1,) and n.item() in cand.tolist()
    gain = net.body(attacks.trojan(x, mask, torch.ones(C, H, W)).float() / 255).mean(0) - net.body(x.float() / 255).mean(0)
    assert gain[n].item() == gain[cand].max().item()
    assert attacks.trojan_neuron(net.body, net.fc.weight, x, mask, candidates=1).item() == cand[0].item()


def test_atteq_pattern_raises_the_target_neuron_and_stays_in_mask():
    net = TinyNet().requires_grad_(False)
    x = images(64)
    mask = attacks.top_attention_mask(torch.rand(H, W, generator=torch.Generator().manual_seed(0)), 20)
    neuron = int(net.body(x.float() / 255).mean(0).argmax())  # a live neuron of the random net
    pattern = attacks.fit_atteq(net.body, neuron, x, mask, opacity=0.5, steps=40, batch=32)
    assert pattern.min() >= 0 and pattern.max() <= 1
    y = attacks.atteq(x, mask, pattern, 0.5)
    assert torch.equal(y[..., mask[0] == 0], x[..., mask[0] == 0])
    act = lambda im: net.body(im.float() / 255)[:, neuron].mean()
    assert act(y) > act(x)


def test_cached_fit_fits_once_and_refits_when_the_recipe_changes(tmp_path):
    calls = []
    fit = lambda: calls.append(1) or {"t": torch.arange(3.0)}
    a = attacks.cached_fit(tmp_path / "trig", {"seed": 0}, fit)
    b = attacks.cached_fit(tmp_path / "trig", {"seed": 0}, fit)
    assert len(calls) == 1 and torch.equal(a["t"], b["t"])
    attacks.cached_fit(tmp_path / "trig", {"seed": 1}, fit)
    assert len(calls) == 2 and (tmp_path / "trig.json").exists()


# ------------------------------------------------------------------ builder, split, test set

@pytest.mark.parametrize("name", attacks.ATTACKS)
@pytest.mark.parametrize("rate", [0.05, 0.1, 0.3])
def test_builder_poisons_exactly_round_rate_n_and_leaves_the_rest_bit_identical(name, rate):
    x = images(200, 3)
    y = torch.arange(200) % 10
    grid = attacks.wanet_grid(H, W, seed=0)
    noise = (lambda im, g: attacks.wanet_noise(im, grid, g)) if name == "wanet" else None
    ps = attacks.poison(x, y, triggers()[name], rate, target=0, seed=0, noise=noise, cross_ratio=2.0 if noise else 0)
    assert len(ps.poison_idx) == round(rate * 200) == len(set(ps.poison_idx.tolist()))
    assert (ps.labels[ps.poison_idx] == 0).all() and (y[ps.poison_idx] != 0).all()
    touched = torch.zeros(200, dtype=torch.bool)
    touched[torch.cat([ps.poison_idx, ps.noise_idx])] = True
    assert torch.equal(ps.images[~touched], x[~touched]) and torch.equal(ps.labels[~touched], y[~touched])
    if noise:  # noise samples keep their labels
        assert len(ps.noise_idx) == round(2 * rate * 200)
        assert torch.equal(ps.labels[ps.noise_idx], y[ps.noise_idx])
    again = attacks.poison(x, y, triggers()[name], rate, 0, 0, noise, 2.0 if noise else 0)
    assert torch.equal(again.poison_idx, ps.poison_idx) and torch.equal(again.images, ps.images)


@given(seeds, st.floats(0.01, 0.3), st.floats(0.01, 0.5))
def test_defender_split_is_disjoint_from_attacked_samples_and_covers_the_rest(seed, rate, ratio):
    n = 300
    y = torch.arange(n) % 10
    ps = attacks.poison(images(n, 0, h=4, w=4), y, attacks.badnets, rate, 0, seed)
    clean, unl = attacks.defender_split(n, ps.poison_idx, ratio, seed)
    assert len(clean) == round(ratio * n)
    assert not set(clean.tolist()) & set(ps.poison_idx.tolist())
    assert sorted(clean.tolist() + unl.tolist()) == list(range(n))


def test_builder_refuses_more_noise_samples_than_exist():
    grid = attacks.wanet_grid(H, W, seed=0)
    with pytest.raises(ValueError, match="cross ratio"):
        attacks.poison(images(100), torch.arange(100) % 10, lambda im: attacks.wanet(im, grid), 0.4, 0, 0,
                       lambda im, g: attacks.wanet_noise(im, grid, g), cross_ratio=2.0)


def test_defender_split_refuses_an_impossible_clean_ratio():
    with pytest.raises(ValueError, match="clean ratio"):
        attacks.defender_split(100, torch.arange(50), 0.6, 0)
    with pytest.raises(ValueError, match="clean ratio"):
        attacks.defender_split(100, torch.arange(5), 0.001, 0)


def test_backdoor_test_set_holds_no_target_class_image():
    x = images(50)
    y = torch.arange(50) % 5
    xb, yb = attacks.backdoor_test_set(x, y, attacks.badnets, target=2)
    assert len(xb) == (y != 2).sum() and (yb == 2).all()
    assert torch.equal(xb, attacks.badnets(x[y != 2]))


# ------------------------------------------------------------------ each attack implants a real backdoor

# The real Fashion-MNIST, WRN-10-1, 10% of the first 5,000 training images poisoned, the attacker trains
# 3 epochs at lr 0.05 without augmentation; fitted triggers use a clean reference model of 2 epochs.
# Bar: ASR >= 80% on the non-target images among the first 1,000 test images, ACC >= 70%.
# Two attacks need more: WaNet learns its warp only from many warped samples (500 of them stayed near 10%
# ASR even after 8 epochs; 20,000 images at 3 epochs: 85.9%), so it gets 20,000 images and 4 epochs (94.5%);
# ATTEQ-NN trains on clean data every other epoch and, on 5,000 images at 10%, reached only 72.8% (seed 1,
# 3 epochs) and 20.4% (seed 2, 5 epochs), so it gets 20% poisoned and 4 epochs (seeds 0 / 1: 93.8 / 91.9).
# Those figures: ATEN_CPU_CAPABILITY=default. The suite runs seed 0; other seeds are in docs/results.md.
IMPLANT = dict(dataset="fashion-mnist", arch="wrn10-1", train_size=5000, test_size=1000, attack_epochs=3,
               attack_lr=0.05, attack_batch=64, attack_augment=False, reference_epochs=2, sad_epochs=0,
               ssl_epochs=0, quiet=True)
IMPLANT_MORE = {"wanet": dict(train_size=20000, attack_epochs=4), "atteq-nn": dict(poison_rate=0.2, attack_epochs=4)}


@pytest.fixture(scope="module")
def reference_cache(tmp_path_factory):
    """One cache for the module: Trojan, Low-Frequency and ATTEQ-NN share one reference model."""
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("name", attacks.ATTACKS)
def test_each_attack_implants_a_backdoor_on_a_tiny_model(name, tmp_path, reference_cache, tiny_backdoor):
    needs_fashion()
    import ftt
    cfg = ftt.Config(**{**IMPLANT, **IMPLANT_MORE.get(name, {})}, attack=name, out=str(tmp_path / "run"),
                     cache=str(reference_cache))
    # BadNets with this recipe is conftest.TINY's attacker, trained once for the session
    before = tiny_backdoor(0)[1] if name == "badnets" else ftt.main(cfg)["results"]["before"]
    report(f"implant[{name}]", before=before)
    assert before["asr"] >= 80, f"{name} did not implant: {before}"
    assert before["acc"] >= 70, f"{name} broke the model's clean accuracy: {before}"
    if name == "atteq-nn":  # the mask sits on the reference model's highest-attention pixels
        t = torch.load(reference_cache / "trigger_atteq-nn_fashion-mnist_wrn10-1_s0.pt", weights_only=True)
        inside, outside = t["attention"][t["mask"][0] == 1], t["attention"][t["mask"][0] == 0]
        assert inside.min() >= outside.max() and t["mask"].sum() == 28 * 28 // 32


def test_a_cached_trigger_is_read_onto_the_cpu_whatever_device_fitted_it(tmp_path, monkeypatch):
    # a Trojan trigger fitted on a GPU holds CUDA tensors; read back on a CPU-only machine it must not fail
    seen = {}
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: seen.update(k) or real(*a, **k))
    first = attacks.cached_fit(tmp_path / "t", {"seed": 1}, lambda: {"x": torch.ones(2)})
    again = attacks.cached_fit(tmp_path / "t", {"seed": 1}, lambda: pytest.fail("refitted a cached trigger"))
    assert seen["map_location"] == "cpu" and torch.equal(first["x"], again["x"])


@pytest.mark.parametrize("seed", [0, 1])
def test_clean_label_poisoning_triggers_target_class_images_only_and_keeps_every_label(seed):
    y = torch.arange(200) % 10
    x = images(200, seed, h=8, w=8)
    ps = attacks.poison(x, y, attacks.badnets, 0.04, target=3, seed=seed, clean_label=True)
    assert len(ps.poison_idx) == 8 and (y[ps.poison_idx] == 3).all()
    assert torch.equal(ps.labels, y)  # no label changed
    assert torch.equal(ps.images[ps.poison_idx], attacks.badnets(x[ps.poison_idx]))
    untouched = torch.ones(200, dtype=torch.bool)
    untouched[ps.poison_idx] = False
    assert torch.equal(ps.images[untouched], x[untouched])
    with pytest.raises(ValueError, match="target-class"):
        attacks.poison(x, y, attacks.badnets, 0.11, target=3, seed=seed, clean_label=True)  # 22 > the 20 there are
