#!/usr/bin/env bash
# The whole GPU check, in one call of under 7 minutes on one H100 or H200. Through the device
# tool (its machine has torch, transformers, accelerate and peft, but not pydantic):
#
#   here, once:  echo /.whl/ >> .git/info/exclude
#                python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#                  --implementation cp --platform manylinux_2_17_x86_64 -d .whl \
#                  pydantic pydantic-core annotated-types typing-inspection
#   run:         bash benchmarks/gpu.sh        (carry: .whl)
#
# Writes its records under $OUT (the device tool's) or benchmarks/results/gpu-<date>/, each
# with the device and date: `tests/test_gpu.py` (FSDP2, and ZeRO-3 where DeepSpeed is installed,
# through `sts train` on one GPU with the skipper on, on NCCL, never gathering a skipped layer;
# proportional attention and deep cuts on SDPA and FlexAttention), and `sts bench` of the demo
# recipes' stages at LLaVA-1.5-7B and LLaVA-NeXT-7B (anyres) shapes, profiled. Proportional
# attention's cost per kernel is `benchmarks/attention.py` (35 s; last run 2026-11-28).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-$(date +%F)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src  # absolute: the tests launch processes elsewhere
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
started=$SECONDS
step() {  # step NAME SECONDS COMMAND...: one part, bounded, its output kept; a failure does not stop the rest
    local name=$1 limit=$2
    shift 2
    echo "== $name (at $((SECONDS - started)) s)"
    timeout "$limit" "$@" 2>&1 | grep -v "it/s]" | tee "$OUT/$name.log"
    echo "== $name: exit ${PIPESTATUS[0]}"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    date -u +%FT%TZ
} | tee "$OUT/device.txt"

# Each step is bounded so that the whole stays under 6 minutes (about 360 s of steps). Lengths are
# drawn LLaVA-665K-like and batched by length as LLaVA's padded training groups them
# (`sts.cli.bench.build_rounds`), in padded batches on SDPA (packing needs FlashAttention's varlen or
# FlexAttention; deep cuts need padded batches). The shipped demo recipes' stages at 7B shapes:
# sts-max's (LLaVA-1.5-7B, all 32 layers, batch 16, with and without a deep cut) and sts-tiles'
# (LLaVA-NeXT-7B, 16 layers: an anyres alignment batch of 8 with all 32 layers' activations would
# not fit), each setting's last step profiled (the busiest operations, and how long the device was
# busy). Qwen2.5-VL-7B (`--preset qwen2.5-vl-7b`) did not fit in a minute.
step gpu-tests 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py
step bench-b16-sdpa 130 python3 -m sts.cli bench --preset llava-1.5-7b --batch 16 --steps 4 --warmup 2 --profile \
    --settings align,align+pool0.0625,instruct,instruct+pool0.25,instruct+pool0.25+deep,instruct+sts-off --out "$OUT"
step bench-next-b8-sdpa 80 python3 -m sts.cli bench --preset llava-next-7b --batch 8 --layers 16 --steps 3 --profile \
    --warmup 2 --settings align,align+tiles,instruct,instruct+tiles,instruct+tiles+deep --out "$OUT"
echo "== done in $((SECONDS - started)) s; records in $OUT"
