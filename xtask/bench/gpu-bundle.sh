#!/usr/bin/env bash
# Builds what gpu-suite.sh runs, on any machine with the CUDA toolkit (no GPU is
# needed), into BUNDLE: the `rampart` binary (features $FEATURES, default nccl:
# cuDNN and NCCL), the `xtask` study driver (for gpu-rows.sh) and the CUDA test
# binaries, stripped, in one xz-compressed archive, BUNDLE/bundle.tar.xz, which
# gpu-suite.sh and gpu-rows.sh unpack. The binaries share most of their code
# (candle, its CUDA kernels, Rampart's crates), which one xz stream whose dictionary
# ($XZ_DICT, default 384MiB) spans them all stores once: the eight binaries
# (389 MB stripped) take 12.6 MB in one stream against 44.8 MB compressed one by one
# (measured at e163b7a; 3 to 6 minutes of one core to pack, 2 s to unpack).
#
#   xtask/bench/gpu-bundle.sh BUNDLE
#
# test-models-cuda     rampart-models' tests/cuda.rs (kernels, networks vs the CPU)
# test-models-bf16     rampart-models' tests/cuda_bf16.rs (bf16 convolutions vs the CPU)
# test-defenses-cuda   rampart-defenses' tests/cuda.rs (fused SGD vs the CPU)
# test-attacks-cuda    rampart-attacks' tests/cuda.rs (PGD's and APGD's device loops vs the host loops)
# test-defenses-nccl   rampart-defenses' tests/nccl.rs (NCCL with every visible GPU)
# test-data-cuda       rampart-data's tests/cuda.rs (staged uploads vs ordinary copies)
set -eu
BUNDLE=${1:?usage: gpu-bundle.sh BUNDLE}
FEATURES=${FEATURES:-nccl}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
mkdir -p "$BUNDLE"

# The `nccl` feature links libnccl.so. Where no folder of LIBRARY_PATH has it, it is
# taken from NVIDIA's wheel (nvidia-nccl-cu13, from PyPI) into NCCL_DIR; at run time
# the binaries load libnccl.so.2 from the GPU machine (gpu-common.sh puts PyTorch's
# NVIDIA libraries on LD_LIBRARY_PATH).
has_nccl() {
  local d
  IFS=: read -ra dirs <<< "${LIBRARY_PATH:-}"
  for d in "${dirs[@]}" /usr/lib/x86_64-linux-gnu /usr/local/lib; do
    [ -n "$d" ] && [ -e "$d/libnccl.so" ] && return 0
  done
  return 1
}
if [[ "$FEATURES" == *nccl* ]] && ! has_nccl; then
  NCCL_DIR=${NCCL_DIR:-$HOME/.cache/rampart-nccl}
  if ! ls "$NCCL_DIR"/wheel/nvidia/nccl/lib/libnccl.so.* > /dev/null 2>&1; then
    python3 -m pip install -q --no-deps --target "$NCCL_DIR/wheel" nvidia-nccl-cu13
  fi
  mkdir -p "$NCCL_DIR/lib"
  ln -sfn "$(ls "$NCCL_DIR"/wheel/nvidia/nccl/lib/libnccl.so.* | head -1)" "$NCCL_DIR/lib/libnccl.so"
  export LIBRARY_PATH="$NCCL_DIR/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
  echo "NCCL for linking: $NCCL_DIR/lib"
fi
cargo build --release -p rampart-cli --features "$FEATURES"
TARGET=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
cp "$TARGET/release/rampart" "$BUNDLE/rampart"
# The study driver, for gpu-rows.sh (it runs `rampart` from the bundle, no cargo).
cargo build --release -p xtask
cp "$TARGET/release/xtask" "$BUNDLE/xtask"

# test_binary NAME CARGO-ARGS...: builds one test target and copies its executable.
test_binary() {
  local name=$1
  shift
  local exe
  exe=$(cargo test --release "$@" --no-run --message-format=json \
    | python3 -c 'import json, sys
exes = [m["executable"] for m in map(json.loads, sys.stdin) if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]]
print(exes[-1])')
  cp "$exe" "$BUNDLE/$name"
}
test_binary test-models-cuda -p rampart-models --features cudnn --test cuda
test_binary test-models-bf16 -p rampart-models --features cudnn --test cuda_bf16
test_binary test-defenses-cuda -p rampart-defenses --features cuda --test cuda
test_binary test-attacks-cuda -p rampart-attacks --features cuda --test cuda
test_binary test-data-cuda -p rampart-data --features cuda --test cuda
if [[ "$FEATURES" == *nccl* ]]; then
  test_binary test-defenses-nccl -p rampart-defenses --features nccl --test nccl
fi
names=()
for f in "$BUNDLE"/rampart "$BUNDLE"/xtask "$BUNDLE"/test-*; do
  [[ "$f" == *.xz ]] && continue
  strip "$f"
  names+=("$(basename "$f")")
done
# One stream (xz -T1: several threads would cut it into independent blocks).
rm -f "$BUNDLE"/*.xz
tar -C "$BUNDLE" -cf - "${names[@]}" \
  | xz -T1 -9e --lzma2=dict="${XZ_DICT:-384MiB}" > "$BUNDLE/bundle.tar.xz.part"
mv -f "$BUNDLE/bundle.tar.xz.part" "$BUNDLE/bundle.tar.xz"
for n in "${names[@]}"; do rm -f "${BUNDLE:?}/$n"; done
ls -la "$BUNDLE"
