# Shared by gpu-suite.sh and gpu-rows.sh (sourced, not run): the bundle's binaries
# unpacked, the CUDA libraries PyTorch brings on the library path, the machine's facts,
# a step runner that records each step's exit status and seconds in $STEPS, and the
# output folder packed for the way back.
# Expects BUNDLE (absolute), OUT (absolute, created), STEPS, PYTHON and HERE.

# The CUDA libraries PyTorch brings (cuBLAS, cuRAND, NVRTC, cuDNN, NCCL), for the
# binaries' dynamic linking.
NV=$("$PYTHON" -c 'import nvidia, os; print(":".join(os.path.join(p, d, "lib") for p in nvidia.__path__ for d in sorted(os.listdir(p)) if os.path.isdir(os.path.join(p, d, "lib"))))' 2>/dev/null)
export LD_LIBRARY_PATH="${NV:+$NV:}${LD_LIBRARY_PATH:-}"

# step NAME SECONDS COMMAND...: runs and records one step; never fails the script.
# With DEADLINE set (a value of $SECONDS), the step's limit is cut to the time left,
# and a step with under 10 seconds left is skipped (recorded as such).
step() {
  local name=$1 limit=$2
  shift 2
  if [ -n "${DEADLINE:-}" ]; then
    local left=$((DEADLINE - SECONDS))
    if [ "$left" -lt 10 ]; then
      echo "$name skipped: the suite's time budget is spent" >> "$STEPS"
      return 0
    fi
    [ "$left" -lt "$limit" ] && limit=$left
  fi
  local start=$SECONDS
  timeout "$limit" "$@"
  local rc=$?
  echo "$name rc=$rc seconds=$((SECONDS - start))" >> "$STEPS"
  return 0
}

# The bundle's archive (bundle.tar.xz, gpu-bundle.sh) unpacked into it once (tar and
# xz, else Python's tarfile), every other *.xz decompressed beside it (xz, else
# Python's lzma), and the binaries made executable.
unpack_bundle() {
  local f
  if [ -e "$BUNDLE/bundle.tar.xz" ] && [ ! -e "$BUNDLE/.unpacked" ]; then
    { xz -dc "$BUNDLE/bundle.tar.xz" 2>/dev/null | tar -xf - -C "$BUNDLE" 2>/dev/null; } \
      || "$PYTHON" -c 'import sys, tarfile; tarfile.open(sys.argv[1], "r:xz").extractall(sys.argv[2])' \
        "$BUNDLE/bundle.tar.xz" "$BUNDLE"
    touch "$BUNDLE/.unpacked"
  fi
  for f in "$BUNDLE"/*.xz; do
    [[ "$f" == */bundle.tar.xz ]] && continue
    [ -e "$f" ] || continue
    [ -e "${f%.xz}" ] || xz -dk "$f" 2>/dev/null \
      || "$PYTHON" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[1][:-3], "wb"))' "$f"
  done
  for f in "$BUNDLE"/rampart "$BUNDLE"/xtask "$BUNDLE"/test-*; do
    [ -e "$f" ] || continue
    [[ "$f" == *.xz ]] || chmod +x "$f" 2>/dev/null
  done
}

# The GPU, its driver, the CUDA and PyTorch versions and the binary's version.
machine_facts() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  nvidia-smi | head -4
  "$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())'
  nproc
  "$BUNDLE/rampart" --version
}

# deliver SUMMARY...: OUT packed for the way back from the GPU machine (deliver.py):
# every file under it in OUT/results.tar.xz (cut into results.tar.xz.000, .001, … of
# DELIVER_PART_BYTES, default 16,000,000, where larger), beside the SUMMARY files that
# fit DELIVER_MAX_FILES files in all (default 8); `deliver.py unpack OUT DEST` rebuilds
# the folder. DELIVER=folder leaves OUT as it is (a GPU machine of one's own).
deliver() {
  [ "${DELIVER:-pack}" = folder ] && return 0
  "$PYTHON" "$HERE/deliver.py" pack "$OUT" "$@" \
    --part-bytes "${DELIVER_PART_BYTES:-16000000}" --max-files "${DELIVER_MAX_FILES:-8}"
}
