#!/usr/bin/env bash
# Reproduce the figures of README.md. Usage: ./reproduce.sh NAME [extra ftt.py flags]
#   paper     the paper's Table 1 setting for one attack (CIFAR-10, PreActResNet-18; wants a GPU)
#   offline   FTT on Fashion-MNIST / WRN-16-1 on 2 CPU cores, F_D detached and not (README table)
#   attacks   every attack's backdoored model: ACC, ASR, trigger PSNR (README per-attack table)
#             on Fashion-MNIST; with DATA_ROOT holding cifar-10-batches-py/, on CIFAR-10 as well
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
  attacks)
    budget=(--arch wrn16-1 --attack-epochs 5 --attack-lr 0.05 --no-attack-augment --reference-epochs 3
            --sad-epochs 0 --ssl-epochs 0 "$@")
    files=()
    for a in badnets trojan blended low-frequency wanet atteq-nn; do
      python3 ftt.py --dataset fashion-mnist --train-size 20000 --attack "$a" "${budget[@]}" --out "$RUNS/attacks-fmnist-$a"
      files+=("$RUNS/attacks-fmnist-$a/results.json")
    done
    if [ -n "${DATA_ROOT:-}" ]; then
      for a in badnets trojan blended low-frequency wanet atteq-nn; do
        python3 ftt.py --dataset cifar10 --data-root "$DATA_ROOT" --train-size 20000 --attack "$a" "${budget[@]}" \
          --out "$RUNS/attacks-cifar10-$a"
        files+=("$RUNS/attacks-cifar10-$a/results.json")
      done
    fi
    table "Backdoored models (./reproduce.sh attacks): only the 'before' columns are meaningful" "${files[@]}" ;;
  *)
    sed -n '2,8p' "$0"; exit 2 ;;
esac
