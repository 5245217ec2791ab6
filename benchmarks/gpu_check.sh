#!/usr/bin/env bash
# GPU check (issue 24): the paths a GPU user takes, each in bf16-mixed and 32-true, with wall times
# and the explain/* scalars. Never run in CI. About 8 minutes at most on one GPU.
#
#   bash benchmarks/gpu_check.sh            # on a CUDA machine (DDP with 2 devices when it has ≥ 2 GPUs)
#   bash benchmarks/gpu_check.sh --cpu      # tiny settings on the CPU: proves the script end to end
#   OUT=/path bash benchmarks/gpu_check.sh  # where the runs go (default: a fresh temporary directory)
#
# Per precision: 1) train.py, 2 epochs with the ExplanationMonitor (CSV logger); 2) audit.py
# audit=evaluate on that checkpoint; 3) audit.py audit=roar, one masked cell (the random control at
# 50 %) next to the always-run baseline; 4) with 2 GPUs, train.py and audit.py under trainer=ddp
# devices=2 (with --cpu: trainer=ddp_sim, 2 CPU processes).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CPU=0
for arg in "$@"; do
  case "$arg" in
    --cpu) CPU=1 ;;
    -h|--help) sed -n '2,12p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "unknown argument: $arg (use --cpu or nothing)" >&2; exit 2 ;;
  esac
done

OUT="${OUT:-$(mktemp -d -t xaudit_gpu_check.XXXXXX)}"
mkdir -p "$OUT"
export WANDB_MODE=offline WANDB_SILENT=true
STEP_TIMEOUT="${STEP_TIMEOUT:-300}"   # seconds per step: a hung step fails the check, not the machine

if [[ $CPU == 1 ]]; then
  TRAINER=(trainer=cpu)
  DDP=(trainer=ddp_sim)
  DATA=(data.n_train=640 data.n_val=128 data.n_test=128 data.batch_size=64)
  MODEL=(model=small_cnn model.backbone.width=8)
  MONITOR=(callbacks.explanation_monitor.num_samples=8 callbacks.explanation_monitor.steps=8)
  EVAL=(evaluate.limit=64 explainer=[grad_cam,saliency])
  ROAR_EPOCHS=1
  NDEV=2   # ddp_sim: two CPU processes
else
  command -v nvidia-smi >/dev/null || { echo "no nvidia-smi: run on a GPU machine, or pass --cpu" >&2; exit 1; }
  TRAINER=(trainer=gpu)
  DDP=(trainer=ddp trainer.devices=2)
  DATA=()   # the shapes defaults: 4000 train, 500 val, 1000 test images, 32 px
  MODEL=(model=resnet18)   # cifar_stem=auto → the CIFAR stem at 32 px; channels_last=auto → on
  MONITOR=()
  EVAL=(evaluate.limit=512 explainer=[grad_cam,saliency])
  ROAR_EPOCHS=2
  NDEV=$(nvidia-smi -L | wc -l)
  nvidia-smi -L
fi
COMMON=(trainer.enable_progress_bar=false trainer.enable_model_summary=false logger=csv "paths.log_dir=$OUT/logs")

echo "xaudit GPU check: $( [[ $CPU == 1 ]] && echo "--cpu (tiny)" || echo "GPU" ), out: $OUT"
python - <<'EOF'
import os, torch, pytorch_lightning as pl
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
print(f"torch {torch.__version__}, lightning {pl.__version__}, GPU: {gpu}, CPUs: {len(os.sched_getaffinity(0))}")
EOF

SUMMARY=()
timed() {  # timed <label> <command...>: run it, print and record its wall time; keep its log
  local label=$1; shift
  local log="$OUT/$label.log" start end
  start=$(date +%s.%N)
  if ! timeout "$STEP_TIMEOUT" "$@" >"$log" 2>&1; then
    echo "FAILED: $label (log: $log)" >&2; tail -30 "$log" >&2; exit 1
  fi
  end=$(date +%s.%N)
  local secs; secs=$(python -c "print(f'{$end - $start:.1f}')")
  echo "[$label] ${secs} s"
  SUMMARY+=("$label ${secs}s")
}

explain_scalars() {  # the last epoch's explain/* scalars (and val/acc) of a run's metrics.csv
  python - "$1/csv/metrics.csv" <<'EOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1], newline="")))
keys = sorted(k for k in rows[0] if k.startswith("explain/"))
last = [r for r in rows if any(r.get(k) for k in keys)][-1]
val = [r["val/acc"] for r in rows if r.get("val/acc")]
print(f"  epoch {last['epoch']}, val/acc {float(val[-1]):.4f}")
for k in keys:
    if last.get(k):
        print(f"  {k:40s} {float(last[k]):.4f}")
EOF
}

results_table() {  # an audit mode's results.csv, as it is
  echo "  $(head -1 "$1/results.csv")"
  tail -n +2 "$1/results.csv" | sed 's/^/  /'
}

for PREC in bf16-mixed 32-true; do
  echo "== precision $PREC"
  RUN="$OUT/train_$PREC"
  timed "train_$PREC" python "$ROOT/train.py" "${TRAINER[@]}" "trainer.precision=$PREC" trainer.max_epochs=2 \
    "${DATA[@]}" "${MODEL[@]}" "${MONITOR[@]}" "${COMMON[@]}" "hydra.run.dir=$RUN"
  explain_scalars "$RUN"
  CKPT="$RUN/checkpoints/last.ckpt"

  timed "evaluate_$PREC" python "$ROOT/audit.py" audit=evaluate "ckpt_path=$CKPT" "${TRAINER[@]}" \
    "trainer.precision=$PREC" "${EVAL[@]}" "${COMMON[@]}" "out_dir=$OUT/audit_$PREC" \
    "hydra.run.dir=$OUT/audit_run_$PREC"
  results_table "$OUT/audit_$PREC/evaluate"

  timed "roar_cell_$PREC" python "$ROOT/audit.py" audit=roar "ckpt_path=$CKPT" "${TRAINER[@]}" \
    "trainer.precision=$PREC" "explainer=[]" "controls=[random]" "roar.fractions=[0.5]" \
    "roar.epochs=$ROAR_EPOCHS" "${COMMON[@]}" "out_dir=$OUT/roar_$PREC" "hydra.run.dir=$OUT/roar_run_$PREC"
  results_table "$OUT/roar_$PREC/roar"

  if [[ $NDEV -ge 2 ]]; then
    DRUN="$OUT/ddp_train_$PREC"
    timed "ddp2_train_$PREC" python "$ROOT/train.py" "${DDP[@]}" "trainer.precision=$PREC" trainer.max_epochs=2 \
      "${DATA[@]}" "${MODEL[@]}" "${MONITOR[@]}" "${COMMON[@]}" "hydra.run.dir=$DRUN"
    explain_scalars "$DRUN"
    timed "ddp2_evaluate_$PREC" python "$ROOT/audit.py" audit=evaluate "ckpt_path=$DRUN/checkpoints/last.ckpt" \
      "${DDP[@]}" "trainer.precision=$PREC" "${EVAL[@]}" "${COMMON[@]}" "out_dir=$OUT/ddp_audit_$PREC" \
      "hydra.run.dir=$OUT/ddp_audit_run_$PREC"
    results_table "$OUT/ddp_audit_$PREC/evaluate"
  else
    echo "  (one device: DDP with 2 devices skipped)"
  fi
done

echo "== wall times"
printf '  %s\n' "${SUMMARY[@]}"
echo "runs and logs: $OUT"
