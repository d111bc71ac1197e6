#!/usr/bin/env bash
# Issue 4 c): bench_serving, random 1024 in / 1024 out, 256 prompts all at once, one server per attention backend,
# Llama-3.1-8B configuration with dummy bf16 weights. Results: one JSON line per backend in OUT_DIR/serving.jsonl.
#   usage: benchmark/bench_serving_backends.sh OUT_DIR [BACKEND ...]     ("default" = no --attention-backend;
#          a ":sync" suffix, e.g. default:sync, adds --disable-overlap-schedule)
# The config directory has no tokenizer: a word-level one with one token per id stands in (prompts are ids and
# outputs only need to decode; see benchmark/engine_utils.py:synthetic_tokenizer).
set -u
out=${1:?usage: bench_serving_backends.sh OUT_DIR [BACKEND ...]}; shift
backends=${*:-default triton flashinfer fa3}
model=${MODEL:-benchmark/configs/llama-3.1-8b}
port=${PORT:-30123}
tok=$(python -c "
import shutil, sys; sys.path.insert(0, '.')
from benchmark.engine_utils import synthetic_tokenizer
from sglx.srt.configs.model_config import ModelConfig
p = synthetic_tokenizer(ModelConfig.from_path('$model').vocab_size)
shutil.copytree(p, '/tmp/sglx_bench_tokenizer', dirs_exist_ok=True); print('/tmp/sglx_bench_tokenizer')")
for b in $backends; do
  name=${b%%:*}; args=(); [ "$name" != default ] && args=(--attention-backend "$name")
  [ "$b" != "${b%:sync}" ] && args+=(--disable-overlap-schedule)
  tag=${b/:/-}
  python -m sglx.launch_server --model-path "$model" --load-format dummy --tokenizer-path "$tok" --port "$port" \
    "${args[@]}" > "$out/server_$tag.log" 2>&1 &
  pid=$!
  python -c "
import sys, time, requests
for _ in range(900):
    try:
        if requests.get('http://127.0.0.1:$port/health', timeout=1).ok: sys.exit(0)
    except Exception: pass
    time.sleep(1)
sys.exit(1)" || { echo "[$b] server did not start"; tail -5 "$out/server_$tag.log"; kill $pid; continue; }
  python -m sglx.bench_serving --backend sglx --port "$port" --dataset-name random-ids --random-input-len "${ILEN:-1024}" \
    --random-output-len "${OLEN:-1024}" --random-range-ratio 1 --num-prompts "${NUM:-256}" --request-rate inf --tokenizer "$tok" \
    --output-file "$out/serving.jsonl" > "$out/bench_$tag.log" 2>&1
  echo "== $b"; grep -E "Successful|Output token throughput|Median (TTFT|TPOT|ITL)" "$out/bench_$tag.log"
  kill -INT $pid; wait $pid
done
