#!/usr/bin/env bash
# Set up tunelab in ./.venv: PyTorch first (the CPU build on machines without an NVIDIA GPU, so pip
# never pulls several GB of CUDA wheels), then tunelab with its dependencies. Safe to run again.
#   scripts/setup.sh          the library and the `tunelab` command (and, as root or with passwordless sudo on
#                             Debian, tcmalloc, which the command runs under: less memory; TUNELAB_NO_TCMALLOC=1 skips it)
#   scripts/setup.sh --dev    plus the test and benchmark tools (pytest, hypothesis, ruff, the openai client, TRL;
#                             Playwright, 53 MB, which drives the system's Chromium: no browser download), the
#                             experiment trackers (TensorBoard, W&B, MLflow client: about 50 MB to download, 210 MB
#                             installed), lm-evaluation-harness for `tunelab eval --tasks` (with scikit-learn and scipy:
#                             240 MB installed) and, as root (or with passwordless sudo) on Debian, Chromium for the
#                             tests that open the HTML report and the web app in a real browser (about 120 MB to
#                             download, 410 MB installed, ~25 s; TUNELAB_NO_CHROMIUM=1 skips it; without Chromium
#                             those tests are skipped and say why), and llama-cpp-python 0.3.36, built from source
#                             (no wheel on PyPI: ~4-7 min on 2 cores, needs a C++ compiler; TUNELAB_NO_LLAMA_CPP=1
#                             skips it), which the GGUF export tests compare against llama.cpp's own quantiser and reader
# TORCH_SPEC overrides the PyTorch requirement, e.g. TORCH_SPEC="torch==2.13.0+cpu".
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "--dev" ] && extras="[dev,bench,track,lmeval]"

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_SPEC:-}" ]; then
    spec=$TORCH_SPEC
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    spec="torch>=2.4"
  else
    spec="torch==2.13.0"
  fi
  echo "installing $spec ..."
  "${pip[@]}" install "$spec"
fi

# Already-installed requirements are left alone; torch's floor in pyproject never replaces the build above.
"${pip[@]}" install -e ".${extras}"

# apt_install PACKAGE WHAT: install a Debian package as root (or with passwordless sudo), or say why not.
apt_install() {
  local package=$1 what=$2 log
  local -a sudo=() apt
  if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo=(sudo -n); fi
  if ! command -v apt-get >/dev/null 2>&1 || { [ "$(id -u)" -ne 0 ] && [ ${#sudo[@]} -eq 0 ]; }; then
    echo "note: no $package, and no root apt-get to install it: $what"
    return 0
  fi
  echo "installing $package (apt-get) ..."
  log=$(mktemp)
  apt=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -qq -o=Dpkg::Use-Pty=0)
  "${apt[@]}" install -y --no-install-recommends "$package" >"$log" 2>&1 \
    || { "${apt[@]}" update >>"$log" 2>&1 && "${apt[@]}" install -y --no-install-recommends "$package" >>"$log" 2>&1; } \
    || echo "note: apt-get could not install $package (log: $log): $what"
}

# tcmalloc: the `tunelab` command runs under it where it is found (src/tunelab/allocator.py): ~18% lower peak
# memory and a few % faster training on CPUs than glibc's malloc. TUNELAB_NO_TCMALLOC=1 skips it.
if [ -z "${TUNELAB_NO_TCMALLOC:-}" ] && [ "$(uname -s)" = Linux ] \
    && ! .venv/bin/python -c "import ctypes.util, sys; sys.exit(not ctypes.util.find_library('tcmalloc_minimal'))"; then
  apt_install libtcmalloc-minimal4 "tunelab runs with the system's malloc (more memory)"
fi

# Debian's `chromium` is a real package; Ubuntu's is a snap wrapper that fails in containers, and the note says so.
install_chromium() {
  local browser
  for browser in chromium chromium-browser google-chrome google-chrome-stable; do
    command -v "$browser" >/dev/null 2>&1 && return 0
  done
  if [ -n "${TUNELAB_NO_CHROMIUM:-}" ]; then return 0; fi
  apt_install chromium "the browser tests will be skipped"
}
[ "${1:-}" = "--dev" ] && install_chromium

# llama-cpp-python: the GGUF export tests check tunelab's files with llama.cpp itself. PyPI has only its source;
# a failed build leaves those tests skipped (they say why) rather than failing the setup.
install_llama_cpp() {
  local log
  if [ -n "${TUNELAB_NO_LLAMA_CPP:-}" ] || .venv/bin/python -c "import llama_cpp" 2>/dev/null; then return 0; fi
  echo "building llama-cpp-python 0.3.36 from source (a few minutes) ..."
  log=$(mktemp)
  # A native build on a CPU with AMX crashes in llama.cpp's AMX matmul on quantised files (llama.cpp#20824):
  # where AVX-512 is there, build for it and leave AMX out.
  local cmake_args=${CMAKE_ARGS:-}
  if [ -z "$cmake_args" ] && grep -qw avx512f /proc/cpuinfo 2>/dev/null; then
    cmake_args="-DGGML_NATIVE=OFF -DGGML_AVX512=ON"
  fi
  CMAKE_ARGS=$cmake_args CMAKE_BUILD_PARALLEL_LEVEL=$(nproc 2>/dev/null || echo 2) \
    "${pip[@]}" install --no-cache-dir "llama-cpp-python==0.3.36" >"$log" 2>&1 \
    || echo "note: llama-cpp-python did not build (log: $log): the tests against llama.cpp will be skipped"
}
[ "${1:-}" = "--dev" ] && install_llama_cpp

.venv/bin/python -c "import tunelab, torch; print(f'tunelab {tunelab.__version__} ready (torch {torch.__version__})')"
