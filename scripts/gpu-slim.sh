#!/usr/bin/env bash
# Makes this checkout light enough for a device run that carries the phi-serve bundle
# (scripts/gpu-bundle.sh), and back. A device run carries every tracked file plus the carried
# paths, 64 MiB in all, and the tracked tree alone is about 54 MiB. The fixtures only the CPU
# tests read (the quantization test model and its reference, 22 MB; the tokenizer test data)
# are taken out of git's index and ignored in .git/info/exclude: the files stay where they are,
# untracked, so the run leaves them behind. `off` puts them back in the index as HEAD has them.
#
# Never commit while it is on: the commit would delete those files. `status` says which it is.
#
# usage: scripts/gpu-slim.sh on|off|status|paths
set -euo pipefail
cd "$(dirname "$0")/.."

# What the GPU checks never read (cuda_parity skips its GGUF test without the first two).
paths=(
  models/tiny/phi3-mini-4k-q
  crates/engine/tests/reference/phi3-mini-4k-q
  crates/engine/tests/data
  crates/engine/tests/reference/tokenizer
)
marker=.git/phi-gpu-slim
exclude=.git/info/exclude
begin='# phi-serve gpu-slim: begin'
end='# phi-serve gpu-slim: end'

case "${1:-status}" in
  on)
    [ -f "$marker" ] && { echo "already on"; exit 0; }
    if ! git diff --quiet HEAD -- "${paths[@]}"; then
      echo "uncommitted changes under the paths: commit or restore them first" >&2
      exit 1
    fi
    git rm -r -q --cached -- "${paths[@]}"
    mkdir -p "$(dirname "$exclude")"
    { echo "$begin"; printf '/%s/\n' "${paths[@]}"; echo "$end"; } >>"$exclude"
    printf '%s\n' "${paths[@]}" >"$marker"
    echo "on: ${paths[*]} left out of the index (files kept); run '$0 off' after the device run"
    ;;
  off)
    [ -f "$marker" ] || { echo "already off"; exit 0; }
    git reset -q HEAD -- "${paths[@]}"
    sed -i "/^$begin\$/,/^$end\$/d" "$exclude"
    rm -f "$marker"
    git diff --quiet HEAD -- "${paths[@]}" || { echo "the paths differ from HEAD" >&2; exit 1; }
    echo "off: the index is as HEAD has it"
    ;;
  status)
    if [ -f "$marker" ]; then echo "on (do not commit)"; else echo "off"; fi
    ;;
  paths)
    printf '%s\n' "${paths[@]}"
    ;;
  *)
    echo "usage: $0 on|off|status|paths" >&2
    exit 2
    ;;
esac
