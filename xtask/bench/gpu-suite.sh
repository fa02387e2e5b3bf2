#!/usr/bin/env bash
# The GPU checks and benchmarks of Rampart, from prebuilt binaries, on a machine
# that has an NVIDIA GPU, PyTorch and no Rust toolchain. Build the bundle first on
# any machine with the CUDA toolkit (`xtask/bench/gpu-bundle.sh BUNDLE`), copy it
# over, then:
#
#   xtask/bench/gpu-suite.sh BUNDLE OUT [DATA]
#
# BUNDLE  the folder gpu-bundle.sh wrote (rampart, the CUDA test binaries);
# OUT     where every result goes (created);
# DATA    optional: a folder holding CIFAR-10 as `rampart train --data-dir` takes it
#         (cifar10-jpeg/, or the archive cifar10-jpeg.tar.gz) for the fast-AT epoch.
#
# In order of importance, each step with its own time limit so that one slow step
# cannot starve the rest:
#   1. OUT/gpu.txt: the GPU, its driver, the CUDA and PyTorch versions;
#   2. OUT/tests-*.txt: the CUDA test binaries (kernels against the CPU);
#   3. OUT/bench.jsonl: `rampart bench` and xtask/bench/pytorch_bench.py, alternating,
#      two rounds, for each architecture × precision × batch size in ARCHS, DEVICES,
#      BATCHES (environment variables; defaults below);
#      Rampart's runs take the opt-in GPU paths whose tests passed in step 2 (the
#      fused programs after test-models-cuda, and test-models-bf16 for cuda+bf16;
#      PGD's device-resident loop after test-attacks-cuda, staged uploads after
#      test-data-cuda, the trainer's CUDA graphs after their test in
#      test-defenses-cuda), so that one device run
#      gives the table of the paths that become the default; FAST_IF_PASSED=0 keeps
#      the defaults. The switches taken are in each run's line and under bench.md;
#   4. OUT/fast-at-epoch/: EPOCHS (default 2) epochs of `rampart train --preset
#      fast-at-preact-resnet18` (their epoch times are in history.jsonl); OUT/bf16.md:
#      PGD-20 on that model's first 1,000 test images in full f32 and in bf16
#      (`--device cuda+bf16`), on the same images; OUT/fast-at-epoch-fused/: the same
#      epoch on the fused GPU programs and PGD's device-resident loop (and staged
#      uploads where test-data-cuda passed, the trainer's CUDA graphs where
#      training_steps_replayed_from_cuda_graphs_equal_eager_steps passed);
#      OUT/fast-at-epoch-bf16/: the same epochs in bf16; after each run, `rampart
#      bench --steps fast-at-step` with its device and switches, and OUT/epoch.md:
#      each epoch's wall time ÷ (its steps × that step time), what the input
#      pipeline adds (epoch-table.py);
#   4b. OUT/ab.jsonl and OUT/ab.md: `rampart bench` of AB_ARCHS (ARCH or
#      ARCH:VARIANT) at batch 128 on $EPOCH_DEVICE under each setting of
#      AB_SETTINGS (the fused eval and train programs, PGD's device-resident loop
#      and its CUDA graphs), alternating, AB_ROUNDS rounds (ratio = setting ÷
#      default; each step's host share beside it); then Rampart's step times that
#      only the estimates use (ESTIMATE_ARCHS at batch 128 and EXTRA_BATCHES, student
#      and OAT variants);
#   5. OUT/bench.md: the table of step 3 (ratio = Rampart ÷ PyTorch images/s, > 1
#      means Rampart is faster), from bench-table.py;
#   6. OUT/estimate-fast.md and OUT/estimate-paper.md (and .json): the wall time of
#      every row of those studies on 1, 4 and 8 GPUs of $EPOCH_DEVICE, from step 3's
#      step times (`xtask reproduce --estimate`).
# A step that fails or runs out of time is recorded in OUT/steps.txt and the suite
# goes on. BUDGET (seconds, default 570) bounds the whole suite: later steps are cut
# or skipped to fit it, and the tables and estimates always run at the end.
# Last, OUT is packed for the way back (gpu-common.sh's `deliver`): everything in
# OUT/results.tar.xz, beside steps.txt, bench.md, epoch.md, ab.md, bf16.md, gpu.txt
# and estimate-fast.md, eight files in all; `xtask/bench/deliver.py unpack OUT DEST`
# gives the folder back (DELIVER=folder leaves it unpacked).
set -u
BUNDLE=$(cd "${1:?usage: gpu-suite.sh BUNDLE OUT [DATA]}" && pwd)
OUT=${2:?usage: gpu-suite.sh BUNDLE OUT [DATA]}
DATA=${3:-}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-python3}
ARCHS=${ARCHS:-"wrn-16-4 preact-resnet18 wrn-28-10"}
DEVICES=${DEVICES:-"cuda cuda+tf32 cuda+bf16"}
BATCHES=${BATCHES:-"128 512"}
REPS=${REPS:-20}
# The steps of the comparison with PyTorch: the three of the issue's table, and fast
# AT's whole training step (the fast-AT preset's step, attack included).
COMPARED_STEPS=${COMPARED_STEPS:-forward,pgd-step,train-step,fast-at-step}
ROUNDS=${ROUNDS:-2}
EPOCH_DEVICE=${EPOCH_DEVICE:-cuda+tf32}
# Epochs of each fast-AT run (the last is the steady state; the first also compiles
# kernels and chooses cuDNN's plans).
EPOCHS=${EPOCHS:-2}
# The fast-AT runs' architecture (the preset's; the CPU rehearsal takes a smaller one).
EPOCH_ARCH=${EPOCH_ARCH:-preact-resnet18}
# The two devices the bf16 check compares (full f32 and bf16).
F32_DEVICE=${F32_DEVICE:-cuda}
BF16_DEVICE=${BF16_DEVICE:-cuda+bf16}
# Rampart-only step times the estimates also need, on $EPOCH_DEVICE: these
# architectures at batch 128 and EXTRA_BATCHES (the per-GPU batches of 4 and 8 GPUs),
# and the student and OAT variants at batch 128.
ESTIMATE_ARCHS=${ESTIMATE_ARCHS:-"resnet20 preact-resnet18 wrn-28-10"}
EXTRA_BATCHES=${EXTRA_BATCHES:-"32"}
# The architectures of the A/B runs of the host-overhead switches (OUT/ab.md), each
# ARCH or ARCH:VARIANT (plain, student, oat: `rampart bench --variant`).
AB_ARCHS=${AB_ARCHS:-"wrn-16-4 preact-resnet18 resnet20 preact-resnet18:student"}
# The A/B runs' rounds (settings alternating within each).
AB_ROUNDS=${AB_ROUNDS:-2}
# The whole suite's wall time in seconds: steps are cut or skipped to fit, and the
# last 45 seconds are kept for the tables and estimates.
BUDGET=${BUDGET:-570}
DEADLINE=$((SECONDS + BUDGET - 45))
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
STEPS="$OUT/steps.txt"
: > "$STEPS"

. "$HERE/gpu-common.sh"
unpack_bundle
RAMPART="$BUNDLE/rampart"

machine_facts > "$OUT/gpu.txt" 2>&1

for t in "$BUNDLE"/test-*; do
  [[ "$t" == *.xz ]] && continue
  [ -x "$t" ] || continue
  n=$(basename "$t")
  step "$n" 240 "$t" --test-threads=1 > "$OUT/tests-$n.txt" 2>&1
done

# The opt-in paths whose GPU tests passed above, for the comparison's Rampart runs on
# device $1. A path needs every test of its binary to pass, except those named after
# the binary (the graph test's failure does not hold back the device-resident loop;
# the graphs need their own test).
GRAPH_TEST=pgd_steps_replayed_from_cuda_graphs_equal_eager_steps
TRAIN_GRAPH_TEST=training_steps_replayed_from_cuda_graphs_equal_eager_steps
passed() {
  local file="$OUT/tests-$1.txt" name
  shift
  # A binary that crashed wrote no result line.
  grep -q "^test result: " "$file" 2>/dev/null || return 1
  for name in $(sed -nE 's/^test (.*) \.\.\. FAILED$/\1/p' "$file"); do
    case " $* " in *" $name "*) ;; *) return 1 ;; esac
  done
  # A panic outside a test (the harness) leaves a failed result with no failed test.
  if grep -q "^test result: FAILED" "$file" && [ $# = 0 ]; then return 1; fi
  return 0
}
test_passed() {
  grep -qE "^test $2 \.\.\. ok$" "$OUT/tests-$1.txt" 2>/dev/null
}
switches_for() {
  local on=()
  if [ "${FAST_IF_PASSED:-1}" = 1 ]; then
    # bf16 programs also need the bf16 tests.
    if passed test-models-cuda && { [ "$1" = "${1%+bf16}" ] || passed test-models-bf16; }; then
      on+=(RAMPART_CUDA_FUSED_EVAL=1 RAMPART_CUDA_FUSED_TRAIN=1)
    fi
    if passed test-attacks-cuda "$GRAPH_TEST"; then
      on+=(RAMPART_CUDA_DEVICE_ATTACK=1)
      test_passed test-attacks-cuda "$GRAPH_TEST" && on+=(RAMPART_CUDA_GRAPHS=1)
    fi
    passed test-data-cuda && on+=(RAMPART_CUDA_PINNED_UPLOADS=1)
    test_passed test-defenses-cuda "$TRAIN_GRAPH_TEST" && on+=(RAMPART_CUDA_TRAIN_GRAPHS=1)
  fi
  echo "${on[*]:-}"
}

: > "$OUT/bench.jsonl"
for arch in $ARCHS; do
  for batch in $BATCHES; do
    for dev in $DEVICES; do
      for round in $(seq "$ROUNDS"); do
        common=(--arch "$arch" --batch-size "$batch" --reps "$REPS" --device "$dev")
        switches=$(switches_for "$dev")
        mark() { printf '{"run": {"framework": "%s", "arch": "%s", "batch_size": %s, "device": "%s", "round": %s, "switches": "%s"}}\n' "$1" "$arch" "$batch" "$dev" "$round" "$2" >> "$OUT/bench.jsonl"; }
        mark rampart "$switches"
        step "rampart-bench $arch $batch $dev round $round" 120 \
          env $switches "$RAMPART" bench "${common[@]}" --steps "$COMPARED_STEPS" --json \
          >> "$OUT/bench.jsonl" 2>> "$OUT/bench.log"
        mark pytorch ""
        step "pytorch-bench $arch $batch $dev round $round" 120 \
          "$PYTHON" "$HERE/pytorch_bench.py" "${common[@]}" --steps "$COMPARED_STEPS" \
          >> "$OUT/bench.jsonl" 2>> "$OUT/bench.log"
      done
    done
  done
done
# epoch_steps DIR DEVICE [VAR=value…]: the fast-AT step time with the switches of the
# epoch run in OUT/DIR (for OUT/epoch.md).
: > "$OUT/epoch-steps.jsonl"
epoch_steps() {
  local dir=$1 dev=$2
  shift 2
  [ -f "$OUT/$dir/history.jsonl" ] || return 0
  printf '{"run": {"epoch_dir": "%s", "device": "%s", "switches": "%s"}}\n' "$dir" "$dev" "$*" \
    >> "$OUT/epoch-steps.jsonl"
  step "fast-at-step $dir" 60 env "$@" "$RAMPART" bench --arch "$EPOCH_ARCH" --batch-size 128 \
    --reps "$REPS" --device "$dev" --steps fast-at-step --json >> "$OUT/epoch-steps.jsonl" \
    2>> "$OUT/bench.log"
}
if [ -n "$DATA" ]; then
  step "fast-at-epoch" 300 "$RAMPART" train --preset fast-at-preact-resnet18 --arch "$EPOCH_ARCH" --epochs "$EPOCHS" \
    --device "$EPOCH_DEVICE" --data-dir "$DATA" --out "$OUT/fast-at-epoch" --seed 0 \
    > "$OUT/fast-at-epoch.log" 2>&1
  # bf16 against f32 on a trained model: PGD-20 on the same 1,000 test images.
  if [ -f "$OUT/fast-at-epoch/model.safetensors" ]; then
    for pair in "f32 $F32_DEVICE" "bf16 $BF16_DEVICE"; do
      set -- $pair
      step "pgd20 $2" 90 "$RAMPART" eval --model "$OUT/fast-at-epoch/model.safetensors" \
        --dataset cifar10 --data-dir "$DATA" --suite pgd20 --test-limit 1000 \
        --attack-limit 1000 --device "$2" --out "$OUT/pgd20-$1" > "$OUT/pgd20-$1.log" 2>&1
    done
    DEADLINE= step "bf16-table" 10 "$PYTHON" "$HERE/bf16-table.py" "$OUT/pgd20-f32" \
      "$OUT/pgd20-bf16" > "$OUT/bf16.md"
  fi
  rm -f "$OUT"/fast-at-epoch/*.safetensors
  epoch_steps fast-at-epoch "$EPOCH_DEVICE"
  # The same epochs on the fused GPU programs (attack and training step) and PGD's
  # device-resident loop, its batches staged through page-locked memory where that
  # test passed, and its full-batch steps replayed from CUDA graphs where theirs did
  # (the step bench after it times eager steps: the ratio shows what graphs save).
  pinned=()
  passed test-data-cuda && pinned=(RAMPART_CUDA_PINNED_UPLOADS=1)
  test_passed test-defenses-cuda "$TRAIN_GRAPH_TEST" && pinned+=(RAMPART_CUDA_TRAIN_GRAPHS=1)
  step "fast-at-epoch-fused" 200 env RAMPART_CUDA_FUSED_EVAL=1 RAMPART_CUDA_FUSED_TRAIN=1 \
    RAMPART_CUDA_DEVICE_ATTACK=1 "${pinned[@]}" \
    "$RAMPART" train --preset fast-at-preact-resnet18 --arch "$EPOCH_ARCH" --epochs "$EPOCHS" --device "$EPOCH_DEVICE" \
    --data-dir "$DATA" --out "$OUT/fast-at-epoch-fused" --seed 0 \
    > "$OUT/fast-at-epoch-fused.log" 2>&1
  rm -f "$OUT"/fast-at-epoch-fused/*.safetensors
  epoch_steps fast-at-epoch-fused "$EPOCH_DEVICE" RAMPART_CUDA_FUSED_EVAL=1 \
    RAMPART_CUDA_FUSED_TRAIN=1 RAMPART_CUDA_DEVICE_ATTACK=1 "${pinned[@]}"
  step "fast-at-epoch-bf16" 200 "$RAMPART" train --preset fast-at-preact-resnet18 --arch "$EPOCH_ARCH" \
    --epochs "$EPOCHS" --device "$BF16_DEVICE" --data-dir "$DATA" --out "$OUT/fast-at-epoch-bf16" \
    --seed 0 > "$OUT/fast-at-epoch-bf16.log" 2>&1
  rm -f "$OUT"/fast-at-epoch-bf16/*.safetensors
  epoch_steps fast-at-epoch-bf16 "$BF16_DEVICE"
fi
DEADLINE= step "epoch-table" 10 "$PYTHON" "$HERE/epoch-table.py" "$OUT" > "$OUT/epoch.md"

# The host-overhead switches, A/B on whole steps (Rampart alone, settings alternating,
# two rounds): the default; the fused eval program on the GPU
# (RAMPART_CUDA_FUSED_EVAL=1: forward and PGD steps); the fused train program
# (RAMPART_CUDA_FUSED_TRAIN=1: training steps); both; PGD's device-resident loop
# (RAMPART_CUDA_DEVICE_ATTACK=1: the attack-linf step, a whole PGD run, and the
# apgd-linf step, a 10-step APGD-CE); all three
# with cuDNN's measured algorithms (RAMPART_CUDNN_BENCHMARK=1); the fused eval program
# and the device-resident loop with its middle steps replayed from CUDA graphs
# (RAMPART_CUDA_GRAPHS=1: the pgd20 step, a PGD-20 run, whose path reads
# device+graphs when they replayed; attack-linf's 2 steps are too few to capture); and cudarc's per-buffer events
# kept (RAMPART_CUDA_EVENTS=1, the behaviour before they were turned off; a
# diagnostic, add it to AB_SETTINGS to measure it); the fused programs and the
# device-resident loop with the trainer's full-batch steps replayed from a CUDA graph
# (RAMPART_CUDA_TRAIN_GRAPHS=1: the fast-at-step step, whose path ends in +graphs when
# it replayed). A setting is one or more VAR=value words (`+` between them).
AB_SETTINGS=${AB_SETTINGS:-"RAMPART_AB=default RAMPART_CUDA_FUSED_EVAL=1 RAMPART_CUDA_FUSED_TRAIN=1 RAMPART_CUDA_FUSED_EVAL=1+RAMPART_CUDA_FUSED_TRAIN=1 RAMPART_CUDA_DEVICE_ATTACK=1 RAMPART_CUDA_FUSED_EVAL=1+RAMPART_CUDA_FUSED_TRAIN=1+RAMPART_CUDA_DEVICE_ATTACK=1+RAMPART_CUDNN_BENCHMARK=1 RAMPART_CUDA_FUSED_EVAL=1+RAMPART_CUDA_DEVICE_ATTACK=1+RAMPART_CUDA_GRAPHS=1 RAMPART_CUDA_FUSED_EVAL=1+RAMPART_CUDA_FUSED_TRAIN=1+RAMPART_CUDA_DEVICE_ATTACK=1+RAMPART_CUDA_TRAIN_GRAPHS=1"}
: > "$OUT/ab.jsonl"
for spec in $AB_ARCHS; do
  arch=${spec%%:*}
  variant=plain
  [ "$spec" != "$arch" ] && variant=${spec#*:}
  # A method's whole step (fast AT) for plain and student models (OAT trains with its own).
  ab_steps=forward,pgd-step,train-step,attack-linf,pgd20,apgd-linf
  [ "$variant" = oat ] || ab_steps+=,fast-at-step
  for round in $(seq "$AB_ROUNDS"); do
    for setting in $AB_SETTINGS; do
      printf '{"run": {"setting": "%s", "arch": "%s", "batch_size": 128, "device": "%s", "round": %s}}\n' \
        "${setting#RAMPART_AB=}" "$spec" "$EPOCH_DEVICE" "$round" >> "$OUT/ab.jsonl"
      step "ab $spec $setting round $round" 60 env ${setting//+/ } "$RAMPART" bench --arch "$arch" \
        --variant "$variant" --batch-size 128 --reps "$REPS" --device "$EPOCH_DEVICE" \
        --steps "$ab_steps" --json >> "$OUT/ab.jsonl" 2>> "$OUT/bench.log"
    done
  done
done
DEADLINE= step "ab-table" 10 "$PYTHON" "$HERE/bench-table.py" --ab "$OUT/ab.jsonl" > "$OUT/ab.md"

# Step times for the estimates only (Rampart alone).
for arch in $ESTIMATE_ARCHS; do
  for spec in "plain 128" $(for b in $EXTRA_BATCHES; do echo "plain:$b"; done) "student 128" "oat 128"; do
    variant=${spec%%[ :]*}
    batch=${spec##*[ :]}
    printf '{"run": {"framework": "rampart-estimates", "arch": "%s", "variant": "%s", "batch_size": %s, "device": "%s"}}\n' \
      "$arch" "$variant" "$batch" "$EPOCH_DEVICE" >> "$OUT/bench.jsonl"
    step "rampart-bench $arch $variant $batch $EPOCH_DEVICE (estimates)" 90 \
      "$RAMPART" bench --arch "$arch" --variant "$variant" --batch-size "$batch" \
      --reps "$REPS" --device "$EPOCH_DEVICE" --steps forward,pgd-step,train-step --json \
      >> "$OUT/bench.jsonl" 2>> "$OUT/bench.log"
  done
done

# The tables, whatever the budget left: the comparison (the estimates' extra runs,
# marked `rampart-estimates`, stay out of it) and
# the wall-time estimates of the fast and paper studies on 1, 4 and 8 GPUs from these
# step times (`xtask reproduce --estimate`; nothing runs).
DEADLINE= step "bench-table" 30 "$PYTHON" "$HERE/bench-table.py" "$OUT/bench.jsonl" > "$OUT/bench.md"
if [ -x "$BUNDLE/xtask" ]; then
  for preset in fast paper; do
    # The fast preset's rows are meant to fit 8 minutes each on one GPU.
    fit=()
    [ "$preset" = fast ] && fit=(--fit-minutes 8)
    DEADLINE= step "estimate-$preset" 20 "$BUNDLE/xtask" reproduce cifar10 --preset "$preset" \
      --device "$EPOCH_DEVICE" --rampart-bin "$RAMPART" ${DATA:+--data-dir "$DATA"} \
      --estimate "$OUT/bench.jsonl" --estimate-json "$OUT/estimate-$preset.json" "${fit[@]}" \
      > "$OUT/estimate-$preset.md" 2>> "$OUT/estimate.log"
  done
fi
cat "$STEPS"
deliver steps.txt bench.md epoch.md ab.md bf16.md gpu.txt estimate-fast.md
