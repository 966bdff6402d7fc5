#!/bin/sh
# Here, before a GPU check: put into gpu-carry/ (git-ignored, a few MB) what the lent GPU machine lacks and cannot
# download (it has no network): wheels for Python 3.12 of deltatune's dependencies its image does not hold, at
# the versions this venv has, and SmolLM2's tokenizer files. Then: run(command="sh scripts/gpu_check.sh",
# carry=["gpu-carry"]).
set -eu
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=gpu-carry
rm -rf "$OUT" && mkdir -p "$OUT/wheels"
# Not in the GPU image (the device tool's KINDS.md lists what is).
PACKAGES="pydantic pydantic-core annotated-types typing-inspection gguf pypdf jsonschema jsonschema-specifications
referencing rpds-py datasets dill multiprocess"
SPECS=""
for name in $PACKAGES; do
  version=$($PY -m pip show "$name" | sed -n 's/^Version: //p')
  SPECS="$SPECS $name==$version"
done
# shellcheck disable=SC2086
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  -d "$OUT/wheels" $SPECS
$PY - <<'PY'
import sys
sys.path.insert(0, "src")
from transformers import AutoTokenizer
from deltatune.model.load import resolve
AutoTokenizer.from_pretrained(resolve("smollm2-135m-instruct")).save_pretrained("gpu-carry/smollm2-tokenizer")
PY
du -sh "$OUT"
