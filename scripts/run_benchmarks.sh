#!/usr/bin/env bash
# Reproduces the README's tables and plots into docs/figures/ (run on a quiet machine: timings are shared-CPU sensitive).
set -euo pipefail
cd "$(dirname "$0")/.."
out=docs/figures
mkdir -p "$out"
s=.venv/bin/streamllm
books=../shared/data/books
last() { tail -n 1 "$1.log" > "$1.json"; }

if [ "${1:-all}" = all ] || [ "$1" = ppl ]; then
  for book in pride_and_prejudice kalevala; do
    $s eval ppl --text "$books/$book.txt" --modes dense,window,sink,recompute --sinks 4 --window 252 \
      --max-tokens 2000 --recompute-chunk 16 --json --plot "$out/ppl_$book.png" | tee "$out/ppl_$book.log"
    last "$out/ppl_$book"
    # the paper's cache size; chunked evaluation is exact for these three modes (see eval ppl --help)
    $s eval ppl --text "$books/$book.txt" --modes dense,window,sink --sinks 4 --window 1020 \
      --max-tokens 2000 --chunk 32 --json --plot "$out/ppl_${book}_w1020.png" | tee "$out/ppl_${book}_w1020.log"
    last "$out/ppl_${book}_w1020"
  done
fi
if [ "${1:-all}" = all ] || [ "$1" = engine ]; then
  # the README's A/B: eager (STREAMLLM_FUSED=0) and fused, per precision; the default is fused int4
  for cfg in eager_int8 eager_int4 fused_int4 fused_int8 fused_dense; do
    fused=1 plot=""
    if [ "${cfg%%_*}" = eager ]; then fused=0; fi
    if [ "$cfg" = fused_int4 ]; then plot="--plot $out/decode_fused.png"; fi
    # shellcheck disable=SC2086  # $plot is empty or two words
    STREAMLLM_FUSED=$fused $s bench decode --batch-sizes 1,16,32 --tokens 128 --window 1020 \
      --weights "${cfg#*_}" --json $plot | tee "$out/decode_ab_$cfg.log"
    last "$out/decode_ab_$cfg"
  done
  $s bench latency --cache-sizes 256,512,1024 --json --plot "$out/latency.png" | tee "$out/latency.log"
  last "$out/latency"
  $s bench memory --tokens 20000 --json --plot "$out/memory.png" | tee "$out/memory.log"
  last "$out/memory"
fi
if [ "${1:-all}" = all ] || [ "$1" = peer ]; then
  # llama.cpp's llama-server and streamllm, one after the other, same GGUF and clients
  .venv/bin/python scripts/bench_vs_llama.py --out "$out/vs_llama"
fi
if [ "${1:-all}" = all ] || [ "$1" = serve ]; then
  # 32 slots so that 32 concurrent streams all decode at once
  export STREAMLLM_ENGINE__CACHE__NUM_SLOTS=32
  $s bench serve --concurrency 1,4,16,32 --max-tokens 128 --json --plot "$out/serve.png" | tee "$out/serve.log"
  last "$out/serve"
  # the engine benchmark's cache (4+252), for a like-for-like HTTP overhead figure
  STREAMLLM_ENGINE__CACHE__WINDOW=252 $s bench serve --concurrency 1,4,16,32 --max-tokens 128 --json \
    --plot "$out/serve_w252.png" | tee "$out/serve_w252.log"
  last "$out/serve_w252"
  STREAMLLM_ENGINE__DTYPE=bfloat16 $s bench serve --concurrency 1,16,32 --max-tokens 128 --json \
    | tee "$out/serve_bf16.log"
  last "$out/serve_bf16"
fi
if [ "${1:-all}" = all ] || [ "$1" = multiturn ]; then
  $s bench multiturn --turns 30 --json --plot "$out/multiturn.png" | tee "$out/multiturn.log"
  last "$out/multiturn"
fi
if [ "${1:-all}" = all ] || [ "$1" = quality ]; then
  # one thread per process: on 2 shared cores two torch threads wait on each other at every small op
  export OMP_NUM_THREADS=1
  # perplexity per 10K tokens over the three books as one stream (drop --max-tokens for all ~544K)
  $s eval ppl --text "$books/pride_and_prejudice.txt" "$books/frankenstein.txt" "$books/kalevala.txt" \
    --modes sink --sinks 4 --window 1020 --max-tokens 100000 --chunk 256 --bucket 10000 --json \
    --plot "$out/ppl_long.png" | tee "$out/ppl_long.log"
  last "$out/ppl_long"
  $s eval ppl --text "$books/pride_and_prejudice.txt" --modes window --sinks 4 --window 1020 --max-tokens 20000 \
    --chunk 256 --bucket 10000 --json --plot "$out/ppl_window_20k.png" | tee "$out/ppl_window_20k.log"
  last "$out/ppl_window_20k"
  $s eval streameval --modes sink,window,dense,recompute --lines 500 --lag 1 --every 10 --recompute-lines 150 \
    --sinks 4 --window 1020 --group 5 --json --plot "$out/streameval_lag1.png" | tee "$out/streameval_lag1.log"
  last "$out/streameval_lag1"
  $s bench endless --turns 2000 --words 70 --max-tokens 12 --span 100 --json --plot "$out/endless.png" \
    | tee "$out/endless.log"
  last "$out/endless"
fi
