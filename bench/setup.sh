# Sourced by the bench scripts: builds shoal (release), finds the model
# (first argument, else the default model, fetched on first use) and the
# llama.cpp peer. Sets: root, shoal, model, llama.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# SHOAL_BIN=path uses that binary instead (e.g. the optimised dev build).
if [ -n "${SHOAL_BIN:-}" ]; then
  shoal=$SHOAL_BIN
else
  cargo build --release -q -p shoal --manifest-path "$root/Cargo.toml"
  shoal="$root/target/release/shoal"
fi
cache=${SHOAL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/shoal}
model=${1:-$cache/models/SmolLM2-135M-Instruct.Q4_1.gguf}
[ -f "$model" ] || "$shoal" run --no-template -n 1 --temp 0 "hi" >/dev/null  # fetches the default model
llama=$("$root/../shared/peers/llama-cpp.sh")
