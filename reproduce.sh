#!/usr/bin/env bash
# Reproduce the figures of README.md. Usage: ./reproduce.sh NAME [extra ftt.py flags]
#   paper     the paper's Table 1 setting for one attack (CIFAR-10, PreActResNet-18; wants a GPU)
#   offline   FTT on Fashion-MNIST / WRN-16-1 on 2 CPU cores, F_D detached and not (README table)
#   attacks   every attack's backdoored model on Fashion-MNIST: ACC, ASR, trigger PSNR
#   attacks-cifar10  the same on CIFAR-10, read from DATA_ROOT/cifar-10-batches-py
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
  *)
    sed -n '2,8p' "$0"; exit 2 ;;
esac
