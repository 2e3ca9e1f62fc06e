#!/usr/bin/env bash
# Fill .gpu/ (git-ignored) with what a lent GPU machine lacks, for scripts/gpu_check.sh to run there: that machine
# has CUDA's PyTorch, numpy, pandas, pyarrow, rich, typer, sacrebleu and pytest but cannot reach PyPI, so tunelab's
# other dependencies travel as Python 3.12 wheels, at the versions this checkout's .venv runs (transformers and
# peft too: its image's are older). The default model (98 MB of GGUF) is over the 64 MiB a call may carry; its
# tokenizer travels alone and the GPU bench builds random-weight Llamas with it (bench/_random_model.py).
# bitsandbytes' CUDA wheel is too large as well, so QLoRA is not checked there.
#
#   scripts/gpu_prepare.sh       # here, after scripts/setup.sh; then the device tool's run with
#                                # carry [".gpu"] and command "bash scripts/gpu_check.sh"
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python

PINNED=(pydantic pydantic-core annotated-types typing-inspection transformers huggingface-hub tokenizers peft
        accelerate trl datasets dill multiprocess fsspec gguf platformdirs nltk fastapi starlette uvicorn
        typing-extensions httpx2 httpcore2 truststore h11 anyio idna hf-xet kernels tomlkit
        openai jiter sniffio httpx httpcore certifi)  # the last six: the serving test's OpenAI client
OPTIONAL=(liger-kernel)  # not a tunelab dependency: gpu_check.sh reports whether it imports there

rm -rf .gpu && mkdir -p .gpu/wheels
specs=()
for name in "${PINNED[@]}"; do
    specs+=("$name==$($PY -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")")
done
download() {
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .gpu/wheels "$@"
}
download "${specs[@]}"
download "${OPTIONAL[@]}" || echo "gpu_prepare: ${OPTIONAL[*]} not downloaded; gpu_check.sh runs without it" >&2
# rouge-score is published as a source archive only: build its (pure-Python) wheel here
$PY -m pip wheel -q --no-deps -w .gpu/wheels "rouge-score==$($PY -c "import importlib.metadata as m; print(m.version('rouge-score'))")"

$PY - <<'EOF'
from transformers import AutoTokenizer

from tunelab.models.resolve import resolve_model

AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct")).save_pretrained(".gpu/tokenizer")
EOF
du -sh .gpu
size=$(du -sm .gpu | cut -f1)
if [ "$size" -ge 60 ]; then
    echo "gpu_prepare: .gpu holds ${size} MiB; a device call carries 64 MiB with the working tree" >&2
    exit 1
fi
