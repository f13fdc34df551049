#!/usr/bin/env bash
# shoal's tokenizer against llama.cpp's own conformance data
# (models/ggml-vocab-*.gguf with .inp/.out): every vocab it supports must
# give llama.cpp's token ids. Needs the llama.cpp source the peer script
# unpacks (../shared/peers/llama-cpp.sh builds it once, cached).
set -euo pipefail
cd "$(dirname "$0")/.."
../shared/peers/llama-cpp.sh >/dev/null
cache="${PEERS_CACHE:-$HOME/.cache/shoal-peers}"
models=$(echo "$cache"/build-*/llama_cpp_python-*/vendor/llama.cpp/models | awk '{print $1}')
[ -d "$models" ] || { echo "llama.cpp models dir not found under $cache" >&2; exit 1; }
cargo run --release -q -p shoal-engine --example vocab_conformance -- "$models"
