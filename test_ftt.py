"""The executable specification of ftt.py: properties of eq. (1)-(7), of the early exits, of the
augmentations and readers, and one tiny end-to-end run in which SAD removes a real backdoor."""
import dataclasses
import gzip
import hashlib
import json
import math
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, strategies as st

import ftt
from conftest import needs_cifar10, needs_fashion, report

# small float64 feature maps (B, C, H, W): exactness matters more than size here
dims = st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 5), st.integers(1, 5))
seeds = st.integers(0, 2**31 - 1)
ps = st.sampled_from([1.0, 2.0, 3.0])


def feature(shape, seed, scale=1.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


# ------------------------------------------------------------------ attention operators, eq. (2)-(4)

@given(dims, seeds, ps)
def test_attention_maps_are_nonnegative_with_shape_bhw(shape, seed, p):
    f = feature(shape, seed)
    for a in (ftt.attention_sum(f), ftt.attention_sum_p(f, p), ftt.attention_max_p(f, p)):
        assert a.shape == (shape[0], shape[2], shape[3])
        assert (a >= 0).all()


@given(dims, seeds)
def test_attention_sum_p_with_p_1_is_attention_sum(shape, seed):
    f = feature(shape, seed)
    torch.testing.assert_close(ftt.attention_sum_p(f, 1.0), ftt.attention_sum(f))


@given(dims, seeds, ps)
def test_attention_max_p_is_at_most_attention_sum_p(shape, seed, p):
    f = feature(shape, seed)
    assert (ftt.attention_max_p(f, p) <= ftt.attention_sum_p(f, p) + 1e-12).all()


@given(dims, seeds, ps, st.floats(-4, 4).filter(lambda c: abs(c) > 1e-3))
def test_attention_operators_are_homogeneous_of_degree_p(shape, seed, p, c):
    f = feature(shape, seed)
    torch.testing.assert_close(ftt.attention_sum(c * f), abs(c) * ftt.attention_sum(f))
    torch.testing.assert_close(ftt.attention_sum_p(c * f, p), abs(c) ** p * ftt.attention_sum_p(f, p))
    torch.testing.assert_close(ftt.attention_max_p(c * f, p), abs(c) ** p * ftt.attention_max_p(f, p))


@given(dims, seeds, ps)
def test_attention_operators_ignore_channel_order(shape, seed, p):
    f = feature(shape, seed)
    perm = torch.randperm(shape[1], generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(ftt.attention_sum(f[:, perm]), ftt.attention_sum(f))
    torch.testing.assert_close(ftt.attention_sum_p(f[:, perm], p), ftt.attention_sum_p(f, p))
    torch.testing.assert_close(ftt.attention_max_p(f[:, perm], p), ftt.attention_max_p(f, p))


# ------------------------------------------------------------------ AP loss, eq. (5)

def ap_reference(f_i, f_d, p):
    """Independent float64 reference: ||a/|a| - b/|b||| = sqrt(2 - 2 cos(a, b)), per sample by loop."""
    out = []
    for a, b in zip(f_i, f_d):
        ma = (a.abs() ** p).sum(0).flatten().tolist()
        mb = (b.abs() ** p).sum(0).flatten().tolist()
        na, nb = math.sqrt(sum(v * v for v in ma)), math.sqrt(sum(v * v for v in mb))
        cos = sum(u * v for u, v in zip(ma, mb)) / (na * nb)
        out.append(math.sqrt(max(2 - 2 * cos, 0.0)))
    return torch.tensor(out, dtype=torch.float64)


@given(dims, seeds, ps)
def test_ap_loss_is_zero_for_identical_maps(shape, seed, p):
    f = feature(shape, seed)
    assert ftt.ap_loss(f, f, p).abs().max() < 1e-6


@given(dims, seeds, seeds, st.floats(0.01, 100), st.floats(0.01, 100))
def test_ap_loss_is_invariant_to_positive_scaling_of_either_input(shape, s1, s2, c1, c2):
    f, g = feature(shape, s1), feature(shape, s2)
    torch.testing.assert_close(ftt.ap_loss(c1 * f, c2 * g), ftt.ap_loss(f, g), atol=1e-5, rtol=1e-5)


@given(dims, seeds, seeds, ps)
def test_ap_loss_is_symmetric_and_within_0_and_sqrt2(shape, s1, s2, p):
    f, g = feature(shape, s1), feature(shape, s2)
    d = ftt.ap_loss(f, g, p)
    torch.testing.assert_close(d, ftt.ap_loss(g, f, p))
    assert (d >= 0).all() and (d <= math.sqrt(2) + 1e-6).all()


@given(dims, st.integers(1, 4), seeds, seeds, ps)
def test_ap_loss_equals_independent_float64_reference(shape, c_d, s1, s2, p):
    f_i = feature(shape, s1)
    f_d = feature((shape[0], c_d, shape[2], shape[3]), s2)  # channels may differ, space may not
    torch.testing.assert_close(ftt.ap_loss(f_i, f_d, p).double(), ap_reference(f_i, f_d, p), atol=1e-5, rtol=1e-4)


def test_ap_loss_reaches_sqrt2_for_disjoint_maps():
    f_i = torch.zeros(1, 1, 2, 2); f_i[0, 0, 0, 0] = 1
    f_d = torch.zeros(1, 1, 2, 2); f_d[0, 0, 1, 1] = 3
    assert ftt.ap_loss(f_i, f_d).item() == pytest.approx(math.sqrt(2))


# ------------------------------------------------------------------ pseudo-labels, eq. (6)

logits_st = st.tuples(st.integers(1, 16), st.integers(2, 10), seeds)


def probs_of(spec):
    b, k, seed = spec
    return (torch.randn(b, k, generator=torch.Generator().manual_seed(seed)) * 3).softmax(1)


@given(logits_st, st.floats(0, 1))
def test_pseudo_label_masked_iff_confidence_below_threshold(spec, t):
    probs = probs_of(spec)
    y = ftt.pseudo_labels(probs, t)
    conf, arg = probs.max(1)
    assert torch.equal(y == -1, conf < t)
    assert torch.equal(y[conf >= t], arg[conf >= t])


@given(logits_st, st.floats(-5, 0), st.floats(1.0001, 5))
def test_threshold_at_most_0_labels_everything_above_1_nothing(spec, t_low, t_high):
    probs = probs_of(spec)
    assert (ftt.pseudo_labels(probs, t_low) >= 0).all()
    assert (ftt.pseudo_labels(probs, t_high) == -1).all()


@given(logits_st, st.floats(0, 1), st.floats(0, 1))
def test_labelled_set_shrinks_as_threshold_grows(spec, t1, t2):
    probs = probs_of(spec)
    lo, hi = sorted((t1, t2))
    kept_hi = ftt.pseudo_labels(probs, hi) >= 0
    kept_lo = ftt.pseudo_labels(probs, lo) >= 0
    assert (kept_lo | ~kept_hi).all()  # kept at the higher t implies kept at the lower


# ------------------------------------------------------------------ early exits

ARCH_EXITS = [("preact18", 3), ("wrn16-1", 2), ("resnet50", 3)]


@pytest.mark.parametrize("arch,n_exits", ARCH_EXITS)
def test_one_output_per_exit_and_features_shaped_like_f_d(arch, n_exits):
    torch.manual_seed(0)
    net = ftt.Branched(ftt.build_backbone(arch, 1, 7), (1, 16, 16), 7).train()
    logits, feats = net(torch.rand(2, 1, 16, 16))
    assert len(net.exits) == n_exits and len(logits) == len(feats) == n_exits + 1
    assert all(z.shape == (2, 7) for z in logits)
    assert all(f.shape == feats[-1].shape for f in feats)


@pytest.mark.parametrize("arch", ["preact18", "wrn16-1", "resnet50"])
def test_eval_output_of_wrapped_model_equals_plain_backbone_and_state_dict_loads(arch):
    torch.manual_seed(0)
    net = ftt.Branched(ftt.build_backbone(arch, 3, 10), (3, 16, 16), 10)
    net.train()
    net(torch.rand(4, 3, 16, 16))  # move BN statistics away from their init
    plain = ftt.build_backbone(arch, 3, 10)
    plain.load_state_dict(net.backbone.state_dict(), strict=True)  # the stripped model is a plain backbone
    x = torch.rand(3, 3, 16, 16)
    assert torch.equal(net.eval()(x), plain.eval()(x))


def test_gradients_reach_every_branch():
    torch.manual_seed(0)
    net = ftt.Branched(ftt.build_backbone("wrn16-1", 3, 5), (3, 16, 16), 5).train()
    logits, feats = net(torch.rand(4, 3, 16, 16))
    loss, _, _ = ftt.sad_loss(logits, feats, torch.tensor([0, 1, 2, 3]), ftt.exit_weights(3))
    loss.backward()
    for i, branch in enumerate(net.exits):
        for name, prm in branch.named_parameters():
            assert prm.grad is not None and prm.grad.abs().sum() > 0, f"exit {i}: no gradient at {name}"


def test_exits_attach_to_any_backbone_exposing_stem_stages_head():
    class Tiny(nn.Module):  # a user's own model: only the three attributes are required
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.stages = nn.ModuleList([nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1), nn.ReLU()),
                                         nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())])
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))

        def forward(self, x):
            return self.head(self.stages[1](self.stages[0](self.stem(x))))

    net = ftt.Branched(Tiny(), (3, 12, 12), 4).train()
    logits, feats = net(torch.rand(2, 3, 12, 12))
    assert len(logits) == 2 and feats[0].shape == feats[1].shape == (2, 16, 6, 6)


# ------------------------------------------------------------------ losses, eq. (1) and (7)

def test_exit_weights_rise_with_depth_deepest_largest():
    w = ftt.exit_weights(4)
    assert w == sorted(w) and len(set(w)) == 4 and w[-1] == max(w) == 1.0


def test_sad_loss_equals_weighted_ce_plus_beta_ap_on_hand_example():
    # two exits; uniform logits over 2 classes: CE = ln 2 each; weights 1/2, 1: CE part = 1.5 ln 2.
    # F_1 puts all attention on pixel (0, 0), F_D on (1, 1): orthogonal unit maps, AP = sqrt 2.
    logits = [torch.zeros(1, 2), torch.zeros(1, 2)]
    f1 = torch.zeros(1, 1, 2, 2); f1[0, 0, 0, 0] = 2.0
    fd = torch.zeros(1, 1, 2, 2); fd[0, 0, 1, 1] = 5.0
    loss, ce, ap = ftt.sad_loss(logits, [f1, fd], torch.tensor([1]), ftt.exit_weights(2), beta=0.03)
    assert ce.item() == pytest.approx(1.5 * math.log(2))
    assert ap.item() == pytest.approx(math.sqrt(2))
    assert loss.item() == pytest.approx(1.5 * math.log(2) + 0.03 * math.sqrt(2))


def test_ssl_loss_is_zero_when_no_sample_passes_threshold():
    torch.manual_seed(0)
    logits = [torch.randn(6, 3, requires_grad=True) for _ in range(3)]
    feats = [torch.randn(6, 4, 2, 2, requires_grad=True) for _ in range(3)]
    pseudo = [ftt.pseudo_labels(z.detach().softmax(1), 1.01) for z in logits]
    loss, ce, ap = ftt.ssl_loss(logits, feats, pseudo, ftt.exit_weights(3))
    assert loss.item() == 0 and ce.item() == 0 and ap.item() == 0
    loss.backward()
    assert all(z.grad.abs().sum() == 0 for z in logits)
    # ... and positive once something passes
    pseudo = [ftt.pseudo_labels(z.detach().softmax(1), 0.0) for z in logits]
    assert ftt.ssl_loss(logits, feats, pseudo, ftt.exit_weights(3))[0].item() > 0


def test_ssl_loss_ignores_unlabelled_samples_of_each_exit():
    torch.manual_seed(0)
    logits = [torch.randn(4, 3) for _ in range(2)]
    feats = [torch.rand(4, 2, 3, 3) for _ in range(2)]
    pseudo = [torch.tensor([0, -1, 2, -1]), torch.tensor([1, -1, -1, 0])]
    base = ftt.ssl_loss(logits, feats, pseudo, [0.5, 1.0])[0]
    logits2 = [z.clone() for z in logits]; feats2 = [f.clone() for f in feats]
    logits2[0][1] += 50; logits2[1][2] -= 50; feats2[0][1] *= 9  # only samples no exit labelled
    assert torch.allclose(ftt.ssl_loss(logits2, feats2, pseudo, [0.5, 1.0])[0], base)


def test_ap_term_teaches_shallow_exit_only_when_f_d_is_detached():
    f_i = torch.rand(2, 3, 4, 4, requires_grad=True)
    f_d = torch.rand(2, 3, 4, 4, requires_grad=True)
    z = [torch.zeros(2, 2), torch.zeros(2, 2)]
    ftt.sad_loss(z, [f_i, f_d], torch.tensor([0, 1]), [0.5, 1.0], detach_deep=True)[0].backward()
    assert f_i.grad.abs().sum() > 0 and f_d.grad is None
    ftt.sad_loss(z, [f_i, f_d], torch.tensor([0, 1]), [0.5, 1.0], detach_deep=False)[0].backward()
    assert f_d.grad.abs().sum() > 0


def test_ap_reductions_scale_the_per_image_distances_as_documented():
    d = torch.tensor([0.5, 1.0, 0.0, 2.0])
    keep = torch.tensor([True, True, False, True])
    assert ftt.reduce_ap(d, "mean").item() == pytest.approx(3.5 / 4)
    assert ftt.reduce_ap(d, "sum").item() == pytest.approx(3.5)
    assert ftt.reduce_ap(d, "l2").item() == pytest.approx(math.sqrt(0.25 + 1 + 4))
    assert ftt.reduce_ap(d * 0 + 7, "mean", keep).item() == pytest.approx(21 / 4)  # dropped images count as 0


# ------------------------------------------------------------------ one SSL step: which view labels, which view learns

class TwoExits(nn.Module):
    """A stand-in for Branched with two exits whose predictions are fixed functions of brightness: the
    deepest says class 1 for a bright image and 0 for a dark one, the shallow exit the opposite. One BN
    layer, so that its running statistics can be watched."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(1)
        self.scale = nn.Parameter(torch.tensor(30.0))

    def forward(self, x):
        self.bn(x[:, :1])  # updates running statistics in train mode, as a real backbone does
        bright = x.mean((1, 2, 3)) * 2 - 1  # -1 for black, +1 for white
        deep = torch.stack([-bright, bright], 1) * self.scale
        feats = [x.expand(-1, 2, -1, -1), x.expand(-1, 2, -1, -1)]
        return [-deep, deep], feats


def solid(value, n=4, size=4):
    return torch.full((n, 1, size, size), value, dtype=torch.uint8)


def test_pseudo_labels_come_from_the_weak_view_and_the_loss_from_the_strong_view():
    # weak view white (deepest: class 1), strong view black (deepest: class 0). Taking labels from the weak
    # view and the loss on the strong one gives a large CE; the swap would give a CE near 0.
    cfg = ftt.Config(threshold=0.95, channels_last=False)
    net = TwoExits().train()
    args = (solid(0)[:1], torch.tensor([0]))
    _, parts = ftt.ssl_forward(net, *args, solid(255), solid(0), [1.0, 1.0], cfg, torch.device("cpu"))
    assert parts[2] > 10  # ce_u: both exits confidently wrong on the strong view
    _, parts = ftt.ssl_forward(net, *args, solid(0), solid(0), [1.0, 1.0], cfg, torch.device("cpu"))
    assert parts[2] < 1e-6  # same image in both views: every exit agrees with its own pseudo-label


def test_each_exit_learns_from_its_own_pseudo_labels():
    # the exits disagree on every image; with per-exit labels each agrees with itself (CE ~ 0); had all
    # exits taken the deepest exit's labels, the shallow one's CE would be about 60 (its logit gap)
    cfg = ftt.Config(threshold=0.95, channels_last=False)
    _, parts = ftt.ssl_forward(TwoExits().train(), solid(0)[:1], torch.tensor([0]), solid(255), solid(255),
                               [1.0, 1.0], cfg, torch.device("cpu"))
    assert parts[2] < 1e-6 and parts[4] == 1.0  # every image passed t at the deepest exit


def test_weak_view_pass_leaves_batchnorm_running_statistics_alone():
    # after one SSL step the running statistics are those that the labelled + strong forward alone gives
    cfg = ftt.Config(threshold=0.95, channels_last=False)
    xb, weak, strong = solid(10)[:2], solid(250), solid(60)
    net = TwoExits().train()
    ftt.ssl_forward(net, xb, torch.tensor([0, 0]), weak, strong, [1.0, 1.0], cfg, torch.device("cpu"))
    ref = TwoExits().train()
    ref(ftt.to_input(torch.cat([xb, strong]), False))
    assert torch.equal(net.bn.running_mean, ref.bn.running_mean) and torch.equal(net.bn.running_var, ref.bn.running_var)
    with ftt.frozen_bn_stats(ref):  # and the frozen pass still normalises with the batch's statistics
        out = ref.bn(torch.randn(8, 1, 3, 3) * 5 + 2)
    assert abs(out.mean().item()) < 1e-5 and net.bn.momentum == ref.bn.momentum == 0.1


@given(st.floats(0.5, 0.9999), st.integers(0, 10_000))
def test_ema_moves_toward_the_model_by_its_warmed_up_decay(decay, step):
    ema, model = nn.Linear(2, 2), nn.Linear(2, 2)
    before = ema.weight.detach().clone()
    ftt.ema_update(ema, model, decay, step)
    d = min(decay, (1 + step) / (10 + step))
    torch.testing.assert_close(ema.weight, d * before + (1 - d) * model.weight.detach())


def tiny_ssl_setup(n_u=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_l = torch.randint(0, 256, (16, 1, 8, 8), generator=g, dtype=torch.uint8)
    y_l = torch.randint(0, 3, (16,), generator=g)
    x_u = torch.randint(0, 256, (n_u, 1, 8, 8), generator=g, dtype=torch.uint8)
    torch.manual_seed(seed)
    net = ftt.Branched(ftt.build_backbone("wrn10-1", 1, 3), (1, 8, 8), 3)
    cfg = ftt.Config(batch_size=8, mu=2, ssl_epochs=2, threshold=0.0, quiet=True, channels_last=False)
    return net, x_l, y_l, x_u, cfg


@pytest.mark.parametrize("n_u", [96, 100, 16])
def test_ssl_schedule_spans_exactly_the_steps_the_loop_runs_and_ends_at_lr_0(n_u, monkeypatch):
    net, x_l, y_l, x_u, cfg = tiny_ssl_setup(n_u)
    made, steps = [], []
    real_cosine, real_descend = ftt.cosine, ftt.descend
    monkeypatch.setattr(ftt, "cosine", lambda opt, total: made.append(real_cosine(opt, total)) or made[-1])
    monkeypatch.setattr(ftt, "descend", lambda opt, sched, loss: steps.append(1) or real_descend(opt, sched, loss))
    ftt.stage2_ssl(net, x_l, y_l, x_u, cfg, torch.device("cpu"), ftt.Monitor(quiet=True))
    assert len(steps) == ftt.ssl_schedule(n_u, cfg)[1] == made[0].last_epoch > 0
    assert made[0].get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("schedule", ["cosine", "nad"])
def test_sad_runs_its_schedule_over_exactly_its_steps(schedule, monkeypatch):
    net, x_l, y_l, _, cfg = tiny_ssl_setup()
    cfg = dataclasses.replace(cfg, sad_epochs=10, sad_lr=0.1, sad_schedule=schedule)
    lrs, real = [], ftt.descend
    monkeypatch.setattr(ftt, "descend", lambda opt, sched, loss: lrs.append(opt.param_groups[0]["lr"]) or real(opt, sched, loss))
    ftt.stage1_sad(net, x_l, y_l, cfg, torch.device("cpu"), ftt.Monitor(quiet=True))
    assert len(lrs) == 10 * math.ceil(16 / 8) and lrs[0] == pytest.approx(0.1)
    if schedule == "nad":  # NAD's released code: lr 0.1 for 2 of 20 epochs, then 0.01
        assert lrs == pytest.approx([0.1] * 2 + [0.01] * 18)
    else:
        assert all(a >= b for a, b in zip(lrs, lrs[1:])) and lrs[-1] < 0.01


def test_ssl_changes_the_weights_and_returns_their_average(tmp_path):
    net, x_l, y_l, x_u, cfg = tiny_ssl_setup()
    start = {k: v.clone() for k, v in net.backbone.state_dict().items()}
    log = tmp_path / "log.jsonl"
    kept = ftt.stage2_ssl(net, x_l, y_l, x_u, cfg, torch.device("cpu"), ftt.Monitor(log=log, quiet=True))
    moved = lambda sd: any(not torch.equal(sd[k], start[k]) for k in start if sd[k].is_floating_point())
    assert moved(net.backbone.state_dict()) and moved(kept.state_dict())
    assert kept is not net.backbone and set(kept.state_dict()) == set(start)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all(r["stage"] == "ssl" and r["mask"] > 0 for r in rows)
    assert ftt.stage2_ssl(net, x_l, y_l, x_u, dataclasses.replace(cfg, ema=0.0), torch.device("cpu"),
                          ftt.Monitor(quiet=True)) is net.backbone


# ------------------------------------------------------------------ what a user sees: start line, progress, evaluation

def test_progress_inside_a_long_epoch_gives_images_per_second_and_both_etas(capsys, monkeypatch):
    monkeypatch.setattr(ftt.Progress, "every_s", 0.0)  # as if every step took a minute
    net, x_l, y_l, x_u, cfg = tiny_ssl_setup()
    monitor = ftt.Monitor(quiet=False, later_s={"ssl": 120.0})
    ftt.stage1_sad(net, x_u[:32], y_l.repeat(2)[:32], dataclasses.replace(cfg, sad_epochs=1), torch.device("cpu"), monitor)
    inside = [line for line in capsys.readouterr().out.splitlines() if "images |" in line]
    assert len(inside) == 4  # one per step of 8 images
    assert all("img/s" in line and "stage eta" in line and "run eta" in line for line in inside)
    assert inside[0].split("|")[1].strip() == "8/32 images" and "run eta 2.0 min" in inside[-1]


def test_evaluation_every_n_epochs_and_always_after_the_last(tmp_path):
    net, x_l, y_l, x_u, cfg = tiny_ssl_setup()
    calls = []
    monitor = ftt.Monitor(evaluate=lambda m: calls.append(1) or (50.0, 10.0), every=2, log=tmp_path / "log.jsonl",
                          quiet=True)
    ftt.stage1_sad(net, x_u[:16], y_l, dataclasses.replace(cfg, sad_epochs=5), torch.device("cpu"), monitor)
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["acc"] for r in rows] == [None, 50.0, None, 50.0, 50.0] and len(calls) == 3
    assert monitor.measure("sad", net.backbone) == (50.0, 10.0) and len(calls) == 3  # not evaluated twice
    assert [ftt.evaluation_due(e, 4, 0) for e in (1, 2, 3, 4)] == [False, False, False, True]


def test_a_run_of_hours_is_told_what_to_run_instead():
    cfg = ftt.Config(arch="preact18", batch_size=4, mu=1, attack_batch=4)
    counts = {"train": 8, "clean": 4, "unlabelled": 4, "test": 4, "backdoor_test": 4}
    line = ftt.start_line(cfg, {"attack": 30 * 3600.0, "sad": 60.0, "ssl": 600.0}, torch.device("cpu"), (1, 8, 8),
                          3, counts, True)
    assert "estimated 30.2 h" in line and "./reproduce.sh quick" in line and "--arch wrn16-1 (about" in line
    assert "reproduce.sh" not in ftt.start_line(cfg, {"attack": 60.0}, torch.device("cpu"), (1, 8, 8), 3, counts, True)


def test_estimate_counts_each_stage_from_its_own_steps_and_skips_what_does_not_run():
    cfg = ftt.Config(arch="wrn10-1", batch_size=4, mu=1, attack_batch=4, attack_epochs=2, sad_epochs=3, ssl_epochs=0,
                     channels_last=False)
    counts = {"train": 8, "clean": 4, "unlabelled": 4, "test": 4, "backdoor_test": 4}
    state = torch.get_rng_state()
    est = ftt.estimate_run(cfg, "wrn10-1", (1, 8, 8), 3, counts, torch.device("cpu"), train_attacker=False)
    assert torch.equal(torch.get_rng_state(), state)  # the run's random numbers are untouched
    assert est["attack"] == 0 and est["ssl"] == 0 and est["sad"] > 0


# ------------------------------------------------------------------ the loops read the device once per epoch

class HostReads:
    """Counts reads of tensor values by the host (each one a synchronisation on a GPU)."""

    def __init__(self, monkeypatch):
        self.n = 0
        for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
            real = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self.wrap(real))

    def wrap(self, real):
        def counted(t, *a):
            self.n += 1
            return real(t, *a)
        return counted


@pytest.mark.parametrize("stage", ["attack", "sad", "ssl"])
def test_host_reads_per_epoch_do_not_grow_with_the_steps(stage, monkeypatch):
    # a GPU step must never wait for the host: the number of reads in an epoch is the same for 2 and 6
    # steps (rand_augment's CPU path reads its draw on the host; on a GPU it takes the other path; the
    # first run fills rand_augment's tables of magnitudes and pixel maps, made once per setting)
    real = ftt.rand_augment
    monkeypatch.setattr(ftt, "rand_augment", lambda x, **kw: real(x, **{**kw, "gather": False}))
    counts = []
    for n_steps in (2, 2, 6):
        net, x_l, y_l, x_u, cfg = tiny_ssl_setup(n_u=16 * n_steps)
        cfg = dataclasses.replace(cfg, ssl_epochs=1, sad_epochs=1)
        reads = HostReads(monkeypatch)
        if stage == "attack":
            x = x_u[:8 * n_steps]
            ftt.train_supervised(net.backbone, lambda e: (x, y_l.repeat(n_steps)[:len(x)]), 1, 0.01, 8, cfg,
                                 torch.device("cpu"), "attack", ftt.Monitor(quiet=True))
        elif stage == "sad":
            ftt.stage1_sad(net, x_u[:8 * n_steps], y_l.repeat(n_steps)[:8 * n_steps], cfg, torch.device("cpu"),
                           ftt.Monitor(quiet=True))
        else:
            ftt.stage2_ssl(net, x_l, y_l, x_u, cfg, torch.device("cpu"), ftt.Monitor(quiet=True))
        counts.append(reads.n)
        monkeypatch.undo()
        monkeypatch.setattr(ftt, "rand_augment", lambda x, **kw: real(x, **{**kw, "gather": False}))
    assert counts[1] == counts[2], counts


def test_rand_augment_gives_the_same_images_on_either_path():
    x = torch.randint(0, 256, (32, 3, 8, 8), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    a, b = (ftt.rand_augment(x, generator=torch.Generator().manual_seed(5), gather=g) for g in (True, False))
    assert torch.equal(a, b)


# ------------------------------------------------------------------ augmentations

@given(seeds)
def test_crop_with_pad_0_is_identity_or_flip_per_image(seed):
    x = torch.randint(0, 256, (6, 3, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    y = ftt.random_crop_flip(x, pad=0, generator=torch.Generator().manual_seed(seed))
    for a, b in zip(x, y):
        assert torch.equal(a, b) or torch.equal(a.flip(-1), b)


@given(seeds)
def test_weak_crop_is_a_window_of_the_padded_image(seed):
    x = torch.randint(1, 256, (4, 2, 6, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    y = ftt.random_crop_flip(x, pad=2, generator=torch.Generator().manual_seed(seed))
    assert y.shape == x.shape and y.dtype == torch.uint8
    for a, b in zip(F.pad(x, (2, 2, 2, 2)), y):
        windows = [a[:, i:i + 6, j:j + 6] for i in range(5) for j in range(5)]
        assert any(torch.equal(w, b) or torch.equal(w.flip(-1), b) for w in windows)


def test_weak_augmentation_is_random_per_image():
    x = torch.randint(1, 256, (1, 3, 8, 8), dtype=torch.uint8).repeat(16, 1, 1, 1)
    y = ftt.random_crop_flip(x, generator=torch.Generator().manual_seed(0))
    assert len({bytes(img.numpy()) for img in y}) > 1


def test_cutout_greys_at_most_one_square_per_image():
    x = torch.zeros(8, 3, 12, 12, dtype=torch.uint8)
    y = ftt.cutout(x, 6, generator=torch.Generator().manual_seed(0))
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
    assert torch.equal(ftt.crop(x, zero, zero, pad=0), x)


@given(small_batches, seeds, st.integers(0, 3))
def test_crop_is_the_window_of_the_padded_image_at_each_images_offsets(shape, seed, pad):
    x = images(shape, seed)
    g = torch.Generator().manual_seed(seed)
    oy, ox = torch.randint(0, 2 * pad + 1, (2, shape[0]), generator=g)
    y, xp = ftt.crop(x, oy, ox, pad), F.pad(x, (pad,) * 4)
    for i in range(shape[0]):
        assert torch.equal(y[i], xp[i, :, oy[i]:oy[i] + shape[2], ox[i]:ox[i] + shape[3]])


@given(small_batches, seeds)
def test_flip_twice_is_the_identity_and_flips_only_the_chosen_images(shape, seed):
    x = images(shape, seed)
    which = torch.rand(shape[0], generator=torch.Generator().manual_seed(seed)) < 0.5
    y = ftt.hflip(x, which)
    assert torch.equal(ftt.hflip(y, which), x)
    for i in range(shape[0]):
        assert torch.equal(y[i], x[i].flip(-1) if which[i] else x[i])


@pytest.mark.parametrize("c", [1, 3])
def test_each_rand_augment_op_is_one_of_torchvisions_randaugment_outcomes(c):
    # v2.RandAugment with one op on one image must land on one of our 14 ops x 2 signs
    x = images((1, c, 12, 12), c)
    outcomes = [ftt.rand_augment_op(x, op, s)[0] for op in ftt.RAND_AUGMENT_OPS for s in (1, -1)]
    assert all(o.dtype == torch.uint8 and o.shape == x.shape[1:] for o in outcomes)
    tv = ftt.v2.RandAugment(num_ops=1)
    for seed in range(40):
        torch.manual_seed(seed)
        y = tv(x[0])
        assert any(torch.equal(y, o) for o in outcomes), f"seed {seed}: torchvision gave an outcome we cannot make"


@pytest.mark.parametrize("shape", [(4, 3, 12, 12), (3, 1, 9, 7), (2, 3, 32, 32)])
def test_geometric_ops_and_sharpness_give_torchvisions_images_to_the_bit(shape):
    # the cached pixel maps and the written-out sharpness replace torchvision's calls on the training path;
    # they must give exactly its images, both signs, odd sizes and grey images included
    x = images(shape, 7)
    for op in ftt.GEOMETRIC_OPS:
        for sign in (1, -1):
            for magnitude in (0, 9, 30):
                assert torch.equal(ftt.rand_augment_op(x, op, sign, magnitude),
                                   ftt.geometric_op(x, op, sign, magnitude, 31)), (op, sign, magnitude)
    for factor in (0.1, 1.0, 1.9):
        assert torch.equal(ftt.adjust_sharpness(x, factor), ftt.v2.functional.adjust_sharpness(x, factor)), factor


def test_the_batched_rand_augment_makes_no_tensor_from_host_numbers_once_warm(monkeypatch):
    # on a GPU a tensor made from Python numbers (torch.tensor / as_tensor) is a copy the host waits for;
    # torchvision's affine, rotate and sharpness made 22 per round of RandAugment (44 per SSL step on an H100).
    # Once the per-setting tables are filled, the batched path (the GPU's) makes none.
    x = images((16, 3, 10, 10), 3)
    ftt.rand_augment(x, gather=False)
    made = []
    for name in ("tensor", "as_tensor"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _real=real, _name=name, **k: made.append(_name) or _real(*a, **k))
    ftt.v2.functional.affine(x, angle=10.0, translate=[0, 0], scale=1.0, shear=[0.0, 0.0])
    assert made, "the probe must see torchvision's affine make its matrix from host numbers"
    made.clear()
    ftt.cutout(ftt.rand_augment(ftt.random_crop_flip(x), gather=False), 5)
    assert made == []


@given(st.integers(2, 12), seeds)
def test_rand_augment_is_per_image_and_each_image_depends_only_on_itself(b, seed):
    x = images((1, 3, 10, 10), seed).repeat(b, 1, 1, 1)
    x2 = x.clone()
    x2[1:] = images((b - 1, 3, 10, 10), seed + 1)  # other images in the batch, same draws
    y, y2 = (ftt.rand_augment(v, generator=torch.Generator().manual_seed(seed)) for v in (x, x2))
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


# ------------------------------------------------------------------ data readers and the CLI

def test_cifar_reader_keeps_channel_planes_and_labels(tmp_path):
    data = torch.arange(2 * 3072, dtype=torch.int64).remainder(256).to(torch.uint8).view(2, 3072)
    with open(tmp_path / "b", "wb") as f:
        pickle.dump({"data": data.numpy(), "labels": [3, 8]}, f)
    x, y = ftt.read_cifar_batches([tmp_path / "b"], "labels")
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.uint8 and y.tolist() == [3, 8]
    assert torch.equal(x[1, 2].flatten(), data[1, 2048:])  # rows of 1024 R, then G, then B


def test_idx_reader_reads_gzipped_and_plain(tmp_path):
    arr = torch.randint(0, 256, (3, 4, 5), dtype=torch.uint8)
    raw = bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in arr.shape) + arr.numpy().tobytes()
    (tmp_path / "a").write_bytes(raw)
    with gzip.open(tmp_path / "a.gz", "wb") as f:
        f.write(raw)
    assert torch.equal(ftt.read_idx(tmp_path / "a"), arr)
    assert torch.equal(ftt.read_idx(tmp_path / "a.gz"), arr)


def test_missing_dataset_without_network_is_one_clear_error(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr(ftt.torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(ftt.DataError, match="cifar-10-batches-py") as e:
        ftt.load_dataset("cifar10", tmp_path)
    assert "\n" not in str(e.value)


def test_real_cifar10_copy_reads_as_the_official_set():
    root = needs_cifar10()
    d = ftt.load_dataset("cifar10", root)
    (x, y), (xt, yt) = d["train"], d["test"]
    assert x.shape == (50000, 3, 32, 32) and xt.shape == (10000, 3, 32, 32)
    assert torch.bincount(y).tolist() == [5000] * 10
    assert yt[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]


def test_cli_flags_come_from_config_and_unknown_flags_fail():
    cfg = ftt.parse_args(["--attack", "wanet", "--lambda", "0.5", "--no-detach-deep", "--sad-epochs", "3"])
    assert (cfg.attack, cfg.lam, cfg.detach_deep, cfg.sad_epochs) == ("wanet", 0.5, False, 3)
    assert ftt.parse_args([]) == ftt.Config()
    for bad in (["--atack", "badnets"], ["--dataset", "mnist"], ["--beta", "x"]):
        with pytest.raises(SystemExit):
            ftt.parse_args(bad)


@given(st.floats(1e-5, 1.0), st.floats(1e-5, 10.0))
def test_lr_ladder_climbs_in_1_3_10_steps_from_start_to_at_most_top(start, top):
    ladder = ftt.lr_ladder(start, top)
    assert ladder[0] == start and ladder == sorted(ladder) and len(set(ladder)) == len(ladder)
    assert all(lr <= top * (1 + 1e-9) for lr in ladder[1:])
    assert start * 10 ** ((len(ladder)) // 2) * (3 if len(ladder) % 2 else 1) > top * (1 + 1e-9)  # the next is above
    for j, (a, b) in enumerate(zip(ladder, ladder[1:])):
        assert b / a == pytest.approx(3 if j % 2 == 0 else 10 / 3, rel=1e-9)  # x3, x10, x30, ...
    assert ftt.lr_ladder(0.01, 0.1) == [0.01, 0.03, 0.1] and ftt.lr_ladder(0.05, 0.05) == [0.05]


def test_survived_needs_a_visible_excess_and_a_quarter_of_it_kept():
    e = lambda v: torch.tensor([v, -v], dtype=torch.float64)
    before = e(0.10)
    assert ftt.survived(before, e(0.025), 0) and not ftt.survived(before, e(0.0249), 0)
    assert not ftt.survived(e(0.0299), e(0.0299), 0)  # under POOL_SIGNAL: nothing to follow
    assert ftt.survived(before, e(0.2), 0) and not ftt.survived(before, e(-0.05), 0)


@given(st.integers(3, 10), st.integers(0, 40), st.integers(0, 40), st.integers(0, 40), seeds)
def test_moved_names_the_class_that_takes_most_of_the_images_leaving_the_suspect(k, stay, to_a, to_b, seed):
    # the backdoored model put stay + to_a + to_b pool images in class 0 (and 7 more elsewhere); the purified one
    # keeps `stay` there and sends to_a to class a, to_b to class b: moved counts exactly those that left
    g = torch.Generator().manual_seed(seed)
    a, b = (1 + torch.randperm(k - 1, generator=g)[:2]).tolist()
    before = torch.cat([torch.zeros(stay + to_a + to_b, dtype=torch.long), torch.full((7,), k - 1)])
    after = torch.cat([torch.zeros(stay, dtype=torch.long), torch.full((to_a,), a), torch.full((to_b,), b),
                       torch.full((7,), a)])  # images that were not in the suspect class before do not count
    perm = torch.randperm(len(before), generator=g)
    cls, share, size = ftt.moved(before[perm], after[perm], 0, k)
    if to_a + to_b == 0:
        assert (cls, share, size) == (-1, 0.0, 0.0)
    else:
        top = max(to_a, to_b)
        assert cls in ((a,) if to_a > to_b else (b,) if to_b > to_a else (a, b))
        assert share == top / (to_a + to_b) and size == top / len(before)


@given(st.integers(2, 12), st.integers(1, 60), seeds)
def test_class_excess_is_zero_when_predictions_follow_the_labels_and_always_sums_to_zero(k, n, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (n,), generator=g)
    assert torch.equal(ftt.class_excess(labels[torch.randperm(n, generator=g)], labels, k), torch.zeros(k, dtype=torch.float64))
    pred = torch.randint(0, k, (3 * n,), generator=g)
    e = ftt.class_excess(pred, labels, k)
    assert e.shape == (k,) and abs(float(e.sum())) < 1e-12 and float(e.abs().max()) <= 1


@given(st.integers(2, 10), st.integers(1, 20), st.integers(0, 30), seeds)
def test_class_excess_counts_exactly_the_images_sent_to_the_target(k, per_class, sent, seed):
    # a pool predicted exactly like the clean labels, then `sent` of its non-target images moved to the
    # target: the target's excess is sent / N, and the report names it, in points
    labels = torch.arange(k).repeat(per_class)
    pred = labels.clone()
    others = (pred != 0).nonzero().flatten()
    sent = min(sent, len(others))
    pred[others[torch.randperm(len(others), generator=torch.Generator().manual_seed(seed))[:sent]]] = 0
    e = ftt.class_excess(pred, labels, k)
    assert float(e[0]) == pytest.approx(sent / len(labels), abs=1e-12)
    if sent:
        r = ftt.pool_report(e, suspect=0)
        assert r["class"] == 0 and r["excess_pp"] == r["suspect_pp"] == round(100 * sent / len(labels), 2)


# ------------------------------------------------------------------ end to end

# The tiny setting: Fashion-MNIST (real), 5,000 training images, WRN-10-1, BadNets at 10%, trained by
# the attacker for 3 epochs without augmentation; the defender holds 10% clean (500 images) and runs
# SAD for 10 epochs at lr 0.05. Bar: ASR >= 80% before, <= 20% after, ACC at most 10 points lower.
TINY = dict(dataset="fashion-mnist", arch="wrn10-1", attack="badnets", train_size=5000, test_size=1000,
            attack_epochs=3, attack_lr=0.05, attack_batch=64, attack_augment=False,
            clean_ratio=0.1, sad_epochs=10, ssl_epochs=0, quiet=True)  # sad_lr: the default (0.1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sad_removes_a_real_badnets_backdoor(seed, tmp_path):
    needs_fashion()
    cfg = ftt.Config(**TINY, seed=seed, out=str(tmp_path / "run"), cache=str(tmp_path / "cache"))
    r = ftt.main(cfg)["results"]
    report(f"sad_e2e[{seed}]", before=r["before"], sad=r["sad"])
    assert r["before"]["asr"] >= 80, f"the attack did not take: {r}"
    assert r["sad"]["asr"] <= 20, f"SAD left the backdoor in: {r}"
    assert r["sad"]["acc"] >= r["before"]["acc"] - 10, f"SAD cost too much accuracy: {r}"
    # the defender-side check sees it without the trigger: before, the pool's excess is in the target class;
    # after, that class keeps less than half of it (no warning)
    assert r["before"]["pool"]["class"] == cfg.target and r["before"]["pool"]["excess_pp"] >= 5, r
    assert r["sad"]["pool"]["suspect"] == cfg.target and \
        r["sad"]["pool"]["suspect_pp"] < ftt.POOL_KEEP * r["before"]["pool"]["excess_pp"], r
    # the images that left the target spread over their own classes (no class takes most of them), and the
    # triggered test images get their own classes back (RA): the backdoor went, it did not move
    assert r["sad"]["pool"]["left_share"] < ftt.POOL_MOVED, r
    assert r["sad"]["ra"] >= r["before"]["ra"] + 50, r


def test_pool_check_warns_when_the_backdoor_survives(tmp_path, capsys):
    # the same tiny backdoor, SAD at a negligible lr: the model keeps it, and so does the pool's excess
    needs_fashion()
    cfg = ftt.Config(**{**TINY, "sad_epochs": 1, "sad_lr": 1e-6, "sad_lr_max": 3e-6}, out=str(tmp_path / "run"),
                     cache=str(tmp_path / "c"))
    r = ftt.main(cfg)["results"]
    out = capsys.readouterr().out
    report("pool_check_survives", before=r["before"], tried=r["sad_tried"], sad=r["sad"])
    # the first lr fails the check, SAD runs again from the backdoored model at the next, which fails too
    assert [t["lr"] for t in r["sad_tried"]] == [1e-6] and r["sad"]["lr"] == 3e-6
    for after in r["sad_tried"] + [r["sad"]]:
        assert after["asr"] >= 80 and after["pool"]["suspect"] == cfg.target
        assert after["pool"]["suspect_pp"] >= ftt.POOL_KEEP * r["before"]["pool"]["excess_pp"]
    assert out.count("the backdoor survived") == 2 and "SAD again from the backdoored model at lr 3e-06" in out


def test_main_runs_both_stages_and_saves_a_plain_backbone_with_its_results(tmp_path, capsys):
    needs_fashion()
    cfg = ftt.Config(**{**TINY, "train_size": 800, "test_size": 200, "attack_epochs": 1, "sad_epochs": 1,
                        "sad_lr_max": ftt.Config.sad_lr,  # one SAD attempt (the ladder has its own tests)
                        "ssl_epochs": 1, "mu": 2, "quiet": False}, out=str(tmp_path / "run"), cache=str(tmp_path / "cache"))
    report = ftt.main(cfg)
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("ftt: device cpu"))
    assert "estimated" in lines[start] and start < next(i for i, line in enumerate(lines) if " epoch " in line)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in log] == [("attack", 1), ("sad", 1), ("ssl", 1)]
    assert all({"lr", "acc", "asr", "images_per_s"} <= set(r) for r in log) and "mask" in log[-1] and "ap" in log[1]
    assert log[-1]["acc"] == report["results"]["ssl"]["acc"]  # the last epoch's evaluation is the result
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["results"] == report["results"] and set(saved["results"]) - {"ssl_pool"} == {"before", "sad", "ssl"}
    assert saved["config"]["seed"] == 0 and "torch" in saved["versions"] and saved["timings"]["total_s"] > 0
    plain = ftt.build_backbone("wrn10-1", 1, 10)
    plain.load_state_dict(torch.load(tmp_path / "run" / "purified.pt", weights_only=True), strict=True)


def test_ssl_pool_leaves_out_by_default_exactly_what_the_backdoored_model_puts_in_the_suspect_class(tmp_path, capsys):
    needs_fashion()
    cfg = ftt.Config(**{**TINY, "train_size": 1500, "test_size": 100, "attack_epochs": 2, "sad_epochs": 1,
                        "sad_lr_max": ftt.Config.sad_lr, "ssl_epochs": 1, "mu": 2},  # --ssl-pool: its default
                     out=str(tmp_path / "run"), cache=str(tmp_path / "cache"))
    r = ftt.main(cfg)["results"]
    x_u = ftt.load_data(cfg, torch.device("cpu"))["x_u"]
    backdoored = ftt.build_backbone(cfg.arch, 1, 10)
    backdoored.load_state_dict(torch.load(tmp_path / "run" / "backdoored.pt", weights_only=True))
    suspect = r["before"]["pool"]["class"]
    in_suspect = int((ftt.predictions(backdoored, x_u, torch.device("cpu")) == suspect).sum())
    assert r["ssl_pool"] == {"dropped": in_suspect, "kept": len(x_u) - in_suspect, "suspect": suspect} and in_suspect > 0
    assert f"leaves out the {in_suspect} pool images" in capsys.readouterr().out


# ------------------------------------------------------------------ bad input: one line, exit code 2, nothing touched

FMNIST_QUICK = ["--dataset", "fashion-mnist", "--arch", "wrn10-1", "--train-size", "200", "--test-size", "50"]
BAD = [  # (flags, text the one line must contain)
    (["--attack", "nope"], "--attack"),
    (["--arch", "vgg16"], "--arch"),
    (["--arch", "wrn15-1"], "--arch"),
    (["--dataset", "mnist"], "--dataset"),
    (["--poison-rate", "0"], "--poison-rate"),
    (["--poison-rate", "1.2"], "--poison-rate"),
    (["--clean-ratio", "0"], "--clean-ratio"),
    (["--clean-ratio", "-0.1"], "--clean-ratio"),
    (["--threshold", "1.5"], "--threshold"),
    (["--threshold", "-0.1"], "--threshold"),
    (["--sad-epochs", "-1"], "--sad-epochs"),
    (["--sad-lr-max", "0"], "--sad-lr-max"),
    (["--sad-lr", "0.5"], "--sad-lr-max"),  # above the ladder's top
    (["--ssl-epochs", "-3"], "--ssl-epochs"),
    (["--ssl-pool", "some"], "--ssl-pool"),
    (["--batch-size", "0"], "--batch-size"),
    (["--model", "/nonexistent/model.pt"], "--model"),
    (["--out", "FILE/sub"], "--out"),  # FILE: a regular file, so nothing can be written below it
    (["--dataset", "cifar10", "--data-root", "/nonexistent/root"], "cifar-10-batches-py"),
    (FMNIST_QUICK + ["--clean-ratio", "0.95"], "--clean-ratio"),
    (FMNIST_QUICK + ["--target", "10"], "--target"),
    (["--pool-poison-share", "0.9"], "--pool-poison-share"),
    (["--resume"], "--resume"),  # no checkpoint in --out
    (["--clean-dir", "DIR"], "--clean-dir"),  # without --model
    (["--model", "FILE", "--clean-dir", "/nonexistent/dir"], "--clean-dir"),
    (["--model", "FILE", "--unlabeled-dir", "DIR"], "--unlabeled-dir"),  # without --clean-dir
    (["--model", "FILE", "--clean-dir", "DIR", "--attack", "trojan"], "--attack"),
    (["--attack", "none"], "--attack"),  # only with --model
    (["--attack", "patch"], "--trigger"),  # the patch is the --trigger PNG
    (["--trigger", "FILE"], "--trigger"),  # without --attack patch
    (["--attack", "patch", "--trigger", "/nonexistent/t.png"], "--trigger"),
    (FMNIST_QUICK + ["--attack", "patch", "--trigger", "FILE"], "--trigger"),  # not an image
    (["--backdoor-dir", "DIR"], "--backdoor-dir"),  # without --model
    (["--model", "FILE", "--backdoor-dir", "/nonexistent/dir"], "--backdoor-dir"),
    (["--normalize", "0.5,0.5,0.5"], "--normalize"),  # an odd count: no MEAN,STD split
    (["--normalize", "cifar"], "--normalize"),  # no such preset
    (FMNIST_QUICK + ["--normalize", "cifar10"], "--normalize"),  # 3 channels for 1-channel images
    (["--attack", "trojan", "--reference-model", "/nonexistent/ref.pt"], "--reference-model"),
    (["--attack", "badnets", "--reference-model", "FILE"], "--reference-model"),  # badnets fits nothing
]


@pytest.mark.parametrize("flags,names", BAD, ids=[" ".join(f[-2:]) for f, _ in BAD])
def test_bad_flag_ends_in_one_line_and_exit_code_2(flags, names, tmp_path, capsys, monkeypatch):
    if "fashion-mnist" in flags:
        needs_fashion()
    monkeypatch.setattr(ftt.torchvision.datasets, "CIFAR10", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    (tmp_path / "FILE").write_text("")
    (tmp_path / "DIR").mkdir()
    flags = [str(tmp_path / f) if f.startswith(("FILE", "DIR")) else f for f in flags]
    out = ["--out", str(tmp_path / "o")] if "--out" not in flags else []
    with pytest.raises(SystemExit) as e:
        raise SystemExit(ftt.cli(flags + out + ["--cache", str(tmp_path / "c")]))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and names in err, err
    assert not (tmp_path / "o").exists() and not (tmp_path / "c").exists()


@pytest.mark.parametrize("name", ["results.json", "checkpoint.pt"])
def test_existing_results_or_checkpoint_are_refused_without_overwrite_and_left_untouched(name, tmp_path, capsys):
    (tmp_path / name).write_text("{}")
    assert ftt.cli(["--out", str(tmp_path)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (tmp_path / name).read_text() == "{}"


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
    with pytest.raises(ftt.ConfigError, match="refused"):
        ftt.load_model(tmp_path / "evil.pt", "wrn16-1", 3, 10)
    assert not marker.exists()


def test_wrong_arch_or_class_count_names_the_mismatch(tmp_path):
    torch.save(ftt.build_backbone("wrn16-1", 3, 10).state_dict(), tmp_path / "m.pt")
    with pytest.raises(ftt.ConfigError, match="not a --arch preact18 checkpoint in a known layout"):
        ftt.load_model(tmp_path / "m.pt", "preact18", 3, 10)
    with pytest.raises(ftt.ConfigError, match=r"head.4.weight has shape \(10, 64\).*\(100, 64\)"):
        ftt.load_model(tmp_path / "m.pt", "wrn16-1", 3, 100)
    with pytest.raises(ftt.ConfigError, match="stem.weight"):
        ftt.load_model(tmp_path / "m.pt", "wrn16-1", 1, 10)


def test_a_given_reference_model_is_loaded_as_is_and_named_in_the_trigger_recipe(tmp_path):
    x = torch.randint(0, 256, (300, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(300) % 10
    ref = ftt.build_backbone("wrn10-1", 1, 10)
    torch.save(ref.state_dict(), tmp_path / "ref.pt")
    cfg = ftt.Config(dataset="fashion-mnist", arch="wrn10-1", attack="low-frequency",
                     reference_model=str(tmp_path / "ref.pt"), cache=str(tmp_path / "cache"))
    loaded = ftt.clean_reference(cfg, x, y, 10, torch.device("cpu"))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ref.state_dict().items())
    assert not (tmp_path / "cache").exists()  # nothing was trained or cached
    *_, how = ftt.make_trigger(cfg, x, y, 10, torch.device("cpu"))
    assert how["reference_sha256"] == hashlib.sha256((tmp_path / "ref.pt").read_bytes()).hexdigest()
    assert "reference_epochs" not in how
    torch.save(ftt.build_backbone("wrn10-1", 1, 5).state_dict(), tmp_path / "five.pt")
    with pytest.raises(ftt.ConfigError, match=r"--reference-model: head.4.weight has shape \(5, 64\)"):
        ftt.clean_reference(dataclasses.replace(cfg, reference_model=str(tmp_path / "five.pt")), x, y, 10,
                            torch.device("cpu"))


# ------------------------------------------------------------------ runs that survive: checkpoints, resume, non-finite loss

# Small enough for three subprocess runs in ~30 s; the assertions compare runs, not accuracy.
SURVIVE = ["--dataset", "fashion-mnist", "--arch", "wrn10-1", "--train-size", "2000", "--test-size", "300",
           "--attack-epochs", "2", "--attack-lr", "0.05", "--attack-batch", "64", "--no-attack-augment",
           "--clean-ratio", "0.1", "--sad-epochs", "3", "--sad-lr", "0.05", "--ssl-epochs", "3", "--mu", "2",
           "--threshold", "0.5"]


def run_ftt(flags, out, kill_at=None, nth=1):
    """Run `python ftt.py` in a subprocess; with kill_at, SIGKILL it as soon as that progress text shows
    for the nth time."""
    import subprocess
    import sys
    p = subprocess.Popen([sys.executable, ftt.__file__, *flags, "--out", str(out)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in p.stdout:
        seen.append(line)
        if kill_at and kill_at in line and sum(kill_at in s for s in seen) == nth:
            p.kill()  # SIGKILL: no handler, no cleanup, like a lost machine
            break
    p.wait()
    return p.returncode, "".join(seen)


def test_killed_run_resumed_ends_exactly_like_an_uninterrupted_one(tmp_path):
    needs_fashion()
    flags = SURVIVE + ["--cache", str(tmp_path / "cache")]
    rc, log = run_ftt(flags, tmp_path / "whole")
    assert rc == 0, log
    # killed twice: inside SAD (the epoch-1 checkpoint is on disk once epoch 2's line shows), then inside SSL
    rc, log = run_ftt(flags, tmp_path / "cut", kill_at="sad epoch   2/3")
    assert rc == -9 and not (tmp_path / "cut" / "results.json").exists(), log
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["stage"] == "sad"
    rc, log = run_ftt(flags + ["--resume"], tmp_path / "cut", kill_at="ssl epoch   2/3")
    assert rc == -9 and "resumed after epoch" in log, log
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["stage"] == "ssl"
    rc, log = run_ftt(flags + ["--resume"], tmp_path / "cut")
    assert rc == 0, log
    whole, cut = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("whole", "cut"))
    # (the stage-2 pool is chosen again on resume: "ssl_pool", when present, must match too)
    assert cut["results"] == whole["results"] and set(whole["results"]) - {"ssl_pool"} == {"before", "sad", "ssl"}
    a, b = (torch.load(tmp_path / d / "purified.pt", weights_only=True) for d in ("whole", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run's"
    assert not (tmp_path / "cut" / "checkpoint.pt").exists()  # a finished run leaves no checkpoint


def test_a_run_killed_in_its_second_sad_attempt_resumes_that_attempt(tmp_path):
    # lr 1e-6 then 3e-6: both leave the backdoor, so the pool check sends SAD round twice; killed inside
    # the second attempt, the resumed run continues that attempt (not the first) and ends like the whole run
    needs_fashion()
    flags = SURVIVE + ["--sad-lr", "1e-6", "--sad-lr-max", "3e-6", "--ssl-epochs", "1", "--cache", str(tmp_path / "c")]
    rc, log = run_ftt(flags, tmp_path / "whole")
    assert rc == 0 and "SAD again from the backdoored model at lr 3e-06" in log, log
    rc, log = run_ftt(flags, tmp_path / "cut", kill_at="sad epoch   2/3", nth=2)
    assert rc == -9 and torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["extra"] == {"sad_lr": 3e-6}
    rc, log = run_ftt(flags + ["--resume"], tmp_path / "cut")
    assert rc == 0 and "resumed after epoch" in log and "sad epoch   1/3" not in log, log
    whole, cut = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("whole", "cut"))
    assert cut["results"] == whole["results"] and [t["lr"] for t in whole["results"]["sad_tried"]] == [1e-6]
    a, b = (torch.load(tmp_path / d / "purified.pt", weights_only=True) for d in ("whole", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_other_flags_is_refused_before_training(tmp_path):
    needs_fashion()
    rc, log = run_ftt(SURVIVE + ["--cache", str(tmp_path / "c")], tmp_path / "o", kill_at="sad epoch   1/3")
    saved = (tmp_path / "o" / "checkpoint.pt").read_bytes()
    rc, log = run_ftt(SURVIVE + ["--cache", str(tmp_path / "c"), "--resume", "--sad-lr", "0.1"], tmp_path / "o")
    assert rc == 2 and "--sad-lr" in log, log
    assert not any("epoch" in line for line in log.splitlines()), log  # refused before any training
    assert (tmp_path / "o" / "checkpoint.pt").read_bytes() == saved


def test_non_finite_loss_names_stage_epoch_step_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    needs_fashion()
    flags = SURVIVE + ["--sad-lr", "1e30", "--sad-lr-max", "1e30", "--quiet", "--cache", str(tmp_path / "c"),
                       "--out", str(tmp_path / "o")]
    assert ftt.cli(flags) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "non-finite loss" in err and "in sad, epoch 1, step" in err, err
    kept = torch.load(tmp_path / "o" / "checkpoint.pt", weights_only=True)
    assert (kept["stage"], kept["epoch"]) == ("attack", 2) and "(attack, epoch 2)" in err
    assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())


def test_same_seed_gives_the_same_results_json_apart_from_timings(tmp_path):
    needs_fashion()
    cfg = ftt.parse_args(SURVIVE + ["--quiet", "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o")])
    first = ftt.main(cfg)
    second = json.loads(json.dumps(ftt.main(dataclasses.replace(cfg, overwrite=True))))
    first, second = ({k: v for k, v in r.items() if k != "timings"} for r in (json.loads(json.dumps(first)), second))
    second["config"]["overwrite"] = False
    assert first == second


# ------------------------------------------------------------------ your own data: ImageFolder in, purified model out

def image_folders(root, n_per_class=6, classes=3, size=16, seed=0):
    """Tiny ImageFolder trees written by the repo's own exporter: random RGB images, 3 classes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n_per_class * classes, 3, size, size), generator=g, dtype=torch.uint8)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    for name in ("clean", "test"):
        ftt.export_image_folder(x, y, root / name, classes)
    ftt.export_image_folder(x, torch.zeros_like(y), root / "unlabelled", classes)
    return x, y


def test_image_folder_round_trips_and_sorted_folder_names_are_class_indices(tmp_path):
    x, y = image_folders(tmp_path, classes=3)
    got_x, got_y, classes = ftt.load_image_folder(str(tmp_path / "clean"), "--clean-dir")
    assert classes == ["0", "1", "2"] and torch.equal(got_y, y) and torch.equal(got_x, x)
    assert torch.equal(ftt.load_unlabeled_folder(str(tmp_path / "unlabelled"), "--unlabeled-dir"), x)
    ftt.export_image_folder(x[:2], torch.tensor([0, 10]), tmp_path / "wide", 11)
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


def test_a_model_that_puts_every_pool_image_in_one_class_leaves_stage_2_all_of_the_pool(tmp_path, capsys):
    # drop-suspect would leave stage 2 nothing: it keeps the whole pool and says so
    image_folders(tmp_path)
    handed = ftt.build_backbone("wrn10-1", 3, 3)
    with torch.no_grad():
        handed.head[-1].weight.zero_()
        handed.head[-1].bias.copy_(torch.tensor([9.0, 0.0, 0.0]))
    torch.save(handed.state_dict(), tmp_path / "handed.pt")
    report = ftt.main(ftt.Config(model=str(tmp_path / "handed.pt"), arch="wrn10-1", clean_dir=str(tmp_path / "clean"),
                                 unlabeled_dir=str(tmp_path / "unlabelled"), test_dir=str(tmp_path / "test"),
                                 sad_epochs=1, sad_lr_max=ftt.Config.sad_lr, ssl_epochs=1, batch_size=4, mu=1,
                                 quiet=True, out=str(tmp_path / "o")))
    assert report["results"]["before"]["pool"]["class"] == 0 and "ssl_pool" not in report["results"]
    assert "puts every pool image in class 0, so stage 2 uses all of it" in capsys.readouterr().out
    assert "ssl" in report["results"]


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
        ftt.v2.functional.to_pil_image(torch.zeros(3, 8, 8, dtype=torch.uint8)).save(tmp_path / "clean" / "1" / "odd.png")
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


# ------------------------------------------------------------------ bench.py: every row, ratios, JSON

def test_bench_times_every_step_kind_and_writes_its_table_as_json(tmp_path):
    import bench
    r = bench.main(["--arch", "wrn10-1", "--shape", "1,8,8", "--batch", "4", "--mu", "2", "--windows", "2",
                    "--steps", "1", "--warmup", "1", "--pool", "32", "--json", str(tmp_path / "b.json")])
    assert set(r["rows"]) == {"plain@b", "plain@attack", "plain@b(1+mu)", "plain@b(1+mu), pipeline", "sad",
                              "ssl, pipeline", "ssl, in memory"}
    assert all(row["images_per_s"] > 0 and len(row["windows"]) == 2 for row in r["rows"].values())
    assert r["ratios"]["sad / plain@b"] == r["rows"]["sad"]["images_per_s"] / r["rows"]["plain@b"]["images_per_s"]
    assert r["flops_per_image_train_step"] > 0 and json.loads((tmp_path / "b.json").read_text())["arch"] == "wrn10-1"
    assert r["achieved_by"] == "plain@b(1+mu)"
    # --row: only those rows, and only the ratios between rows that ran
    few = ["--arch", "wrn10-1", "--shape", "1,8,8", "--batch", "4", "--windows", "1", "--steps", "1", "--warmup", "0",
           "--pool", "32", "--json", str(tmp_path / "c.json")]
    r = bench.main(few + ["--row", "ssl, pipeline", "--row", "ssl, in memory"])
    assert set(r["rows"]) == {"ssl, pipeline", "ssl, in memory"} and set(r["ratios"]) == {"ssl: pipeline / in memory"}
    assert r["achieved_by"] is None and r["achieved_flops_per_s_plain"] == 0
    with pytest.raises(SystemExit, match="no row"):
        bench.main(few + ["--row", "plain@b", "--row", "plane"])


@given(st.sampled_from([0.0, 0.25, 0.5, 0.75]), seeds)
def test_table3_pool_has_the_asked_poisoned_share_at_a_fixed_size(share, seed):
    g = torch.Generator().manual_seed(seed)
    poisoned = torch.randperm(400, generator=g)[:40]
    pool = torch.tensor(sorted(set(range(400)) - set(range(0, 400, 10))))  # a pool holding some of the poisoned
    pool = torch.cat([pool, poisoned]).unique()
    got = ftt.pool_with_share(pool, poisoned, share, seed)
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
    model, read = ftt.suspect_model(ftt.Config(model=str(tmp_path / "m.pt"), arch=arch, normalize=norm), 3, 10)
    assert read["layout"] == case.split(" ")[0] and read["prefix"] == "module." and read["tensors"] == len(ref.state_dict())
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in ftt.NORMALIZE_PRESETS[norm]) if norm else (0, 1)
    with torch.no_grad():
        want, got = ref((x - mean) / std), model.eval()(x)
    assert want.abs().max() < 100 and torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    assert ftt.export_layout(model, read["layout"]).keys() == ref.state_dict().keys()  # and back, name for name


@pytest.mark.parametrize("wrap", ["bare", "state_dict", "model", "net", "model/state_dict"])
@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod."])
def test_every_wrapper_and_prefix_is_read(wrap, prefix, tmp_path):
    m = randomised(ftt.build_backbone("wrn10-1", 3, 10))
    obj = {prefix + k: v for k, v in m.state_dict().items()}
    for key in reversed([] if wrap == "bare" else wrap.split("/")):
        obj = {key: obj, "epoch": 25, "best_acc": 84.1, "arch": "wrn"}  # what training scripts store beside it
    torch.save(obj, tmp_path / "m.pt")
    got, read = ftt.load_model(tmp_path / "m.pt", "wrn10-1", 3, 10)
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
    model, read = ftt.suspect_model(ftt.Config(model=str(tmp_path / "m.pt"), arch="wrn10-1", normalize="0.5,2"), 3, 10)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), m((x - 0.5) / 2), atol=1e-6)
        assert torch.allclose(ftt.stage_outputs(model, x)[-1], ftt.stage_outputs(m, (x - 0.5) / 2)[-1], atol=1e-6)
    assert read["normalize"] == {"mean": [0.5] * 3, "std": [2.0] * 3}
    assert model.state_dict().keys() == m.state_dict().keys()  # purified.pt stays the plain backbone
    assert ftt.normalization("0.1,0.2,0.3,1,2,3", 3) == ((0.1, 0.2, 0.3), (1.0, 2.0, 3.0))
    with pytest.raises(ftt.ConfigError, match="std"):
        ftt.normalization("0.5,0", 3)


def test_attack_none_poisons_nothing_and_leaves_asr_to_backdoor_dir():
    needs_fashion()
    cfg = ftt.Config(dataset="fashion-mnist", data_root="./data", attack="none", train_size=400, test_size=100)
    d = ftt.benchmark_data(cfg, torch.device("cpu"))
    x, y = ftt.load_dataset("fashion-mnist", "./data")["train"]
    assert d["counts"]["poisoned"] == 0 and len(d["x_bd"]) == 0 and d["trigger"]["attack"] == "none"
    assert torch.equal(d["x_poisoned"], x[:400]) and torch.equal(d["y_poisoned"], y[:400])
    assert len(d["x_l"]) + len(d["x_u"]) == 400


def test_backdoor_dir_asr_is_accuracy_on_those_images_as_the_target(tmp_path):
    x, _ = image_folders(tmp_path)
    bd = x[:7].clone()
    bd[..., -3:, -3:] = 255  # any images: the folder is the trigger
    ftt.export_image_folder(bd, torch.zeros(7, dtype=torch.long), tmp_path / "bd", 3)
    m = randomised(ftt.build_backbone("wrn10-1", 3, 3))
    torch.save(m.state_dict(), tmp_path / "m.pt")
    report = ftt.main(ftt.Config(model=str(tmp_path / "m.pt"), arch="wrn10-1", clean_dir=str(tmp_path / "clean"),
                                 test_dir=str(tmp_path / "test"), backdoor_dir=str(tmp_path / "bd"), attack="none",
                                 target=2, sad_epochs=0, quiet=True, out=str(tmp_path / "o")))
    want = ftt.accuracy(m, bd, torch.full((7,), 2), torch.device("cpu"))
    assert report["results"]["before"]["asr"] == want and report["counts"]["backdoor_test"] == 7
    assert report["trigger"]["asr_images"] == {"dir": str(tmp_path / "bd"), "n": 7, "label": 2}


def test_a_patch_trigger_png_poisons_and_measures_the_same_way_in_a_run(tmp_path):
    import attacks
    image_folders(tmp_path)
    rgba = attacks.grid_rgba(3, 16, 16)
    attacks.write_trigger_png(rgba, tmp_path / "t.png")
    m = randomised(ftt.build_backbone("wrn10-1", 3, 3))
    torch.save(m.state_dict(), tmp_path / "m.pt")
    report = ftt.main(ftt.Config(model=str(tmp_path / "m.pt"), arch="wrn10-1", clean_dir=str(tmp_path / "clean"),
                                 test_dir=str(tmp_path / "test"), attack="patch", trigger=str(tmp_path / "t.png"),
                                 sad_epochs=0, quiet=True, out=str(tmp_path / "o")))
    x_te, y_te, _ = ftt.load_image_folder(str(tmp_path / "test"), "--test-dir")
    x_bd, y_bd = attacks.backdoor_test_set(x_te, y_te, lambda im: attacks.patch(im, rgba), 0)
    assert report["results"]["before"]["asr"] == ftt.accuracy(m, x_bd, y_bd, torch.device("cpu"))
    assert report["trigger"]["pixels"] == report["trigger"]["opaque_pixels"] == 9
