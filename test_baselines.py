"""The specification of baselines.py: NAD's distillation term, what FP and ANP prune, and each
baseline run on the tiny backdoored model of test_ftt.py."""
import dataclasses

import pytest
import torch
from hypothesis import given, strategies as st

import baselines
import ftt
import harness
from conftest import TINY, report

shapes = st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 5), st.integers(1, 5))
seeds = st.integers(0, 2**31 - 1)


def randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@given(shapes, seeds)
def test_nad_term_is_zero_when_student_equals_teacher(shape, seed):
    f = randn(shape, seed)
    assert baselines.nad_loss(f, f.clone()) == 0


@given(shapes, seeds, st.floats(0.1, 10))
def test_nad_term_ignores_the_scale_of_either_feature_and_is_at_most_4_over_hw(shape, seed, c):
    s, t = randn(shape, seed), randn(shape, seed + 1)
    torch.testing.assert_close(baselines.nad_loss(c * s, t), baselines.nad_loss(s, t))
    assert 0 <= baselines.nad_loss(s, t) <= 4 / (shape[2] * shape[3]) + 1e-9  # two unit vectors: |a - b|^2 <= 4


def test_nad_term_trains_the_student_only():
    s, t = torch.randn(2, 3, 4, 4, requires_grad=True), torch.randn(2, 3, 4, 4, requires_grad=True)
    baselines.nad_loss(s, t).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None


def synthetic(n=64, c=3, size=16, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, c, size, size), generator=g, dtype=torch.uint8),
            torch.randint(0, classes, (n,), generator=g))


QUIET = ftt.Config(arch="wrn10-1", sad_epochs=1, batch_size=16, quiet=True)
no_eval = harness.RunLog(quiet=True)


def test_fine_pruning_zeroes_exactly_the_channels_it_chose():
    torch.manual_seed(0)
    x, y = synthetic()
    model = ftt.build_backbone("wrn10-1", 3, 4)
    b = baselines.Baseline(method="fp", margin=100.0)  # any accuracy loss allowed: prunes deep
    model, info = baselines.fine_prune(model, x, y, QUIET, b, torch.device("cpu"), no_eval)
    assert 0 < len(info["pruned"]) < info["channels"]
    model.eval()
    with torch.no_grad():
        _, feats = baselines.stage_features(model, harness.to_input(x[:8]))
    active = feats[-1].abs().amax((0, 2, 3)) > 0  # (C,)
    assert sorted((~active).nonzero().flatten().tolist()) == info["pruned"]


def test_fine_pruning_prunes_least_active_channels_first():
    torch.manual_seed(0)
    x, y = synthetic()
    model = ftt.build_backbone("wrn10-1", 3, 4)
    b = baselines.Baseline(method="fp", margin=100.0)
    hold, rest = baselines.holdout_split(len(x), b.holdout, QUIET.seed, x.device)
    act = baselines.mean_activation(model, x[rest], torch.device("cpu"), True)  # FP ranks on the non-held-out part
    _, info = baselines.fine_prune(model, x, y, dataclasses.replace(QUIET, sad_epochs=0), b, torch.device("cpu"), no_eval)
    kept = sorted(set(range(info["channels"])) - set(info["pruned"]))
    assert kept and act[info["pruned"]].max() <= act[kept].min()


def test_anp_masks_stay_in_0_1_and_pruning_zeroes_the_scale_only_with_running_stats_untouched():
    torch.manual_seed(0)
    x, y = synthetic()
    model = ftt.build_backbone("wrn10-1", 3, 4)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:  # non-trivial biases and statistics, so that keeping them is visible
        torch.nn.init.uniform_(bn.bias, 0.1, 1.0)
        bn.running_mean.uniform_(-1, 1)
    biases = [bn.bias.detach().clone() for bn in bns]
    buffers = [t.clone() for t in model.buffers()]
    b = baselines.Baseline(method="anp", anp_iters=5, anp_lr=50.0, anp_threshold=0.5)  # a huge lr: clipping must hold
    model, info = baselines.anp(model, x, y, QUIET, b, torch.device("cpu"))
    flat = torch.cat(info["masks"])
    assert (flat >= 0).all() and (flat <= 1).all() and ((flat == 0) | (flat == 1)).any()
    assert info["pruned"] == int((flat < 0.5).sum()) > 0
    assert sum(int((bn.weight == 0).sum()) for bn in bns) == info["pruned"]
    assert all(torch.equal(bn.bias, b0) for bn, b0 in zip(bns, biases))  # ANP zeroes the scale, keeps the bias
    assert all(torch.equal(t, t0) for t, t0 in zip(model.buffers(), buffers))  # train-mode masks, stats restored
    assert not any(bn._forward_hooks for bn in bns)  # the perturbation hooks are gone


def test_anp_depth_search_evaluates_the_very_model_it_returns():
    # One pruning operation for the search and the result: the held-out ACC that chose the depth is the
    # returned model's, and it lies within the margin of the unpruned model's (same numbers, no tolerance).
    x, y = synthetic(n=128)
    for margin in (0.0, 100.0):  # none allowed: stays at the unpruned ACC; any: prunes deep
        torch.manual_seed(0)
        model = ftt.build_backbone("wrn10-1", 3, 4)
        model, info = baselines.anp(model, x, y, QUIET, baselines.Baseline(method="anp", anp_iters=5, margin=margin),
                                    torch.device("cpu"))
        hold = info["held_out"]
        assert harness.accuracy(model, x[hold], y[hold], torch.device("cpu")) == info["held_out_acc"]
        assert info["held_out_acc"] >= info["held_out_acc_unpruned"] - margin
        assert info["pruned"] > 0 or margin == 0.0


# ------------------------------------------------------------------ each baseline on the tiny backdoored model

@pytest.fixture(scope="module")
def backdoored(tiny_backdoor, tmp_path_factory):
    path, before = tiny_backdoor(0)
    report("baselines_fixture", before=before)
    assert before["asr"] >= 80, before
    root = tmp_path_factory.mktemp("tiny")
    # the baselines' own budget, lr 0.05 (--sad-lr-max): at the default 0.1, NAD took this tiny model from ACC
    # 79.1 to 57.3
    return root, ftt.Config(**TINY, model=path, sad_lr_max=0.05, out=str(root / "attack"), cache=str(root / "cache"))


@pytest.mark.parametrize("method", ["ft", "fp", "nad"])
def test_ft_fp_and_nad_lower_the_asr_of_the_tiny_backdoor(method, backdoored):
    # Bar: ASR <= 20 after (as SAD's in test_ftt.py); FT and FP also keep ACC within 20 points. Measured under
    # ATEN_CPU_CAPABILITY native (AVX-512) / default / avx2: ASR after FT 3.2-4.1, FP 3.1-4.1, NAD 0.9-3.6; ACC lost
    # FT 1.9-2.7, FP 1.7-2.9. NAD's ACC is not asserted: it lost 14.0 (native, default) and 23.3 (avx2) points on this
    # model, so a bound would hold on some CPUs only (docs/results.md: numbers per capability).
    root, cfg = backdoored
    r = baselines.run(dataclasses.replace(cfg, out=str(root / method)), baselines.Baseline(method=method))["results"]
    report(f"baseline[{method}]", **r)
    assert r["after"]["asr"] <= 20, r
    assert set(r["after"]) == set(r["before"]) == {"acc", "asr", "ra"}, r  # RA as ftt.py reports it
    if method != "nad":
        assert r["after"]["acc"] >= r["before"]["acc"] - 20, r


def test_anp_runs_on_the_tiny_backdoored_model_and_reports_what_it_pruned(backdoored):
    # Only what holds by construction is asserted: the depth chosen keeps held-out clean ACC within the
    # margin. What ANP does to ASR and test ACC here varies with the CPU's float rounding (issue 11: on
    # AVX-512, ACC 79.5 -> 66.7); the measured figures over seeds and capabilities are in docs/results.md.
    root, cfg = backdoored
    r = baselines.run(dataclasses.replace(cfg, out=str(root / "anp")), baselines.Baseline(method="anp", anp_iters=30))
    info = r["info"]
    report("baseline[anp]", **r["results"], pruned=info["pruned_neurons"], held_out=info["held_out_acc"],
           held_out_unpruned=info["held_out_acc_unpruned"])
    assert 0 <= info["pruned_neurons"] < info["neurons"]
    assert info["held_out_acc"] >= info["held_out_acc_unpruned"] - baselines.Baseline().margin


def test_methods_run_in_one_process_give_exactly_what_separate_runs_give(backdoored):
    root, cfg = backdoored
    cfg = dataclasses.replace(cfg, sad_epochs=2)
    alone = [baselines.run(dataclasses.replace(cfg, out=str(root / "alone" / m)), baselines.Baseline(method=m))["results"]
             for m in ("ft", "fp")]
    together = baselines.run_methods(dataclasses.replace(cfg, out=str(root / "together")), baselines.Baseline(),
                                     ["ft", "fp"])
    assert [r["results"] for r in together] == alone and alone[0]["after"] != alone[1]["after"]
    assert baselines.run_methods(dataclasses.replace(cfg, out=str(root / "together")), baselines.Baseline(),
                                 ["ft", "fp"]) == []  # a finished row is skipped, nothing read
