#!/usr/bin/env bash
# Reproduce the figures of README.md. Usage: ./reproduce.sh NAME [extra ftt.py flags]
#   paper     the paper's Table 1 setting for one attack (CIFAR-10, PreActResNet-18; wants a GPU)
#   offline   FTT on Fashion-MNIST / WRN-16-1 on 2 CPU cores, F_D detached and not (README table)
#   attacks   every attack's backdoored model on Fashion-MNIST: ACC, ASR, trigger PSNR
#   attacks-cifar10  the same on CIFAR-10, read from DATA_ROOT/cifar-10-batches-py
#   handed    purify a model you were handed on your own image folders (README walk-through; made here)
set -euo pipefail
cd "$(dirname "$0")"
name=${1:-}; shift || true
RUNS=${RUNS:-runs}

table() {  # table TITLE JSON... : a Markdown table of ACC / ASR / PSNR per results JSON
  python3 - "$@" <<'PY'
import json, sys
title, files = sys.argv[1], sys.argv[2:]
print(f"\n{title}\n\n| run | attack | ASR before | ACC before | ASR SAD | ACC SAD | ASR SAD+SSL | ACC SAD+SSL | PSNR dB | minutes |")
print("|---|---|---|---|---|---|---|---|---|---|")
for f in files:
    r = json.load(open(f)); m = r["results"]; c = r["config"]
    print(f"| {f.split('/')[-2]} | {c['attack']} | {m['before']['asr']:.2f} | {m['before']['acc']:.2f} | "
          f"{m['sad']['asr']:.2f} | {m['sad']['acc']:.2f} | {m['ssl']['asr']:.2f} | {m['ssl']['acc']:.2f} | "
          f"{r['trigger']['psnr_db']:.1f} | {r['timings']['total_s'] / 60:.1f} |")
PY
}

case "$name" in
  paper)
    python3 ftt.py --out "$RUNS/paper" "$@" ;;
  offline)
    # smallest sensible budget on 2 cores: full Fashion-MNIST, WRN-16-1, 3 attacker epochs
    common=(--dataset fashion-mnist --arch wrn16-1 --attack badnets --attack-epochs 3 --attack-lr 0.05
            --no-attack-augment --sad-epochs 10 --sad-lr 0.05 --ssl-epochs 2 "$@")
    python3 ftt.py "${common[@]}" --detach-deep --out "$RUNS/offline-detach"
    python3 ftt.py "${common[@]}" --no-detach-deep --model "$RUNS/offline-detach/backdoored.pt" --out "$RUNS/offline-mutual"
    table "FTT, Fashion-MNIST, WRN-16-1 (./reproduce.sh offline)" "$RUNS"/offline-{detach,mutual}/results.json ;;
  attacks|attacks-cifar10)
    # backdoored models only (no defence): ACC, ASR and trigger PSNR per attack
    budget=(--arch wrn16-1 --train-size 20000 --test-size 2000 --attack-epochs 5 --attack-lr 0.05 --no-attack-augment
            --reference-epochs 3 --sad-epochs 0 --ssl-epochs 0 --overwrite)
    if [ "$name" = attacks ]; then data=(--dataset fashion-mnist); tag=fmnist
    else data=(--dataset cifar10 --data-root "${DATA_ROOT:?set DATA_ROOT to a folder holding cifar-10-batches-py}"); tag=cifar10; fi
    files=()
    for a in badnets trojan blended low-frequency wanet atteq-nn; do
      python3 ftt.py "${data[@]}" --attack "$a" "${budget[@]}" "$@" --out "$RUNS/attacks-$tag-$a"
      files+=("$RUNS/attacks-$tag-$a/results.json")
    done
    table "Backdoored models (./reproduce.sh $name): only the 'before' columns are meaningful" "${files[@]}" ;;
  handed)
    # 1. someone hands you a backdoored model (here: trained by the attacker's code on Fashion-MNIST)
    d="$RUNS/handed"
    python3 ftt.py --dataset fashion-mnist --arch wrn16-1 --train-size 20000 --attack badnets --attack-epochs 3 \
      --attack-lr 0.05 --no-attack-augment --sad-epochs 0 --ssl-epochs 0 --overwrite --out "$d/attacker"
    # 2. your images as ImageFolder trees: 1,000 clean labelled, 10,000 unlabelled, 2,000 test (none seen by the attacker)
    python3 - "$d" <<'PY'
import sys, ftt
d = sys.argv[1]
(x, y), (xt, yt) = (ftt.load_dataset("fashion-mnist", "./data")[s] for s in ("train", "test"))
ftt.export_image_folder(x[40000:41000], y[40000:41000], f"{d}/clean", 10)
ftt.export_image_folder(x[41000:51000], y[41000:51000] * 0, f"{d}/unlabelled", 10)  # labels not used
ftt.export_image_folder(xt[:2000], yt[:2000], f"{d}/test", 10)
PY
    # 3. purify it: ACC on your test images, ASR with the BadNets trigger you suspect
    python3 ftt.py --model "$d/attacker/backdoored.pt" --arch wrn16-1 --clean-dir "$d/clean" \
      --unlabeled-dir "$d/unlabelled" --test-dir "$d/test" --attack badnets --sad-epochs 10 --sad-lr 0.05 \
      --ssl-epochs 2 --overwrite --out "$d/purified" "$@" ;;
  *)
    sed -n '2,9p' "$0"; exit 2 ;;
esac
