#!/usr/bin/env bash
# Rows of a study preset (`cargo xtask reproduce`) on a GPU machine that has no Rust
# toolchain, from the prebuilt binaries of `xtask/bench/gpu-bundle.sh` (which packs
# the `xtask` binary beside `rampart`):
#
#   xtask/bench/gpu-rows.sh BUNDLE OUT DATA ROWS [REPRODUCE FLAGS...]
#
# BUNDLE  the folder gpu-bundle.sh wrote;
# OUT     where the results go (created): OUT/study is the study folder, so that the
#         rows of several invocations (here or on other GPU machines, their OUT/study
#         copied together) merge into one report.md and results.json with --resume;
# DATA    the folder holding CIFAR-10 as `rampart --data-dir` takes it (cifar10-jpeg/,
#         or the archive cifar10-jpeg.tar.gz);
# ROWS    the rows, as `cargo xtask reproduce --rows` takes them (at, normal,at, …);
# FLAGS   further flags of `xtask reproduce`: --fit-minutes 8 times this machine
#         first and trains the rows for the share of their schedules that fits 8
#         minutes with their evaluation (OUT/study/fit.json); --epochs 10 a shortened
#         schedule of one's own; the rows record either.
#
# Environment: PRESET (default fast), DEVICE (default cuda), LIMIT (seconds the
# reproduce run may take, default 570; timeout stops the driver and its runs), KEEP (where model files of 16 MiB or more
# move to, outside OUT, default ~/rampart-models: such files stay on this machine,
# and the rows' results say their model is not in the folder once the report is
# made again elsewhere). The GPU switches (RAMPART_CUDA_FUSED_EVAL,
# RAMPART_CUDA_FUSED_TRAIN, RAMPART_CUDNN_BENCHMARK, …) pass through to every run,
# whose config.json records them (`gpu_switches`).
# PREVIOUS (optional): what an earlier invocation brought back (its OUT, packed or
# not): its study folder is where this one continues (--resume), so that rows run on
# one GPU machine after another, each bringing back only its results, end in one
# report. A row whose teacher ran earlier needs the teacher's model: run the two in
# one invocation (`at,student`), since models stay on the machine that trained them.
# Writes OUT/gpu.txt (the machine), OUT/reproduce.log (the run's output),
# OUT/steps.txt (exit status and seconds) and OUT/study (report.md, results.json,
# every row's history, logs and plots), then packs OUT for the way back
# (gpu-common.sh's `deliver`): everything in OUT/results.tar.xz, beside steps.txt,
# report.md (a copy of the study's), gpu.txt and reproduce.log; DELIVER=folder leaves
# OUT as it is. `xtask/bench/deliver.py unpack OUT DEST` gives the folder back.
set -u
usage="usage: gpu-rows.sh BUNDLE OUT DATA ROWS [REPRODUCE FLAGS...]"
BUNDLE=$(cd "${1:?$usage}" && pwd)
OUT=${2:?$usage}
DATA=$(cd "${3:?$usage}" && pwd)
ROWS=${4:?$usage}
shift 4
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-python3}
PRESET=${PRESET:-fast}
DEVICE=${DEVICE:-cuda}
LIMIT=${LIMIT:-570}
KEEP=${KEEP:-$HOME/rampart-models}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
STEPS="$OUT/steps.txt"
touch "$STEPS"

. "$HERE/gpu-common.sh"
unpack_bundle
machine_facts > "$OUT/gpu.txt" 2>&1

# An earlier invocation's study, where this one continues.
if [ -n "${PREVIOUS:-}" ]; then
  PREVIOUS=$(cd "$PREVIOUS" && pwd)
  if ls "$PREVIOUS"/results.tar.xz* > /dev/null 2>&1; then
    "$PYTHON" "$HERE/deliver.py" unpack "$PREVIOUS" "$OUT/.previous" || exit 1
    from="$OUT/.previous/study"
  else
    from="$PREVIOUS/study"
  fi
  [ -d "$from" ] || { echo "PREVIOUS holds no study folder: $PREVIOUS" >&2; exit 1; }
  mkdir -p "$OUT/study"
  cp -a "$from/." "$OUT/study/"
  rm -rf "$OUT/.previous"
  echo "continued from $PREVIOUS" >> "$STEPS"
fi

step "reproduce $PRESET $ROWS" "$LIMIT" "$BUNDLE/xtask" reproduce cifar10 \
  --preset "$PRESET" --device "$DEVICE" --rampart-bin "$BUNDLE/rampart" \
  --data-dir "$DATA" --rows "$ROWS" --out "$OUT/study" --resume "$@" \
  >> "$OUT/reproduce.log" 2>&1

# Model files too large to bring back stay on this machine, under KEEP.
find "$OUT/study" -type f -size +16383k -print0 | while IFS= read -r -d '' f; do
  rel=${f#"$OUT/study/"}
  mkdir -p "$KEEP/$(dirname "$rel")"
  mv -f "$f" "$KEEP/$rel"
  echo "kept on this machine: $rel ($KEEP)" >> "$STEPS"
done
[ -f "$OUT/study/report.md" ] && cp "$OUT/study/report.md" "$OUT/report.md"
cat "$STEPS"
deliver steps.txt report.md gpu.txt reproduce.log
