"""harness.py, and what a user of the CLI sees: the start estimate and progress lines, evaluation when due, training
loops that read the device once per epoch, bad flags refused in one line before anything is touched, runs that
survive a kill (--resume) or a non-finite loss, the same figures for the same seed, and bench.py's table."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

import bench
import ftt
import harness
from conftest import needs_fashion, tiny_ssl_setup


# ------------------------------------------------------------------ what a user sees: start line, progress, evaluation

def test_progress_inside_a_long_epoch_gives_images_per_second_and_both_etas(capsys, monkeypatch):
    monkeypatch.setattr(harness.RunLog, "every_s", 0.0)  # as if every step took a minute
    net, x_l, y_l, x_u, cfg = tiny_ssl_setup()
    log = harness.RunLog(quiet=False, estimates={"sad": 0.0, "ssl": 120.0})
    ftt.stage1_sad(net, x_u[:32], y_l.repeat(2)[:32], dataclasses.replace(cfg, sad_epochs=1), torch.device("cpu"), log)
    inside = [line for line in capsys.readouterr().out.splitlines() if "images |" in line]
    assert len(inside) == 4  # one per step of 8 images
    assert all("img/s" in line and "stage eta" in line and "run eta" in line for line in inside)
    assert inside[0].split("|")[1].strip() == "8/32 images" and "run eta 2.0 min" in inside[-1]


def test_evaluation_every_n_epochs_and_always_after_the_last(tmp_path):
    net, x_l, y_l, x_u, cfg = tiny_ssl_setup()
    calls = []
    log = harness.RunLog(evaluate=lambda m: calls.append(1) or (50.0, 10.0), every=2, path=tmp_path / "log.jsonl",
                         quiet=True)
    ftt.stage1_sad(net, x_u[:16], y_l, dataclasses.replace(cfg, sad_epochs=5), torch.device("cpu"), log)
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["acc"] for r in rows] == [None, 50.0, None, 50.0, 50.0] and len(calls) == 3
    assert log.measure("sad", net.backbone) == (50.0, 10.0) and len(calls) == 3  # not evaluated twice
    assert [harness.evaluation_due(e, 4, 0) for e in (1, 2, 3, 4)] == [False, False, False, True]


def test_bn_reestimated_means_are_every_views_mean_and_the_model_given_is_left_alone():
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 256, (12, 1, 8, 8), dtype=torch.uint8)
    flip = lambda v: v.flip(-1)  # the views: an augmentation written out here
    m = harness.bn_reestimated(model, x, torch.device("cpu"), flip, channels_last=False, batch=4)
    with torch.no_grad():
        want = model[0](harness.to_input(flip(x), False)).mean((0, 2, 3))  # three equal batches: their means' mean
    assert torch.allclose(m[1].running_mean, want, atol=1e-5) and not m.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # a copy was re-estimated


def test_a_run_of_hours_is_told_what_to_run_instead():
    cfg = ftt.Config(arch="preact18", batch_size=4, mu=1, attack_batch=4)
    counts = {"train": 8, "clean": 4, "unlabelled": 4, "test": 4, "backdoor_test": 4}
    steps_for = lambda arch: bench.training_steps(cfg, arch, (1, 8, 8), 3, torch.device("cpu"))
    line = harness.start_line(cfg, {"attack": 30 * 3600.0, "sad": 60.0, "ssl": 600.0}, torch.device("cpu"), counts, True,
                              steps_for)
    assert "estimated 30.2 h" in line and "./reproduce.sh quick" in line and "--arch wrn16-1 (about" in line
    assert "reproduce.sh" not in harness.start_line(cfg, {"attack": 60.0}, torch.device("cpu"), counts, True, steps_for)


def test_estimate_counts_each_stage_from_its_own_steps_and_skips_what_does_not_run():
    cfg = ftt.Config(arch="wrn10-1", batch_size=4, mu=1, attack_batch=4, attack_epochs=2, sad_epochs=3, ssl_epochs=0,
                     channels_last=False)
    counts = {"train": 8, "clean": 4, "unlabelled": 4, "test": 4, "backdoor_test": 4}
    state = torch.get_rng_state()
    est = harness.estimate_run(cfg, "wrn10-1", counts, torch.device("cpu"), False,
                               lambda arch: bench.training_steps(cfg, arch, (1, 8, 8), 3, torch.device("cpu")))
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
            harness.train_supervised(net.backbone, lambda e: (x, y_l.repeat(n_steps)[:len(x)]), 1, 0.01, 8, cfg,
                                 torch.device("cpu"), "attack", harness.RunLog(quiet=True))
        elif stage == "sad":
            ftt.stage1_sad(net, x_u[:8 * n_steps], y_l.repeat(n_steps)[:8 * n_steps], cfg, torch.device("cpu"),
                           harness.RunLog(quiet=True))
        else:
            ftt.stage2_ssl(net, x_l, y_l, x_u, cfg, torch.device("cpu"), harness.RunLog(quiet=True))
        counts.append(reads.n)
        monkeypatch.undo()
        monkeypatch.setattr(ftt, "rand_augment", lambda x, **kw: real(x, **{**kw, "gather": False}))
    assert counts[1] == counts[2], counts


def test_cli_flags_come_from_config_and_unknown_flags_fail():
    cfg = ftt.parse_args(["--attack", "wanet", "--lambda", "0.5", "--no-detach-deep", "--sad-epochs", "3"])
    assert (cfg.attack, cfg.lambda_u, cfg.detach_deep, cfg.sad_epochs) == ("wanet", 0.5, False, 3)
    assert ftt.parse_args([]) == ftt.Config()
    for bad in (["--atack", "badnets"], ["--dataset", "mnist"], ["--beta", "x"]):
        with pytest.raises(SystemExit):
            ftt.parse_args(bad)
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
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
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

# ------------------------------------------------------------------ runs that survive: checkpoints, resume, non-finite loss

# Small enough for three subprocess runs in ~30 s; the assertions compare runs, not accuracy.
SURVIVE = ["--dataset", "fashion-mnist", "--arch", "wrn10-1", "--train-size", "1200", "--test-size", "200",
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
    flags = SURVIVE + ["--unlearn", "1", "--readmit", "taught", "--readmit-residue", "100",  # readmit's gate held open
                       "--cache", str(tmp_path / "cache")]  # (its SAD leaves the backdoor in); readmit's set is empty here
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
    # (the stage-2 pool is chosen again on resume: "ssl_pool", when present, must match too; --unlearn's and
    # --readmit's images, and "moved_back"'s, come from SAD's model, which a run killed inside stage 2 no longer has:
    # the checkpoint keeps them, so the resumed run trains on the same ones)
    assert cut["results"] == whole["results"] and whole["results"]["unlearn"]["images"] > 0
    assert set(whole["results"]) - {"ssl_pool", "moved_back", "unlearn", "readmit", "patch"} == {"before", "sad", "ssl"}
    a, b = (torch.load(tmp_path / d / "purified.pt", weights_only=True) for d in ("whole", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run's"
    assert not (tmp_path / "cut" / "checkpoint.pt").exists()  # a finished run leaves no checkpoint


def test_a_run_killed_in_its_second_sad_attempt_resumes_that_attempt(tmp_path):
    # lr 1e-6 then 3e-6: both leave the backdoor, so the pool check sends SAD round twice; killed inside
    # the second attempt, the resumed run continues that attempt (not the first) and ends like the whole run
    needs_fashion()
    flags = SURVIVE + ["--sad-lr", "1e-6", "--sad-lr-max", "3e-6", "--sad-early-check", "0",  # whole attempts
                       "--ssl-epochs", "1", "--cache", str(tmp_path / "c")]
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

# ------------------------------------------------------------------ bench.py: every row, ratios, JSON

IN_HEAP = """
import sys, torch, harness
kept = harness.keep_freed_memory() if sys.argv[1] == "keep" else None
x = torch.ones(2 ** 24)  # 64 MiB, past glibc's largest threshold for a block of its own (32 MiB)
lo, hi = (int(v, 16) for l in open("/proc/self/maps") if l.rstrip().endswith("[heap]") for v in l.split()[0].split("-"))
print(kept, lo <= x.data_ptr() < hi)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_puts_a_steps_large_tensors_in_the_heap_that_is_kept():
    # glibc maps a 64 MiB block on its own and unmaps it when freed, so the next step faults its pages in afresh;
    # after keep_freed_memory() it comes from the heap, which is not trimmed (what that buys: docs/results.md)
    run = lambda how: subprocess.run([sys.executable, "-c", IN_HEAP, how], capture_output=True, text=True,
                                     check=True, cwd=Path(__file__).parent).stdout.split()
    assert run("keep") == ["True", "True"] and run("default") == ["None", "False"]


def test_bench_times_every_step_kind_and_writes_its_table_as_json(tmp_path):
    import bench
    r = bench.main(["--arch", "wrn10-1", "--shape", "1,8,8", "--batch", "4", "--mu", "2", "--windows", "2",
                    "--steps", "1", "--warmup", "1", "--pool", "32", "--json", str(tmp_path / "b.json")])
    assert set(r["rows"]) == {"plain@b", "plain@attack", "plain@b(1+mu)", "plain@b(1+mu), pipeline", "sad",
                              "ssl, pipeline", "ssl, in memory", f"predict@{harness.EVAL_BATCH}", "predict@1024"}
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

