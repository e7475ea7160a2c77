#!/usr/bin/env bash
# Build the TIMAR native runtime (runtime/): fetch the ONNX Runtime C/C++ SDK if needed, then
# configure and build with CMake.
#
#   scripts/build_native.sh                 # -> runtime/build (library, tests, bench, example)
#   scripts/build_native.sh --asan          # -> runtime/build-asan (AddressSanitizer + LSan)
#   scripts/build_native.sh --fetch-only    # only fetch ONNX Runtime
#
# Environment: ONNXRUNTIME_ROOT (use this SDK instead of fetching one), TIMAR_BUILD_DIR,
# JOBS (parallel compile jobs, default: number of CPUs), CMAKE_ARGS (extra configure flags),
# TIMAR_ONNXRUNTIME=npm|python (where the library comes from, below; default npm).
#
# The SDK comes from the npm registry package com.github.asus4.onnxruntime (the ONNX Runtime
# plugin for Unity: official headers, and libonnxruntime.so for Linux x64) into the git-ignored
# runtime/third_party/onnxruntime/{include,lib}. Nothing is vendored in git.
# TIMAR_ONNXRUNTIME=python keeps the npm package's headers but takes libonnxruntime.so from the
# Python environment's onnxruntime wheel (which ships it), so the native runtime and Python run
# the same ONNX Runtime: INT8 and FP16 bundles then give the same motion to 1e-3, not 1e-2 (their
# rounding steps differ between versions). ONNX Runtime's C API is backward compatible: a
# library newer than the headers serves them. CI builds this way.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NPM_PACKAGE=com.github.asus4.onnxruntime
NPM_VERSION=0.4.9
ASAN=0
FETCH_ONLY=0
for arg in "$@"; do
  case "$arg" in
    --asan) ASAN=1 ;;
    --fetch-only) FETCH_ONLY=1 ;;
    -h|--help) sed -n 2,14p "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "build_native.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done

# What runtime/third_party/onnxruntime/VERSION says when it holds what was asked for.
onnxruntime_stamp() {
  case "${TIMAR_ONNXRUNTIME:-npm}" in
    npm) echo "$NPM_PACKAGE@$NPM_VERSION" ;;
    python)
      local version
      version=$(python -c "import onnxruntime; print(onnxruntime.__version__)") \
        || { echo "build_native.sh: TIMAR_ONNXRUNTIME=python needs onnxruntime in this Python" >&2; exit 1; }
      echo "$NPM_PACKAGE@$NPM_VERSION headers, library of Python onnxruntime $version" ;;
    *) echo "build_native.sh: TIMAR_ONNXRUNTIME must be npm or python, not '${TIMAR_ONNXRUNTIME}'" >&2; exit 2 ;;
  esac
}

fetch_onnxruntime() {
  local dest="$ROOT/runtime/third_party/onnxruntime"
  local stamp
  stamp=$(onnxruntime_stamp)
  if [[ -f "$dest/include/onnxruntime_cxx_api.h" && -e "$dest/lib/libonnxruntime.so.1" \
        && "$(cat "$dest/VERSION" 2>/dev/null)" == "$stamp" ]]; then
    return 0
  fi
  command -v npm >/dev/null || { echo "build_native.sh: npm is needed to fetch ONNX Runtime (or set ONNXRUNTIME_ROOT)" >&2; exit 1; }
  local tmp
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' RETURN
  echo "fetching ONNX Runtime C/C++ SDK: npm pack $NPM_PACKAGE@$NPM_VERSION"
  (cd "$tmp" && npm pack --silent "$NPM_PACKAGE@$NPM_VERSION" >/dev/null)
  local tgz
  tgz=$(ls "$tmp"/*.tgz)
  local headers='package/Plugins/iOS~/onnxruntime.xcframework/ios-arm64/onnxruntime.framework/Headers'
  tar -xzf "$tgz" -C "$tmp" package/Plugins/Linux/x64 "$headers" package/LICENSE package/ThirdPartyNotices.txt
  rm -rf "$dest"
  mkdir -p "$dest/include" "$dest/lib"
  cp "$tmp/$headers"/*.h "$dest/include/"
  cp "$tmp/package/LICENSE" "$tmp/package/ThirdPartyNotices.txt" "$dest/"
  if [[ "${TIMAR_ONNXRUNTIME:-npm}" == python ]]; then
    local capi
    capi=$(python -c "import onnxruntime, pathlib; print(pathlib.Path(onnxruntime.__file__).parent / 'capi')")
    cp "$capi"/libonnxruntime.so.1.* "$dest/lib/libonnxruntime.so"
    cp "$capi/libonnxruntime_providers_shared.so" "$dest/lib/"
    echo "ONNX Runtime library: $capi (Python's onnxruntime wheel)"
  else
    cp "$tmp/package/Plugins/Linux/x64/"*.so "$dest/lib/"
  fi
  # The library's SONAME is libonnxruntime.so.1: the loader looks for that name.
  ln -sf libonnxruntime.so "$dest/lib/libonnxruntime.so.1"
  echo "$stamp" > "$dest/VERSION"
}

if [[ -z "${ONNXRUNTIME_ROOT:-}" ]]; then
  fetch_onnxruntime
  ONNXRUNTIME_ROOT="$ROOT/runtime/third_party/onnxruntime"
fi
[[ $FETCH_ONLY == 1 ]] && exit 0

command -v cmake >/dev/null || { echo "build_native.sh: cmake is needed" >&2; exit 1; }
if [[ $ASAN == 1 ]]; then
  BUILD_DIR=${TIMAR_BUILD_DIR:-$ROOT/runtime/build-asan}
  EXTRA=(-DTIMAR_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo -DTIMAR_BUILD_EXAMPLES=OFF)
else
  BUILD_DIR=${TIMAR_BUILD_DIR:-$ROOT/runtime/build}
  EXTRA=(-DCMAKE_BUILD_TYPE=Release)
fi
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}
# shellcheck disable=SC2086
cmake -S "$ROOT/runtime" -B "$BUILD_DIR" -DONNXRUNTIME_ROOT="$ONNXRUNTIME_ROOT" "${EXTRA[@]}" ${CMAKE_ARGS:-} >/dev/null
cmake --build "$BUILD_DIR" -j "$JOBS"
echo "built: $BUILD_DIR"
