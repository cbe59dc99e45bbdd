#!/usr/bin/env bash
# A/B of bench.mixed_step on the GPU: this tree against an older commit's, in one device call, so that
# both run on the same card. Here, first (the checkout travels without .git; _ab_old travels as an
# untracked folder):
#   rm -rf _ab_old && mkdir _ab_old && git archive <old-sha> | tar -x -C _ab_old
# then through the device tool:
#   NEW=<this sha> OLD=<old sha> [TESTS=0] bash bench/ab_mixed_step.sh
# Runs the GPU tests of the mixed step's row kernels, the K/V write, prefill attention and SGMV kernels,
# then chunk steps of 22 decodes beside 512-token prompts in 256-token chunks: new, old, and new with
# every step's kernels on rows in place (--rows-in-place all: the decode-only steps too).
set -u
: "${OUT:?run through the device tool, which sets OUT}"
export PYTHONUNBUFFERED=1
marker=$(mktemp)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import jax; print(jax.__version__, jax.devices())"
if [ "${TESTS:-1}" = 1 ]; then  # TESTS=0 skips them (~200 s of compiles on the H200)
  echo "== GPU kernel tests (new)"
  python3 -m pytest -q -x tests/test_mixed_rows.py tests/test_paged_attention_kernel.py tests/test_lora_kernels.py \
    -k "rows or write_kv or prefill or sgmv or decode" 2>&1 | tail -3
fi
mix() {  # tree tag args...
  local tree=$1 tag=$2; shift 2
  echo "== $tree $tag $*"
  (cd "$tree" && timeout 200 python3 -m bench.mixed_step --tag="-$tag" "$@" 2>&1 | grep -vE "Warning|warn\(" | tail -22)
  find "$tree/bench/results" -name "mixed-step-$tag-*" -newer "$marker" -exec cp {} "$OUT/" \;
}
A=(--decodes 22 --prompt 512 --prompts 4)
JLORA_COMMIT=${NEW:-new} mix . new256 "${A[@]}" --chunk 256
JLORA_COMMIT=${OLD:-old} mix _ab_old old256 "${A[@]}" --chunk 256
JLORA_COMMIT=${NEW:-new} mix . new256all "${A[@]}" --chunk 256 --rows-in-place all
