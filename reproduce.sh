#!/usr/bin/env bash
# Reproduce the figures of README.md and docs/. Usage: ./reproduce.sh NAME [extra ftt.py flags]
#   paper     the paper's Table 1 setting for one attack (CIFAR-10, PreActResNet-18; wants a GPU)
#   offline   FTT on Fashion-MNIST / WRN-16-1 on 2 CPU cores, F_D detached and not (docs/results.md)
#   attacks   every attack's backdoored model on Fashion-MNIST and CIFAR-10 (DATA_ROOT): ACC, ASR, trigger PSNR
#   handed    purify a model you were handed on your own image folders (docs/your-model.md walk-through; made here)
#   quick     Table 1's layout offline on 2 CPU cores: Fashion-MNIST, WRN-16-1, six attacks x seven columns
#   quick-ablation  stage 2 without stage 1, with and without the AP terms, on quick's backdoored models
#   table1    Table 1: CIFAR-10, PreActResNet-18, five attacks, Before / FT / FP / NAD / ANP / FTT (GPU)
#   table2    Table 2: WRN-16-1 on CIFAR-10 (BadNets, Trojan; CPU-able with --train-size) and ResNet-50 on CIFAR-100 (GPU)
#   table3    Table 3: poisoned share 0 / 25 / 50 / 75% of the unlabelled pool (GPU)
#   table4    Table 4: ablation, FTT / without SSL / without SAD (GPU)
#   fig5      Figure 5: clean share 0.5% .. 10% for every method (GPU); a table, and a PNG with matplotlib
#   benchmark CIFAR-10 / WRN-16-1 (DATA_ROOT), BadNets, Blended, Trojan, seeds 0 1 (SEEDS): attackers trained the
#             third-party way (25 epochs, lr 0.1, step decay, no augmentation), every defence with its defaults
#   sad-ablation  FTT(SAD) variants of eq. (5)'s scale and beta 0 on benchmark's backdoored models
#   ssl-passes    ACC (and ASR) against SSL passes, 20 passes, with and without the EMA: a PNG with matplotlib
#   sad-schedule  FTT(SAD) and FT with the cosine schedule and with NAD's (--sad-schedule nad) on benchmark's
#             models (SRC: their folder, ROWS: which rows, SCHEDULES: which), and FTT(SAD+SSL) with NAD's
#   stage2    stage 2 variants (FixMatch's one pass, BatchNorm momentum, no decay, --teacher) on development
#             models, chosen on held-out clean images and the pool check (issue 22)
#   pool-trajectory  the pool check after every SAD epoch on stage2's development models (--sad-early-check)
#   third-party-table  released backdoored models (THIRD_PARTY=DIR) purified by FTT, FT and NAD at their defaults,
#             with the clean model's ASR on each trigger (the floor); evaluation only, never for choosing
#   third-party-before  every released model (THIRD_PARTY=DIR) read through --model with its trigger and
#             normalisation, evaluated before any defence, against the figures its README lists (issue 23)
#   third-party   docs/your-model.md walk-through: a published-style WRN-16-1 (WideResNet-pytorch keys, DataParallel prefix,
#             normalised inputs, 3x3 grid trigger), made here, purified by one ftt.py command (CIFAR-10 in DATA_ROOT)
#   cifar10-subset DIR [N_TRAIN N_TEST]  the first N_TRAIN/5 images of each CIFAR-10 training batch and the first
#             N_TEST test images (10000 / 4000: 41 MiB, small enough for one call to a lent GPU), as python batches
#             in DIR/cifar-10-batches-py: --data-root DIR reads it like the whole set
# Every cell writes RUNS/<table>/<row>/<method>/results.json; a rerun skips finished cells; backdoored
# models are trained once per row (by the FTT cell) and shared by every method of that row.
set -euo pipefail
cd "$(dirname "$0")"
name=${1:-}; shift || true
RUNS=${RUNS:-runs}
PAPER_SSL="--ssl-pool all --ssl-forward split --teacher none --ssl-exits all --unlearn 0 --readmit none"  # the paper's stage 2

table() {  # table TITLE JSON... : a Markdown table of ACC / ASR / PSNR per results JSON
  python3 - "$@" <<'PY'
import json, sys
title, files = sys.argv[1], sys.argv[2:]
print(f"\n{title}\n\n| run | attack | ASR before | ACC before | ASR SAD | ACC SAD | ASR SAD+SSL | ACC SAD+SSL | PSNR dB | minutes |")
print("|---|---|---|---|---|---|---|---|---|---|")
for f in files:
    r = json.load(open(f)); m = r["results"]; c = r["config"]
    v = lambda s, k: f"{m[s][k]:.2f}" if s in m and m[s][k] is not None else "-"
    print(f"| {f.split('/')[-3]}/{f.split('/')[-2]} | {c['attack']} | {v('before', 'asr')} | {v('before', 'acc')} | "
          f"{v('sad', 'asr')} | {v('sad', 'acc')} | {v('ssl', 'asr')} | {v('ssl', 'acc')} | "
          f"{r['trigger']['psnr_db']:.1f} | {r['timings']['total_s'] / 60:.1f} |")
PY
}

attack_table() {  # attack_table DIR : backdoored ACC / ASR / trigger PSNR per attack, one column group per dataset
  python3 - "$1" <<'PY'
import json, os, sys
d = sys.argv[1]
sets = [s for s in ("fashion-mnist", "cifar10") if os.path.isdir(os.path.join(d, s))]
rows = ("badnets", "trojan", "blended", "low-frequency", "wanet", "atteq-nn")
print("\nBackdoored models (./reproduce.sh attacks): the attacker's model before any defence\n")
print("| attack | " + " | ".join(f"{s} ACC | {s} ASR | {s} PSNR dB | {s} min" for s in sets) + " |")
print("|---|" + "---|---|---|---|" * len(sets))
for a in rows:
    cells = []
    for s in sets:
        f = os.path.join(d, s, a, "results.json")
        if not os.path.exists(f):
            cells.append("- | - | - | -"); continue
        r = json.load(open(f))
        b = r["results"]["before"]
        cells.append(f"{b['acc']:.2f} | {b['asr']:.2f} | {r['trigger']['psnr_db']:.1f} | {r['timings']['total_s'] / 60:.1f}")
    print(f"| {a} | " + " | ".join(cells) + " |")
PY
}

CELL=0; CELLS=1
# On a GPU every ftt.py cell compiles the attacker's training with CUDA graphs (--compile: 2.5x the eager
# images/s of its step on an H100, docs/speed.md); GPU_FLAGS= turns that off.
GPU_FLAGS=${GPU_FLAGS-$(python3 -c "import torch; print('--compile' if torch.cuda.is_available() else '')")}

cell() {  # cell DIR PROGRAM FLAGS... : run one cell unless DIR/results.json exists
  local dir=$1 prog=$2; shift 2
  [ "$prog" = ftt.py ] && set -- "$@" $GPU_FLAGS
  CELL=$((CELL + 1))
  if [ -f "$dir/results.json" ]; then echo "[cell $CELL/$CELLS] $dir: done, skipped"; return; fi
  echo "[cell $CELL/$CELLS] $dir"
  local resume=(); [ -f "$dir/checkpoint.pt" ] && resume=(--resume)
  python3 "$prog" "$@" "${resume[@]}" --out "$dir"
}

row() {  # row DIR FLAGS... : FTT (trains and saves the backdoored model), then FT, FP, NAD, ANP on that model;
         # with ATTACKER=PATH every cell of the row defends that backdoored model instead (nothing is trained twice)
  local dir=$1; shift
  local model="$dir/ftt/backdoored.pt" given=()
  if [ -n "${ATTACKER:-}" ]; then model=$ATTACKER; given=(--model "$ATTACKER"); fi
  cell "$dir/ftt" ftt.py "$@" "${given[@]}"
  # the four baselines in one process: the data is read and poisoned once; finished ones are skipped
  local todo; todo=$(for m in ft fp nad anp; do [ -f "$dir/$m/results.json" ] || printf '%s,' "$m"; done)
  CELL=$((CELL + 4))
  if [ -z "$todo" ]; then echo "[cells $((CELL - 3))-$CELL/$CELLS] $dir/{ft,fp,nad,anp}: done, skipped"; return; fi
  echo "[cells $((CELL - 3))-$CELL/$CELLS] $dir/{${todo%,}}"
  python3 baselines.py --method "$todo" --model "$model" "$@" ${BASELINE_FLAGS:-} --out "$dir"  # "ft," too: DIR/ft
}

time_table() {  # time_table ROWDIR... : wall minutes of every cell (the attacker's training, then each defence)
  python3 - "$@" <<'PY'
import json, os, sys
print("\n| row | attacker | FT | FP | NAD | ANP | FTT(SAD) | FTT(SSL stage) | device |\n|---|---|---|---|---|---|---|---|---|")
for r in sys.argv[1:]:
    j = lambda m: json.load(open(os.path.join(r, m, "results.json"))) if os.path.exists(os.path.join(r, m, "results.json")) else None
    f = j("ftt"); t = f["timings"] if f else {}
    mins = lambda v: "-" if v is None else f"{v / 60:.2f}"
    base = [mins(j(m)["timings"]["total_s"]) if j(m) else "-" for m in ("ft", "fp", "nad", "anp")]
    dev = f["versions"]["device_name"] if f else "-"
    print(f"| {os.path.basename(r)} | {mins(t.get('backdoor_s'))} | " + " | ".join(base) +
          f" | {mins(t.get('sad_s'))} | {mins(t.get('ssl_s'))} | {dev} |")
PY
}

plot_logs() {  # plot_logs PNG TITLE LOG.jsonl... : ACC and ASR of the SSL stage against passes, one line per log
  python3 - "$@" <<'PY'
import json, sys
png, title, logs = sys.argv[1], sys.argv[2], sys.argv[3:]
rows = {f: [json.loads(l) for l in open(f) if '"stage": "ssl"' in l] for f in logs}
for f, r in rows.items():
    print(f"{f}: " + ", ".join(f"pass {x['epoch']} ACC {x['acc']} ASR {x['asr']}" for x in r if x["acc"] is not None))
try:
    import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
except ImportError:
    sys.exit(print("matplotlib not installed (pip install matplotlib): the figures above are the plot's data"))
fig, axes = plt.subplots(1, 2, figsize=(10, 4))
for f, r in rows.items():
    r = [x for x in r if x["acc"] is not None]
    for ax, k in zip(axes, ("acc", "asr")):
        ax.plot([x["epoch"] for x in r], [x[k] for x in r], marker="o", label=f.split("/")[-3] + "/" + f.split("/")[-2])
for ax, k in zip(axes, ("ACC %", "ASR %")):
    ax.set_xlabel("SSL passes over the unlabelled pool"); ax.set_ylabel(k)
axes[0].legend(fontsize=7); fig.suptitle(title, fontsize=9); fig.tight_layout(); fig.savefig(png, dpi=120)
print(f"wrote {png}")
PY
}

method_table() {  # method_table TITLE ROWDIR... : the paper's Table 1 layout, with Average and Deviation rows
  python3 - "$@" <<'PY'
import json, os, statistics, sys
title, rows = sys.argv[1], sys.argv[2:]
cols = [("Before", "ftt", "before"), ("FT", "ft", "after"), ("FP", "fp", "after"), ("NAD", "nad", "after"),
        ("ANP", "anp", "after"), ("FTT(SAD)", "ftt", "sad"), ("FTT(SAD+SSL)", "ftt", "ssl")]
if os.environ.get("FTT_CELL"):  # FTT again on the same backdoored models (benchmark's FTT_CELL)
    cols += [(f"FTT(SAD) {os.environ['FTT_CELL']}", os.environ["FTT_CELL"], "sad"),
             (f"FTT(SAD+SSL) {os.environ['FTT_CELL']}", os.environ["FTT_CELL"], "ssl")]
def get(row, method, key):
    f = os.path.join(row, method, "results.json")
    return json.load(open(f))["results"][key] if os.path.exists(f) else None
out = [f"\n{title}\n", "| attack | " + " | ".join(f"{c} ASR | {c} ACC" for c, _, _ in cols) + " |",
       "|---|" + "---|" * (2 * len(cols))]
table = {r: [get(r, m, k) for _, m, k in cols] for r in rows}
fmt = lambda v: "-" if v is None else f"{v:.2f}"
for r, cells in table.items():
    out.append(f"| {os.path.basename(r)} | " + " | ".join(f"{fmt(c and c['asr'])} | {fmt(c and c['acc'])}" for c in cells) + " |")
avg = []
for j in range(len(cols)):
    vals = [table[r][j] for r in rows if table[r][j] is not None]
    avg.append({k: statistics.mean(v[k] for v in vals) for k in ("asr", "acc")} if len(vals) == len(rows) else None)
out.append("| Average | " + " | ".join(f"{fmt(a and a['asr'])} | {fmt(a and a['acc'])}" for a in avg) + " |")
dev = lambda a, k: "-" if a is None or avg[0] is None else f"{a[k] - avg[0][k]:+.2f}"
out.append("| Deviation | - | - | " + " | ".join(f"{dev(a, 'asr')} | {dev(a, 'acc')}" for a in avg[1:]) + " |")
if any(c and "ra" in c for cells in table.values() for c in cells):  # cells run since RA was recorded
    out += ["\nRA, the triggered test images scored against their own classes (a backdoor that moved to another "
            "class shows here, not in ASR):\n", "| attack | " + " | ".join(c for c, _, _ in cols) + " |",
            "|---|" + "---|" * len(cols)]
    out += [f"| {os.path.basename(r)} | " + " | ".join(fmt(c and c.get("ra")) for c in cells) + " |"
            for r, cells in table.items()]
print("\n".join(out))
PY
}

case "$name" in
  paper)
    python3 ftt.py --out "$RUNS/paper" $GPU_FLAGS "$@" ;;
  offline)
    # smallest sensible budget on 2 cores: full Fashion-MNIST, WRN-16-1, 3 attacker epochs
    common=(--dataset fashion-mnist --arch wrn16-1 --attack badnets --attack-epochs 3 --attack-lr 0.05
            --no-attack-augment --sad-epochs 10 --sad-lr 0.05 --sad-lr-max 0.05 --ssl-epochs 2 "$@")
    python3 ftt.py "${common[@]}" --detach-deep --out "$RUNS/offline-detach"
    python3 ftt.py "${common[@]}" --no-detach-deep --model "$RUNS/offline-detach/backdoored.pt" --out "$RUNS/offline-mutual"
    table "FTT, Fashion-MNIST, WRN-16-1 (./reproduce.sh offline)" "$RUNS"/offline-{detach,mutual}/results.json ;;
  attacks)
    # every attack's backdoored model, no defence: ACC, ASR, trigger PSNR on Fashion-MNIST (first 20,000 training
    # images, 5 attacker epochs) and the full CIFAR-10 (50,000 images, 6 epochs; read from DATA_ROOT, downloaded
    # there when absent); WRN-16-1, lr 0.05, no augmentation, reference model 3 epochs, first 2,000 test images
    dir="$RUNS/attacks"; CELLS=12
    common=(--arch wrn16-1 --test-size 2000 --attack-lr 0.05 --no-attack-augment --reference-epochs 3
            --sad-epochs 0 --ssl-epochs 0)
    for a in badnets trojan blended low-frequency wanet atteq-nn; do
      cell "$dir/fashion-mnist/$a" ftt.py --dataset fashion-mnist --train-size 20000 --attack-epochs 5 --attack "$a" "${common[@]}" "$@"
    done
    for a in badnets trojan blended low-frequency wanet atteq-nn; do
      cell "$dir/cifar10/$a" ftt.py --dataset cifar10 --data-root "${DATA_ROOT:-./data}" --attack-epochs 6 --attack "$a" "${common[@]}" "$@"
    done
    attack_table "$dir" | tee "$dir/table.md" ;;
  handed)
    # 1. someone hands you a backdoored model (here: trained by the attacker's code on Fashion-MNIST)
    d="$RUNS/handed"
    python3 ftt.py --dataset fashion-mnist --arch wrn16-1 --train-size 20000 --attack badnets --attack-epochs 3 \
      --attack-lr 0.05 --no-attack-augment --sad-epochs 0 --ssl-epochs 0 --overwrite --out "$d/attacker"
    # 2. your images as ImageFolder trees: 1,000 clean labelled, 10,000 unlabelled, 2,000 test (none seen by the attacker)
    python3 - "$d" <<'PY'
import sys, loading
d = sys.argv[1]
(x, y), (xt, yt) = (loading.load_dataset("fashion-mnist", "./data")[s] for s in ("train", "test"))
loading.export_image_folder(x[40000:41000], y[40000:41000], f"{d}/clean", 10)
loading.export_image_folder(x[41000:51000], y[41000:51000] * 0, f"{d}/unlabelled", 10)  # labels not used
loading.export_image_folder(xt[:2000], yt[:2000], f"{d}/test", 10)
PY
    # 3. purify it: ACC on your test images, ASR with the BadNets trigger you suspect
    python3 ftt.py --model "$d/attacker/backdoored.pt" --arch wrn16-1 --clean-dir "$d/clean" \
      --unlabeled-dir "$d/unlabelled" --test-dir "$d/test" --attack badnets --sad-epochs 10 --sad-lr 0.05 --sad-lr-max 0.05 \
      --ssl-epochs 2 --overwrite --out "$d/purified" "$@" ;;
  quick)
    # Table 1's layout offline on 2 CPU cores, about an hour: Fashion-MNIST (20,000 training images, 2,000 test),
    # WRN-16-1, all six attacks; attacker 5 epochs; every defence with its defaults on the same 5% clean subset
    dir="$RUNS/quick"; CELLS=30
    BASELINE_FLAGS=${BASELINE_FLAGS:-"--anp-iters 200"}
    flags=(--dataset fashion-mnist --arch wrn16-1 --train-size 20000 --test-size 2000 --attack-epochs 5 --attack-lr 0.05
           --no-attack-augment --reference-epochs 3 --quiet "$@")
    for a in badnets trojan blended low-frequency wanet atteq-nn; do row "$dir/$a" --attack "$a" "${flags[@]}"; done
    method_table "./reproduce.sh quick: Fashion-MNIST, WRN-16-1 (2 CPU cores)" "$dir"/{badnets,trojan,blended,low-frequency,wanet,atteq-nn} \
      | tee "$dir/table.md" ;;
  quick-ablation)
    # Table 4's question on quick's backdoored models (run quick first): stage 2 alone, with and without the AP
    # terms, on all of the pool as in the paper (--ssl-pool all: the default would leave the triggered images out)
    dir="$RUNS/quick-ablation"; CELLS=4
    flags=(--dataset fashion-mnist --arch wrn16-1 --train-size 20000 --test-size 2000 --reference-epochs 3
           --sad-epochs 0 $PAPER_SSL --quiet "$@")
    for a in badnets blended; do
      cell "$dir/$a-without-stage1" ftt.py --attack "$a" --model "$RUNS/quick/$a/ftt/backdoored.pt" "${flags[@]}"
      cell "$dir/$a-without-sad" ftt.py --attack "$a" --beta 0 --model "$RUNS/quick/$a/ftt/backdoored.pt" "${flags[@]}"
    done
    table "Ablation on quick's models: stage 2 only (the SAD+SSL columns)" "$dir"/*/results.json | tee "$dir/table.md" ;;
  table1)
    dir="$RUNS/table1"; CELLS=25
    for a in badnets blended low-frequency atteq-nn wanet; do row "$dir/$a" --attack "$a" "$@"; done
    method_table "Table 1: CIFAR-10, PreActResNet-18" "$dir"/{badnets,blended,low-frequency,atteq-nn,wanet} | tee "$dir/table.md" ;;
  table2)
    # WRN-16-1 / CIFAR-10 rows; on 2 CPU cores pass e.g. --train-size 20000 --attack-epochs 20 (see docs/reproduce.md)
    dir="$RUNS/table2"; CELLS=20
    for a in badnets trojan; do row "$dir/wrn16-1-$a" --dataset cifar10 --arch wrn16-1 --attack "$a" "$@"; done
    if [ -z "${CPU_ONLY:-}" ]; then
      for a in badnets trojan; do row "$dir/resnet50-$a" --dataset cifar100 --arch resnet50 --attack "$a" "$@"; done
    fi
    method_table "Table 2: WRN-16-1 on CIFAR-10, ResNet-50 on CIFAR-100" "$dir"/* | tee "$dir/table.md" ;;
  table3)
    dir="$RUNS/table3"; CELLS=16
    for a in atteq-nn badnets blended low-frequency; do  # the pool's share changes the defender's data only:
      # one attacker per attack; SSL on all of the pool, as in the paper (the default leaves the suspect class out)
      cell "$dir/$a/share-0" ftt.py --attack "$a" --pool-poison-share 0 $PAPER_SSL "$@"
      for s in 0.25 0.5 0.75; do
        cell "$dir/$a/share-$s" ftt.py --attack "$a" --pool-poison-share "$s" $PAPER_SSL --model "$dir/$a/share-0/backdoored.pt" "$@"
      done
    done
    table "Table 3: poisoned share of the unlabelled pool (ASR/ACC after SAD+SSL are the last two)" "$dir"/*/share-*/results.json | tee "$dir/table.md" ;;
  table4)
    dir="$RUNS/table4"; CELLS=9
    for a in badnets blended atteq-nn; do  # Table 1's backdoored model when table1 ran, else one trained here
      model="$RUNS/table1/$a/ftt/backdoored.pt"; given=(--model "$model")
      [ -f "$model" ] || { model="$dir/$a/full/backdoored.pt"; given=(); }
      # SSL on all of the pool, as in the paper (the default leaves the suspect class out)
      cell "$dir/$a/full" ftt.py --attack "$a" $PAPER_SSL "${given[@]}" "$@"   # its SAD column is "without SSL"
      cell "$dir/$a/without-stage1" ftt.py --attack "$a" --sad-epochs 0 $PAPER_SSL --model "$model" "$@"
      cell "$dir/$a/without-sad" ftt.py --attack "$a" --sad-epochs 0 --beta 0 $PAPER_SSL --model "$model" "$@"
    done
    table "Table 4: ablation (full: SAD+SSL; without SSL: the SAD columns of full; without-stage1 (no stage 1, eq. 7
whole in stage 2) and without-sad (no stage 1 and beta 0: no attention distillation at all): the SAD+SSL columns)" \
      "$dir"/*/*/results.json | tee "$dir/table.md" ;;
  fig5)
    dir="$RUNS/fig5"; CELLS=125
    for c in 0.05 0.005 0.01 0.02 0.1; do  # the clean share changes the defender's data only: one attacker per attack
      for a in badnets blended low-frequency atteq-nn wanet; do
        first="$dir/clean-0.05/$a/ftt/backdoored.pt"
        if [ "$c" = 0.05 ]; then row "$dir/clean-$c/$a" --attack "$a" --clean-ratio "$c" "$@"
        else ATTACKER=$first row "$dir/clean-$c/$a" --attack "$a" --clean-ratio "$c" "$@"; fi
      done
      method_table "Figure 5 data, clean share $c" "$dir/clean-$c"/* | tee "$dir/clean-$c.md"
    done
    python3 - "$dir" <<'PY'
import sys
try:
    import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
except ImportError:
    sys.exit(print("matplotlib not installed: the tables above are the figure's data"))
import glob, json, os, statistics
d = sys.argv[1]; shares = [0.005, 0.01, 0.02, 0.05, 0.1]
cols = [("FT", "ft", "after"), ("FP", "fp", "after"), ("NAD", "nad", "after"), ("ANP", "anp", "after"), ("FTT", "ftt", "ssl")]
fig, axes = plt.subplots(1, 2, figsize=(10, 4))
for name, m, key in cols:
    for ax, metric in zip(axes, ("asr", "acc")):
        ys = [statistics.mean(json.load(open(f))["results"][key][metric] for f in glob.glob(f"{d}/clean-{c}/*/{m}/results.json")) for c in shares]
        ax.plot([100 * c for c in shares], ys, marker="o", label=name); ax.set_xlabel("clean data %"); ax.set_ylabel(metric.upper())
axes[0].legend(); fig.savefig(f"{d}/fig5.png", dpi=120); print(f"wrote {d}/fig5.png")
PY
    ;;
  benchmark|benchmark-table)  # benchmark-table: only the tables and the plot, from the cells finished so far
    # FTT_CELL=NAME: only FTT again, at the code's defaults, on each row's saved backdoored model, into ROW/NAME
    # (a column of its own in the table); the row's other cells are not run
    dir="$RUNS/benchmark"; seeds=${SEEDS:-0 1}; per_seed=$([ -n "${FTT_CELL:-}" ] && echo 3 || echo 15)
    CELLS=$((per_seed * $(echo $seeds | wc -w)))
    flags=(--dataset cifar10 --data-root "${DATA_ROOT:-./data}" --arch wrn16-1 --attack-epochs 25 --attack-lr 0.1
           --attack-schedule step --no-attack-augment --quiet "$@")
    rows=()
    for s in $seeds; do
      for a in badnets blended trojan; do
        if [ "$name" = benchmark ] && [ -n "${FTT_CELL:-}" ]; then  # FTT alone, today's defaults, the row's own model
          m="$dir/$a-s$s/ftt/backdoored.pt"
          if [ -f "$m" ]; then cell "$dir/$a-s$s/$FTT_CELL" ftt.py --attack "$a" --seed "$s" "${flags[@]}" --model "$m"
          else echo "$dir/$a-s$s: no backdoored model yet (run the benchmark without FTT_CELL first): skipped"; fi
        elif [ "$name" = benchmark ]; then row "$dir/$a-s$s" --attack "$a" --seed "$s" "${flags[@]}"; fi
        [ -d "$dir/$a-s$s" ] && rows+=("$dir/$a-s$s")
      done
    done
    { method_table "./reproduce.sh benchmark: CIFAR-10, WRN-16-1, ftt.py and baselines.py defaults" "${rows[@]}"
      time_table "${rows[@]}"; } | tee "$dir/table.md"
    plot_logs "$dir/ssl.png" "benchmark: FTT's stage 2 (defaults)" "$dir"/*/ftt/log.jsonl ;;
  sad-ablation)
    # run benchmark first: FTT(SAD) on its backdoored models with eq. (5) reduced otherwise, and with beta 0
    dir="$RUNS/sad-ablation"; src="$RUNS/benchmark"; CELLS=0
    for r in "$src"/*/; do
      r=$(basename "$r"); a=${r%-s*}; s=${r##*-s}
      for v in "--beta 0" "--ap-reduce mean" "--ap-reduce l2" "--ap-reduce sum"; do
        cell "$dir/$r/${v// /}" ftt.py --dataset cifar10 --data-root "${DATA_ROOT:-./data}" --arch wrn16-1 --attack "$a" \
          --seed "$s" --model "$src/$r/ftt/backdoored.pt" --ssl-epochs 0 --quiet $v "$@"
      done
    done
    table "FTT(SAD) variants on benchmark's models (SAD columns; no SSL)" "$dir"/*/*/results.json | tee "$dir/table.md" ;;
  ssl-passes)
    # run benchmark first: 20 SSL passes on its BadNets and Blended seed-0 models, with the EMA (default) and without
    dir="$RUNS/ssl-passes"; src="$RUNS/benchmark"; CELLS=4
    for r in badnets-s0 blended-s0; do
      for ema in 0.999 0; do
        cell "$dir/$r/ema$ema" ftt.py --dataset cifar10 --data-root "${DATA_ROOT:-./data}" --arch wrn16-1 --attack "${r%-s0}" \
          --seed 0 --model "$src/$r/ftt/backdoored.pt" --ssl-epochs 20 --ema "$ema" --eval-every 1 --quiet "$@"
      done
    done
    table "20 SSL passes, EMA 0.999 and none" "$dir"/*/*/results.json | tee "$dir/table.md"
    plot_logs "$dir/ssl-passes.png" "ACC and ASR against SSL passes (CIFAR-10, WRN-16-1)" "$dir"/*/*/log.jsonl ;;
  sad-schedule)
    dir="$RUNS/sad-schedule"; src=${SRC:-$RUNS/benchmark}; rows=${ROWS:-$(ls "$src")}; CELLS=$((2 * $(echo ${SCHEDULES:-nad cosine} | wc -w) * $(echo $rows | wc -w)))
    for r in $rows; do
      flags=(--dataset cifar10 --data-root "${DATA_ROOT:-./data}" --arch wrn16-1 --attack "${r%-s*}" --seed "${r##*-s}"
             --model "$src/$r/ftt/backdoored.pt" --quiet)
      for sch in ${SCHEDULES:-nad cosine}; do  # nad: FTT with SSL (its SAD column is FTT(SAD)); cosine: SAD only
        if [ "$sch" = nad ]; then cell "$dir/$r/ftt-nad" ftt.py "${flags[@]}" --sad-schedule nad "$@"
        else cell "$dir/$r/sad-$sch" ftt.py "${flags[@]}" --sad-schedule "$sch" --ssl-epochs 0 "$@"; fi
        cell "$dir/$r/ft-$sch" baselines.py --method ft "${flags[@]}" --sad-schedule "$sch" "$@"
      done
    done
    python3 - "$dir" <<'PY' | tee "$dir/table.md"
import json, os, sys
d = sys.argv[1]
cols = [("sad-cosine", "sad", "FTT(SAD) cosine"), ("ft-cosine", "after", "FT cosine"), ("ftt-nad", "sad", "FTT(SAD) nad"),
        ("ft-nad", "after", "FT nad"), ("ftt-nad", "ssl", "FTT(SAD+SSL) nad")]
print("\nASR / ACC in %, CIFAR-10 / WRN-16-1, 20 SAD or FT epochs at lr 0.1\n")
print("| row | before | " + " | ".join(c[2] for c in cols) + " |\n|---" * (len(cols) + 2) + "|")
for r in sorted(os.listdir(d)):
    if not os.path.isdir(os.path.join(d, r)):
        continue
    def cell(m, key):
        p = os.path.join(d, r, m, "results.json")
        if not os.path.exists(p):
            return "-", None
        v = json.load(open(p))["results"]
        return f"{v[key]['asr']:.2f} / {v[key]['acc']:.2f}", v["before"]
    got = [cell(m, k) for m, k, _ in cols]
    before = next((b for _, b in got if b), None)
    print(f"| {r} | " + (f"{before['asr']:.2f} / {before['acc']:.2f}" if before else "-") + " | "
          + " | ".join(g for g, _ in got) + " |")
PY
    ;;
  stage2)
    # issue 22: stage 2 variants on development models, chosen on the defender's data: ACC on held-out clean images
    # (with TRAIN_SIZE: --holdout-unseen UNSEEN, 2000 training images past TRAIN_SIZE that the attacker never saw;
    # without: --holdout 0.2, 500 of the 2,500 clean images, which the attacker trained on); the pool check speaks
    # for the backdoor. ROWS (badnets-s0), PASSES (SSL passes, 2), VARIANTS (names below; paper: the paper's stage 2),
    # BASELINES (e.g. "ft nad"), TRAIN_SIZE (0: all 50,000;
    # on 2 cores 20000 keeps a variant near 6 minutes). The attacker: benchmark's recipe, or benchmark's own model.
    size=${TRAIN_SIZE:-0}; dir="$RUNS/stage2$([ "$size" = 0 ] || echo "-n$size")"; rows=${ROWS:-badnets-s0}; passes=${PASSES:-2}
    hold=(--holdout 0.2); tag=""
    if [ "$size" != 0 ]; then hold=(--holdout-unseen "${UNSEEN:-2000}"); tag="-u${UNSEEN:-2000}"; fi
    declare -A how=([split]="--ssl-forward split --teacher none" [one]="--ssl-forward one --teacher none"
      [fixmatch]="--ssl-forward one --ssl-bn-momentum 0.001 --no-ssl-decay-all --teacher none"
      [fixmatch-teacher]="--ssl-forward one --ssl-bn-momentum 0.001 --no-ssl-decay-all --teacher soft"
      [one-teacher]="--ssl-forward one --teacher soft --suspect-draws 1"
      [two-teacher]="--ssl-forward two --teacher soft --suspect-draws 1" [deep]="" [paper]="$PAPER_SSL")
    variants=${VARIANTS:-split one fixmatch fixmatch-teacher}
    CELLS=$(( ($(echo $variants ${BASELINES:-} | wc -w) + 1) * $(echo $rows | wc -w) ))
    for r in $rows; do  # a row ATTACK-sSEED; ATTACK+aug-sSEED: an attacker with crop + flip, cosine, AUG_EPOCHS (40)
      a=${r%-s*}; recipe=(--attack-epochs 25 --attack-lr 0.1 --attack-schedule step --no-attack-augment)
      [[ $a == *+aug ]] && recipe=(--attack-epochs "${AUG_EPOCHS:-40}" --attack-lr 0.1 --attack-schedule cosine
                                   --attack-augment)
      flags=(--dataset cifar10 --data-root "${DATA_ROOT:-./data}" --arch wrn16-1 --attack "${a%+aug}" --seed "${r##*-s}"
             --train-size "$size")
      model="$RUNS/benchmark/$r/ftt/backdoored.pt"
      if [ ! -f "$model" ] || [ "$size" != 0 ]; then
        model="$dir/$r/attacker/backdoored.pt"
        cell "$dir/$r/attacker" ftt.py "${flags[@]}" "${recipe[@]}" --sad-epochs 0 --ssl-epochs 0 --quiet
      fi
      for v in $variants; do  # one-teacher or deep, then any of -deep -teacherW -unlearnW -gateP -stamp(pool)R -drawN
        if [[ $v == one-teacher-* || $v == deep-* ]]; then  # deep-unlearn3-gate0 = defaults; -prior -epochkept -readmit-KIND
          o=${how[one-teacher]}; [[ $v == deep-* ]] && o=""
          [[ $v =~ -teacher([0-9.]+) ]] && o+=" --teacher-weight ${BASH_REMATCH[1]}"
          [[ $v == *-unlearn* ]] && { w=${v##*-unlearn}; o+=" --unlearn ${w%%-*}"; }  # always, unless -gateP:
          [[ $v =~ -gate(-?[0-9.]+) ]] && o+=" --unlearn-residue ${BASH_REMATCH[1]}"  # only over SAD's excess P
          [[ $v =~ -stamp([0-9.]+) ]] && o+=" --stamp ${BASH_REMATCH[1]}"  # a patch read back, on labelled images
          [[ $v =~ -stamppool([0-9.]+) ]] && o+=" --stamp-pool ${BASH_REMATCH[1]}"  # and on the pool's strong views
          [[ $v == *-draw* ]] && { d=${v##*-draw}; o+=" --suspect-draws ${d%%-*}"; }
          [[ $v == *-prior* ]] && o+=" --prior-shift"
          [[ $v == *-epochkept* ]] && o+=" --ssl-epoch kept"  # stage 2's steps: the pool's size before the joins
          [[ $v == *-readmit-* ]] && o+=" --readmit ${v##*-readmit-} --readmit-residue 100"; how[$v]=$o  # (no gate)
        fi
        exits="--ssl-exits all"; [[ $v == *deep* ]] && exits="--ssl-exits deep"  # variants before -deep: every exit
        cell "$dir/$r/$v-p$passes$tag" ftt.py "${flags[@]}" --model "$model" "${hold[@]}" --ssl-epochs "$passes" $exits \
          --unlearn 0 --unlearn-residue -100 --readmit none --stamp 0 --stamp-pool 0 --ssl-epoch joined ${how[$v]} \
          --bn-diagnostic --quiet "$@"  # own last
      done
      for b in ${BASELINES:-}; do  # e.g. "ft nad": the paper's claim (a) beside FTT(SAD), at their defaults
        cell "$dir/$r/$b" baselines.py --method "$b" "${flags[@]}" --model "$model" --quiet "$@"
      done
    done
    python3 - "$dir"/*/*-p*/results.json <<'PY' | tee "$dir/table.md"
import json, sys
print("\nStage 2 variants (./reproduce.sh stage2). Defender side: ACC on the held-out clean images (--holdout-unseen or --holdout), the pool's "
      "excess in the suspect class (points). Test side, not used to choose: ACC / ASR.\n")
print("| run | held-out ACC before / SAD / SSL | the suspect class's alone, before / SSL | pool excess SAD / SSL | "
      "net excess before / SAD / SSL | test ACC / ASR after SSL | BN from pool: test ACC before / SSL | minutes |\n"
      "|---|---|---|---|---|---|---|---|")
for f in sys.argv[1:]:
    r = json.load(open(f)); m = r["results"]; g = lambda s, k: m.get(s, {}).get(k)
    f2 = lambda v: "-" if v is None else f"{v:.2f}"
    print(f"| {'/'.join(f.split('/')[-3:-1])} | {f2(g('before', 'acc_held_out'))} / {f2(g('sad', 'acc_held_out'))} / "
          f"{f2(g('ssl', 'acc_held_out'))} | {f2(g('before', 'acc_held_out_suspect'))} / {f2(g('ssl', 'acc_held_out_suspect'))} | "
          f"{f2((g('sad', 'pool') or {}).get('suspect_pp'))} / {f2((g('ssl', 'pool') or {}).get('suspect_pp'))} | "
          f"{' / '.join(f2(g(s, 'pool_net_pp')) for s in ('before', 'sad', 'ssl'))} | "
          f"{f2(g('ssl', 'acc'))} / {f2(g('ssl', 'asr'))} | {f2((g('before', 'bn_pool') or {}).get('acc'))} / "
          f"{f2((g('ssl', 'bn_pool') or {}).get('acc'))} | {r['timings']['total_s'] / 60:.1f} |")
PY
    ;;
  pool-trajectory)
    # issue 22: the pool check after every SAD epoch (no stopping), on stage2's development models, to choose
    # --sad-early-check on defender data: does a check part of the way agree with the check at the end?
    # ROWS (badnets-s0 blended-s0), LRS (0.01 0.03), TRAIN_SIZE (20000; stage2 trains the attackers).
    size=${TRAIN_SIZE:-20000}; dir="$RUNS/stage2-n$size"
    for r in ${ROWS:-badnets-s0 blended-s0}; do
      for lr in ${LRS:-0.01 0.03}; do
        [ -f "$dir/$r/pool-trajectory-lr$lr.json" ] && continue
        python3 - "$dir/$r/pool-trajectory-lr$lr.json" --dataset cifar10 --data-root "${DATA_ROOT:-./data}" --arch wrn16-1 \
          --attack "${r%-s*}" --seed "${r##*-s}" --train-size "$size" --model "$dir/$r/attacker/backdoored.pt" \
          --sad-lr "$lr" --quiet --out "$dir/$r/pool-trajectory" --overwrite "$@" <<'PY'
import json, sys
import torch
import ftt
from attacker import make_trigger
from harness import RunLog
from loading import prepare
p = prepare(ftt.parse_args(sys.argv[2:]), ftt.build_backbone, make_trigger)
cfg, dev, k = p["cfg"], p["device"], p["num_classes"]
x_l, y_l, x_u = p["x_l"].to(dev), p["y_l"].to(dev), p["x_u"].to(dev)
check = ftt.PoolCheck(p["model"], x_u, y_l, k, cfg, dev)
layout = torch.channels_last if cfg.channels_last else torch.preserve_format
net = ftt.Branched(p["model"], tuple(x_l.shape[1:]), k).to(dev, memory_format=layout)
rows = []
def every_epoch(e):  # never stops: records what --sad-early-check would see after epoch e
    part = {}
    rows.append({"epoch": e, "survived": check.after(f"epoch {e}", net.backbone, part), **part["pool"]})
ftt.stage1_sad(net, x_l, y_l, cfg, dev, RunLog(quiet=True), None, every_epoch)
part = {}
rows.append({"epoch": cfg.sad_epochs, "survived": check.after("the end", net.backbone, part), **part["pool"]})
json.dump({"lr": cfg.sad_lr, "before": ftt.pool_report(check.excess), "fails_above_pp": 100 * ftt.POOL_KEEP *
           float(check.excess[check.suspect]), "rows": rows}, open(sys.argv[1], "w"), indent=1)
PY
      done
    done
    python3 - "$dir"/*/pool-trajectory-lr*.json <<'PY'
import json, sys
runs = {"/".join(f.split("/")[-2:])[:-5]: json.load(open(f)) for f in sys.argv[1:]}
print("\nThe pool check after each SAD epoch (./reproduce.sh pool-trajectory): the suspect class's excess (points); "
      "* = the check fails (the backdoor survived)\n")
print("| epoch | " + " | ".join(f"{n} (fails above {r['fails_above_pp']:.2f})" for n, r in runs.items()) + " |")
print("|---" * (len(runs) + 1) + "|")
for i in range(len(next(iter(runs.values()))["rows"])):
    cells = [runs[n]["rows"][i] for n in runs]
    print(f"| {cells[0]['epoch']} | " + " | ".join(f"{c['suspect_pp']:.2f}{' *' if c['survived'] else ''}" for c in cells) + " |")
PY
    ;;
  third-party-table)
    # issue 22: released backdoored WRN-16-1 models (THIRD_PARTY: the folder of their README, needed), each
    # purified by FTT at its defaults and by FT and NAD at theirs, with the trigger, target, poison rate and
    # normalisation their README gives; the floor: NAD's clean WRN-16-1 on the same trigger. MODELS: which rows.
    [ -n "${THIRD_PARTY:-}" ] || { echo "THIRD_PARTY=DIR: the folder holding the released models and triggers/"; exit 2; }
    dir="$RUNS/third-party-table"; tp=$THIRD_PARTY; trig="$tp/triggers"
    c10=0.4914,0.4822,0.4465,0.2023,0.1994,0.2010  # MEDIC adaptive_2's normalisation
    declare -A spec=(  # file | trigger | target | poison rate | --normalize
      [nad]="nad_wrn16-1_grid_t5.pt|grid_br.png|5|0.1|" [abl]="abl_wrn16-1_grid_t0.tar|grid_br.png|0|0.1|"
      [argd]="argd_wrn16-1_centergrid_t0.pth.tar|grid_center.png|0|0.2|"
      [medic-badnet]="medic_badnet_wrn16-1_grid_t5.pth.tar|grid_br.png|5|0.1|"
      [medic-adaptive2]="medic_adaptive2_wrn16-1_t0.pth.tar|adaptive2_topleft.png|0|0.05|$c10")
    # METHODS: which cells of each row, in this order (e.g. "floor ft nad" first, the long ftt cells later);
    # FTT_CELL: the ftt cell's folder (ftt), e.g. FTT_CELL=ftt-draws3 with --suspect-draws 3 after the target
    models=${MODELS:-nad abl argd medic-badnet medic-adaptive2}; methods=${METHODS:-floor ftt ft nad}
    CELLS=$(($(echo $methods | wc -w) * $(echo $models | wc -w)))
    for m in $models; do
      IFS='|' read -r file png target rate norm <<< "${spec[$m]}"
      flags=(--dataset cifar10 --data-root "${DATA_ROOT:-./data}" --arch wrn16-1 --attack patch --trigger "$trig/$png"
             --target "$target" --poison-rate "$rate" --quiet)
      given=(--model "$tp/$file"); [ -n "$norm" ] && given+=(--normalize "$norm")
      for c in $methods; do
        case $c in
          floor) cell "$dir/$m/floor" ftt.py "${flags[@]}" --model "$tp/nad_wrn16-1_clean.pth.tar" --sad-epochs 0 --ssl-epochs 0 ;;
          ftt) cell "$dir/$m/${FTT_CELL:-ftt}" ftt.py "${flags[@]}" "${given[@]}" "$@" ;;
          ft|nad) cell "$dir/$m/$c" baselines.py --method "$c" "${flags[@]}" "${given[@]}" "$@" ;;
        esac
      done
    done
    python3 - "$dir" "${FTT_CELL:-ftt}" $models <<'PY' | tee "$dir/table${FTT_CELL:+-$FTT_CELL}.md"
import json, os, sys
d, ftt_cell, models = sys.argv[1], sys.argv[2], sys.argv[3:]
def get(m, cell):
    p = os.path.join(d, m, cell, "results.json")
    return json.load(open(p)) if os.path.exists(p) else None
f = lambda r: "-" if r is None or r.get("acc") is None else f"{r['acc']:.2f} / {r['asr']:.2f}"
mins = lambda j: "" if j is None else f" ({j['timings']['total_s'] / 60:.0f} min)"
print("\nThird-party models (./reproduce.sh third-party-table): ACC on the 10,000 test images / ASR, in %; minutes\n")
patch = lambda j: (lambda p: "-" if not p.get("pixels") else " / ".join(f"{v:.2f}" for v in p["to_suspect"].values())
                   + f" ({len(p['pixels'])} px)")(j["results"].get("patch") or {}) if j else "-"
print("| model | before | FT | NAD (ours) | FTT (SAD) | FTT (SAD+SSL) | floor (clean model's ASR) | FTT's patch read back: "
      "ASR before / SAD / SSL |\n|---|---|---|---|---|---|---|---|")
for m in models:
    ftt, ft, nad, floor = (get(m, c) for c in (ftt_cell, "ft", "nad", "floor"))
    before = (ftt or ft or nad or {}).get("results", {}).get("before")
    after = lambda j: None if j is None else j["results"].get("after")
    print(f"| {m} | {f(before)} | {f(after(ft))}{mins(ft)} | {f(after(nad))}{mins(nad)} | "
          f"{f(ftt['results'].get('sad')) if ftt else '-'} | {f(ftt['results'].get('ssl')) if ftt else '-'}{mins(ftt)} | "
          f"{'-' if floor is None else format(floor['results']['before']['asr'], '.2f')} | {patch(ftt)} |")
PY
    ;;
  third-party-before)
    # issue 23: each released model through --model exactly as a user gives it (its trigger PNG, target,
    # normalisation), no stage run (--sad-epochs 0 --ssl-epochs 0): ACC on the 10,000 test images and ASR,
    # beside what THIRD_PARTY's README lists as read. Warp, reflection and composite: no patch trigger, ACC only.
    [ -n "${THIRD_PARTY:-}" ] || { echo "THIRD_PARTY=DIR: the folder holding the released models and triggers/"; exit 2; }
    dir="$RUNS/third-party-before"; tp=$THIRD_PARTY; trig="$tp/triggers"
    c10=0.4914,0.4822,0.4465,0.2023,0.1994,0.2010
    declare -A spec=(  # file | trigger (none: --attack none) | target | --normalize | README's ACC / ASR
      [nad]="nad_wrn16-1_grid_t5.pt|grid_br.png|5||84.80 / 100.00" [abl]="abl_wrn16-1_grid_t0.tar|grid_br.png|0||83.36 / 99.99"
      [argd]="argd_wrn16-1_centergrid_t0.pth.tar|grid_center.png|0||81.36 / 99.91"
      [medic-badnet]="medic_badnet_wrn16-1_grid_t5.pth.tar|grid_br.png|5||88.93 / 99.96"
      [medic-cleanlabel]="medic_cleanlabel_wrn16-1_grid_t5.pth.tar|grid_br.png|5||88.48 / 100.00"
      [medic-sig]="medic_sig_wrn16-1_t5.pth.tar|sig_blend02.png|5||86.92 / 94.51"
      [medic-adaptive2]="medic_adaptive2_wrn16-1_t0.pth.tar|adaptive2_topleft.png|0|$c10|85.91 / 98.60"
      [medic-warp]="medic_warp_wrn16-1_t0.pth.tar|none|0||86.21 / - (claimed)" [medic-reflection]="medic_reflection_wrn16-1_t5.pth.tar|none|5||84.29 / - (claimed)"
      [medic-composite]="medic_composite_wrn16-1_t2.pth|none|2||79.3 / - (claimed)" [nad-clean]="nad_wrn16-1_clean.pth.tar|grid_br.png|5||84.39 / 2.80")
    models=${MODELS:-nad abl argd medic-badnet medic-cleanlabel medic-sig medic-adaptive2 medic-warp medic-reflection medic-composite nad-clean}
    CELLS=$(echo $models | wc -w)
    for m in $models; do
      IFS='|' read -r file png target norm _ <<< "${spec[$m]}"
      flags=(--dataset cifar10 --data-root "${DATA_ROOT:-./data}" --arch wrn16-1 --model "$tp/$file" --target "$target"
             --sad-epochs 0 --ssl-epochs 0 --quiet)
      if [ "$png" = none ]; then flags+=(--attack none); else flags+=(--attack patch --trigger "$trig/$png"); fi
      [ -n "$norm" ] && flags+=(--normalize "$norm")
      cell "$dir/$m" ftt.py "${flags[@]}" "$@"
    done
    # I-BAU's small VGG is no WRN: the one line --model gives for it
    vgg=$(python3 ftt.py --dataset cifar10 --data-root "${DATA_ROOT:-./data}" --arch wrn16-1 --attack none \
          --model "$tp/ibau_badnets_smallvgg_t8.pth" --out "$dir/ibau" 2>&1 >/dev/null | tail -1 || true)
    python3 - "$dir" "$vgg" $models <<PY | tee "$dir/table.md"
import json, os, sys
d, vgg, models = sys.argv[1], sys.argv[2], sys.argv[3:]
readme = {$(for m in $models; do IFS='|' read -r _ _ _ _ want <<< "${spec[$m]}"; printf '"%s": "%s", ' "$m" "$want"; done)}
print("\nThird-party models before any defence (./reproduce.sh third-party-before): ACC on the 10,000 test images / "
      "ASR on the triggered non-target ones, in %\n")
print("| model | read here | its README | seconds |\n|---|---|---|---|")
for m in models:
    p = os.path.join(d, m, "results.json")
    if not os.path.exists(p):
        print(f"| {m} | not run | {readme[m]} | |"); continue
    r = json.load(open(p)); b = r["results"]["before"]
    asr = "-" if b.get("asr") is None else f"{b['asr']:.2f}"
    print(f"| {m} | {b['acc']:.2f} / {asr} | {readme[m]} | {r['timings']['total_s']:.0f} |")
print(f"\nI-BAU's small VGG through --arch wrn16-1: {vgg}")
PY
    ;;
  third-party)
    d="$RUNS/third-party"; data=(--dataset cifar10 --data-root "${DATA_ROOT:-./data}" --arch wrn16-1)
    mkdir -p "$d"
    # 1. the attacker's side: a 3x3 black-and-white grid as an RGBA PNG, a WRN-16-1 backdoored with it the way
    #    published code trains (25 epochs, lr 0.1 with step decay, no augmentation, CIFAR-normalised inputs) ...
    python3 -c "import attacks, sys; attacks.write_trigger_png(attacks.checkerboard_rgba(3, 32, 32), sys.argv[1])" "$d/grid.png"
    [ -f "$d/attacker/backdoored.pt" ] || python3 ftt.py "${data[@]}" --attack patch --trigger "$d/grid.png" \
      --normalize cifar10 --attack-epochs 25 --attack-lr 0.1 --attack-schedule step --no-attack-augment \
      --sad-epochs 0 --ssl-epochs 0 --quiet --overwrite --out "$d/attacker"
    # ... and saved in WideResNet-pytorch's layout, the way a DataParallel training script saves it
    python3 - "$d" <<'PY'
import sys, torch, ftt, loading
d = sys.argv[1]
m = ftt.build_backbone("wrn16-1", 3, 10)
m.load_state_dict(torch.load(f"{d}/attacker/backdoored.pt", weights_only=True))
state = {"module." + k: v for k, v in loading.export_layout(m, "wideresnet-pytorch").items()}
torch.save({"epoch": 25, "state_dict": state}, f"{d}/wrn16-1-grid.pt")
print(f"wrote {d}/wrn16-1-grid.pt: {len(state)} tensors, first keys {list(state)[:3]}")
PY
    # 2. the defender's side: one command
    python3 ftt.py "${data[@]}" --model "$d/wrn16-1-grid.pt" --normalize cifar10 --attack patch \
      --trigger "$d/grid.png" --overwrite --out "$d/ftt" "$@" 2>&1 | tee "$d/ftt.log" ;;
  cifar10-subset)
    python3 - "${DATA_ROOT:-./data}" "$@" <<'PY'
import pickle, sys
from pathlib import Path
src, dst = Path(sys.argv[1]) / "cifar-10-batches-py", Path(sys.argv[2]) / "cifar-10-batches-py"
n_train, n_test = (int(v) for v in (sys.argv[3:5] if len(sys.argv) > 3 else (10000, 4000)))
dst.mkdir(parents=True, exist_ok=True)
for name, n in [(f"data_batch_{i}", n_train // 5) for i in range(1, 6)] + [("test_batch", n_test)]:
    with open(src / name, "rb") as fh:
        d = pickle.load(fh, encoding="latin1")
    with open(dst / name, "wb") as fh:
        pickle.dump({"data": d["data"][:n], "labels": list(d["labels"][:n])}, fh)
print(f"wrote {dst}: {n_train // 5 * 5} training images, {n_test} test images")
PY
    ;;
  *)
    sed -n '2,30p' "$0"; exit 2 ;;
esac
