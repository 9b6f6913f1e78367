#!/usr/bin/env bash
# The training step compiled by inductor, timed on one H100/H200 with a compile budget no
# earlier device slot had (each gave it 105-140 s, and it never finished): <= 540 s of command.
# Inductor fuses the norms, GEGLU, casts and residual adds that bound the eager step
# (RESULTS.md, issue 7: the eager path with the Triton kernels is bounded near 37 % MFU), so
# this is the run that says how far a compiled step is from the 40 % target.
# COMPILE=regional (default): each res-block, temporal conv and attention block compiled apart
# (train.compile: regional; the base U-Net's 93 blocks are 33 distinct graphs), which compiled
# in half the time of the whole U-Net on a 2-core CPU (292 s against 592 s, RESULTS.md), so it
# is the one that fits a device slot; COMPILE=full: the whole U-Net (train.compile: true, as
# pipelines/t2v-base.yaml trains), for a call with the budget of its own.
# With ATTENTION_BENCH=1 the attention benchmark runs first (~30 s) so that temporal attention
# takes the short-sequence Triton kernel under compile too where it beat flash (its custom ops
# keep it in the graph); off by default: the compile needs every second a call has (it did not
# finish in 282 s on an H100, 2026-11-28).
#   OUT=./bench_out bash benchmarks/gpu_compile.sh       (BUDGET=540, COMPILE=regional by default)
# Writes $OUT/t2v_compile.json (compile_s, step_s, MFU, peak memory, GPU ms by kernel kind;
# while compiling, every 20 s: dynamo graphs, inductor compiles, cache hits -- a compile cut
# short says how far it got) and $OUT/t2v_profile_compiled.hdvg.txt. Needs the repo and the
# .whl/ carry of gpu_all.sh.
# The compile carries over between device calls: torch.compile's cache artifacts (inductor's
# graphs with their Triton binaries, AOT autograd's) load from .compile_cache/ (git-ignored;
# add it to `run`'s carry) before compiling, and what this call adds, also when its timeout
# cuts it short, comes back in $OUT as compile-*.bin.gz.partNN (15 MiB pieces: $OUT's
# files come back at 16 MiB at most). Put them back before the next call:
#   bash benchmarks/gpu_compile_cache.sh FILES_AT
# The artifacts are keyed on torch, Triton and the GPU: an image with other versions misses.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./bench_out}"
BUDGET="${BUDGET:-540}"
COMPILE="${COMPILE:-regional}"  # regional | full
mkdir -p "$OUT"
source benchmarks/gpu_env.sh "av, diffusers, webdataset"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
nproc
# ~10 s: the trainer's per-step inputs and EMA queue on the GPU without a host sync
timeout 40 python3 -m pytest -q -p no:cacheprovider tests/t2v/test_gpu.py -k host_sync 2>&1 | tail -2
# every attention call of the step under each backend (~30 s): under compile only a "triton"
# pick holds (the short-sequence kernel is a custom op inductor calls as it is; the SDPA
# choice is inductor's), so the compiled step takes the kernel where it won
# (only when asked: the compile gets those seconds otherwise)
if [ "${ATTENTION_BENCH:-0}" = 1 ]; then
  timeout 45 python3 benchmarks/bench_attention.py --batch 4 --json "$OUT/t2v_attention.json" \
    2>&1 | tail -2 || echo "attention bench failed or timed out: rc=$?"
fi
ATTN=$(python3 -c "import json,sys; a=json.load(open(sys.argv[1]))['attention_backends']
print(','.join(x for x in a.split(',') if x.endswith('=triton')))" "$OUT/t2v_attention.json" 2>/dev/null)
echo "compile: $COMPILE; attention under compile: ${ATTN:-SDPA everywhere, as inductor picks}"
CCACHE=.compile_cache  # not CACHE: gpu_caption.sh reads that one (caption.cache)
mkdir -p "$CCACHE"
echo "compile cache: $(ls "$CCACHE" | grep -c 'bin.gz$') file(s), $(du -sh "$CCACHE" | cut -f1)"
touch "$OUT/.started"
left=$((BUDGET - SECONDS - 20))
# start-up + FLOP count ~25 s, compile up to what is left less ~60 s for 5 timed + 2 profiled
# steps and the JSON; ~10 s at the end to hand back what the compile added
timeout "$left" python3 benchmarks/bench_t2v.py model --batch 4 --steps 5 --warmup 1 \
  --compile "$COMPILE" --compile-timeout $((left - 60)) --json "$OUT/t2v_compile.json" \
  --compile-cache "$CCACHE" ${ATTN:+--attention-backends "$ATTN"} \
  --profile "$OUT/t2v_profile_compiled" || echo "compiled bench failed or timed out: rc=$?"
for f in $(find "$CCACHE" -name '*.bin.gz' -newer "$OUT/.started"); do
  split -b 15m -d "$f" "$OUT/$(basename "$f").part" && echo "compile cache back: $f ($(du -h "$f" | cut -f1))"
done
rm -f "$OUT/.started"
echo "results: $OUT/t2v_compile.json (${SECONDS}s)"
cat "$OUT/t2v_compile.json" 2>/dev/null
