#!/usr/bin/env bash
# shoal's tokenizer against llama.cpp's on a real file, over a large mixed
# text (the licences Debian ships: English prose; Python sources: code,
# indentation, symbols): the token ids must be identical.
#
#   bench/tokenize-compare.sh [MODEL] [TEXT]     (default: qwen2.5-coder:1.5b)
set -euo pipefail
source "$(dirname "$0")/setup.sh" "${1:-qwen2.5-coder:1.5b}"
text=${2:-}
if [ -z "$text" ]; then
  text=$(mktemp)
  tmp_text=$text
  cat /usr/share/common-licenses/{GPL-3,Apache-2.0,MPL-2.0} > "$text"
  py=$(python3 -c 'import json, os; print(os.path.dirname(json.__file__))')
  cat "$py"/{__init__,decoder,encoder}.py >> "$text"
fi
# The text as an argument loses its trailing newlines: give llama.cpp the same.
trimmed=$(mktemp)
trap 'rm -f "$trimmed" "${tmp_text:-}"' EXIT
printf '%s' "$(cat "$text")" > "$trimmed"
ours=$("$shoal" tokenize -m "$model" "$(cat "$trimmed")")
# --no-escape: llama-tokenize otherwise turns \" and \n in the text into " and a newline.
theirs=$("$llama/llama-tokenize" -m "$model" -f "$trimmed" --ids --no-escape --log-disable 2>/dev/null)
python3 - "$ours" "$theirs" "$(wc -c < "$text")" <<'PY'
import ast, json, sys
a, b, size = json.loads(sys.argv[1]), ast.literal_eval(sys.argv[2]), sys.argv[3]
first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
if a == b:
    print(f"identical: {len(a)} tokens of a {size}-byte text")
else:
    print(f"DIFFERENT: shoal {len(a)} tokens, llama.cpp {len(b)}; first difference at token {first}")
    sys.exit(1)
PY
