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
[ -f "$model" ] || [ -n "${1:-}" ] || "$shoal" run --no-template -n 1 --temp 0 "hi" >/dev/null  # fetches the default model
# A model's name (qwen2.5-coder:1.5b): fetched on first use, then its path.
if [ ! -f "$model" ]; then
  "$shoal" run -m "$model" --no-template -n 1 --temp 0 "hi" >/dev/null
  model=$("$shoal" list --json | python3 -c "import json,sys
want=sys.argv[1].removesuffix(':latest').lower()
for l in sys.stdin:
    e=json.loads(l)
    if e['name'].lower()==want: print(e['path']); break" "$model")
  [ -f "$model" ] || { echo "no model file for ${1}" >&2; exit 1; }
fi
llama=$("$root/../shared/peers/llama-cpp.sh")
