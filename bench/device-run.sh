#!/bin/bash
# The H200 measurements issue 7 still owes, in phases of under 10 minutes each (the device tool's limit per call).
# On the development machine: `npm ci && ../shared/gpu/pack` once; then a device call with carry [".device"] and the
# command `bash bench/device-run.sh PHASE` (PHASE: decode, extras, attention, serve, sweep, tests). Each phase writes its full output
# under $OUT and prints a short summary at the end (what the device tool shows).
#   decode     GQA and MLA int8 decode at 32 and 64 sequences, one step at a time against pipelined steps (~5 min)
#   extras     MLA decode with the tiled head products from 16 rows; GQA at 32 drawing sampled tokens on the GPU; the
#              pick kernel alone for every sampling path (~4 min)
#   dot4       the dot4 MLA kernel (int8Products 'dot4') against the f32 one and GQA: attention at 8 and 32 rows × 512,
#              4K and 16K; MLA decode at 8 and 32 sequences with each, profiled (~5 min)
#   heads      MLA decode (dot4 attention) with the W_UK / W_UV decode kernel at 8 and 32 k slices (default 16) and with
#              the staged kernel (--mla-head-kernel staged), profiled (~4 min); HEAD_VARIANTS="kernel-staged kernel-w8a8"
#              times the W8A8 head products against the default, then runs their tests (tensor cores against dot4);
#              a variant front-N runs the decode front (RoPE, latent write, W_UK and the query quantizer in one dispatch)
#              in steps of up to N rows (0: off), back-N the decode back (merge and W_UV), both-N the two; prefill-w8a8
#              the W8A8 head products in prompt chunks (the profile's 512-row prefill chunk)
#   prefetch   the dot4 MLA kernel with the next window prefetched into registers (and its value heads in 2 rounds)
#              against the default: attention at 8 / 32 rows × 512 / 4K and a 512-token prompt; MLA decode at 8 and 32
#              sequences with each and with the staged head kernel, and GQA, profiled (~6 min; PREFETCH_RUNS picks
#              the decode runs, prefetch:rounds:head-kernel)
#   warp       the dot4 MLA kernel with its softmax inside the score warps (subgroup reductions, one barrier a window;
#              64-token windows with the query from storage, or 32 with it staged) against the default: attention at
#              8 / 32 rows × 512 / 4K and a 512-token prompt, MLA decode at 8 and 32 sequences profiled (~4 min;
#              WARP_RUNS picks the decode runs, softmax:window)
#   three      the three-pass MLA kernels (scores, softmax, values: int8Products 'three-pass') against the one-pass dot4
#              kernel and GQA: attention at 8 / 32 rows × 512 / 4K and a 512-token prompt (tensor-core scores, values or
#              both, 4 latent parts, 32-token windows, 64-token score tiles; THREE_FORMS picks), GQA (THREE_DECODE
#              without gqa skips it; none skips the decodes) and MLA decode at 8 and 32 sequences with dot4 and with the
#              three passes, profiled (~5 min; THREE_FLAGS replaces the three-pass run's bench:decode flags, default
#              --mla-3pass-products scores)
#   chunks     MLA decode with the smallest split chunk at 16 and 32 tokens (default 64; chosen when the merge was 28 µs a
#              layer): f32 attention at both, dot4 at 32 (~4 min)
#   goals      issue 7's two open goals in one call when the device is scarce (~6 min): attention 8/32 × 512/4K with the
#              fast int8 forms and prefill 512; GQA and MLA decode at 8 and 32 sequences, MLA f32 against dot4 products
#              (profiled, with a profiled 512-row prompt step each);
#              served MLA (dot4) against GQA at 600 MiB, max-num-batched-tokens 512
#   attention  MLA attention forms at 32 × 512 and 32 × 4K, and the tensor-core score-phase dump check (~3 min)
#   serve      served MLA vs GQA at KV budgets of 600 and 256 MiB, with step traces (~6 min); a run "600MiB:on:512:dot4"
#              serves the MLA model with --mla-int8-attention dot4; "256MiB:on:512:dot4:128:512" a decode-heavy load (48
#              requests of 128 prompt + 512 output tokens; default 512 + 128); a seventh field sets --mla-head-kernel
#   sweep      the tensor-core GEMM grid at 32 and 64 rows for the four Qwen2.5-7B projections (~6 min)
#   flash      the one-pass tensor-core MLA kernel (int8Products 'flash': both products on i8 subgroup matrices, the cache
#              read from storage) on the device: bench/flash-dump.ts (its value tiles and operands against the host), its
#              test against the float64 model, then attention at 8 / 32 rows ×
#              512 / 4K / 16K and a 512-token prompt, 32-token blocks, against the dot4 kernel and GQA, and against its
#              own dot4 form (FLASH_FORMS, FLASH_CONTEXTS, FLASH_PREFILL trim it; ~4 min)
#   flash2     the flash kernel's device tests and the served --mla-int8-attention flash test (the models from
#              .device/models: cp -r ../shared/models/stories260K .device/models/ before the call), then the flash kernel
#              against its timing probes at 8 / 32 × 4K: its loads at a tile-by-tile block layout's addresses (scores,
#              values, both: int8FlashTiledProbe) and its skeleton without products (~2 min)
#   tests      the int8 and MLA kernel tests on the H200, where the W8A8 products run on tensor cores (~3 min)
set -u
phase=${1:?usage: bench/device-run.sh decode|extras|dot4|goals|heads|prefetch|warp|three|chunks|attention|flash|flash2|serve|sweep|tests}
OUT=${OUT:-/tmp/device-run}
mkdir -p "$OUT"
source .device/enter.sh >/dev/null 2>&1
# The tests that open ../shared/models find them where .device/models carries a copy (the device has no ../shared).
[ -d ../shared/models ] || [ ! -d .device/models ] || { mkdir -p ../shared && cp -r .device/models ../shared/; }
t0=$(date +%s)
el() { echo "[$(($(date +%s) - t0))s] $*" | tee -a "$OUT/log.txt"; }
summary() { grep -v '^\s*$' "$1" | grep -v "^peers\|B/token\|^KV capacity" | tail -n "$2"; }
# attention_forms TAG FORMS: bench/attention.ts at 8 / 32 rows × 512 / 4K and a 512-token prompt over the MLA int8 forms.
attention_forms() {
  el "attention-$1"
  timeout 150 node --import tsx bench/attention.ts --batches 8,32 --contexts 512,4096 --variants default --prefill 512 \
    --mla-int8 "$2" --json "$OUT/attention-$1.json" >"$OUT/attention-$1.txt" 2>"$OUT/attention-$1.err"
  el "rc=$?"
}
# mla_decode TAG FLAGS…: MLA decode (dot4 attention) at 8 and 32 sequences, profiled, with extra bench:decode flags.
mla_decode() {
  local tag=$1
  shift
  el "decode-mla-$tag"
  timeout 100 node --import tsx bench/decode.ts --models qwen2.5-7b-mla --weight-dtype int8 --kv-cache-dtype int8 --batches 8,32 \
    --contexts 512 --warmup 20 --steps 32 --logits argmax --pipeline on --profile --mla-int8-products dot4 "$@" \
    --json "$OUT/decode-mla-$tag.json" >"$OUT/decode-mla-$tag.txt" 2>&1
  el "rc=$?"
}

case "$phase" in
decode)
  el gqa
  timeout 200 node --import tsx bench/decode.ts --models qwen2.5-7b --weight-dtype int8 --batches 32,64 --contexts 512 \
    --warmup 30 --steps 64 --logits argmax --pipeline off,on --json "$OUT/decode-gqa.json" >"$OUT/decode-gqa.txt" 2>"$OUT/decode-gqa.err"
  el "rc=$?"
  el mla
  timeout 200 node --import tsx bench/decode.ts --models qwen2.5-7b-mla --weight-dtype int8 --kv-cache-dtype int8 --batches 32,64 \
    --contexts 512 --warmup 30 --steps 64 --logits argmax --pipeline off,on --json "$OUT/decode-mla.json" >"$OUT/decode-mla.txt" 2>"$OUT/decode-mla.err"
  el "rc=$?"
  summary "$OUT/decode-gqa.txt" 7
  summary "$OUT/decode-mla.txt" 5
  grep -h "prefilled" "$OUT/decode-gqa.err" "$OUT/decode-mla.err" "$OUT/decode-gqa.txt" "$OUT/decode-mla.txt" | cut -c1-200
  tail -n 3 "$OUT/decode-gqa.err" "$OUT/decode-mla.err"
  ;;
extras)
  el mla-head-tiled
  # The same MLA steps with the tiled W_UK / W_UV kernel from 16 rows on (default: from 128): which is faster at 32 / 64.
  timeout 200 node --import tsx bench/decode.ts --models qwen2.5-7b-mla --weight-dtype int8 --kv-cache-dtype int8 --batches 32,64 \
    --contexts 512 --warmup 30 --steps 64 --logits argmax --pipeline on --mla-head-tiled-from 16 --json "$OUT/decode-mla-tiled.json" \
    >"$OUT/decode-mla-tiled.txt" 2>"$OUT/decode-mla-tiled.err"
  el "rc=$?"
  el gqa-sample
  # The same 32-sequence step drawing its tokens on the GPU (temperature 0.8, top-k 50, top-p 0.95): the pick kernel's cost.
  timeout 120 node --import tsx bench/decode.ts --models qwen2.5-7b --weight-dtype int8 --batches 32 --contexts 512 \
    --warmup 30 --steps 64 --logits sample --pipeline on --json "$OUT/decode-gqa-sample.json" >"$OUT/decode-gqa-sample.txt" 2>"$OUT/decode-gqa-sample.err"
  el "rc=$?"
  # The pick kernel alone, 32 rows × 152064, every sampling path, against the host's sampleNext.
  timeout 120 node --import tsx bench/sampler.ts --gpu >"$OUT/sampler.txt" 2>&1
  summary "$OUT/decode-mla-tiled.txt" 3
  summary "$OUT/decode-gqa-sample.txt" 3
  tail -n 16 "$OUT/sampler.txt"
  ;;
dot4)
  el attention-dot4
  # The dot4 forms, the f32 kernel over int8 and GQA (f16 and int8) at the served batch sizes and the goal's contexts.
  timeout 240 node --import tsx bench/attention.ts --batches 8,32 --contexts 512,4096,16384 --variants default --prefill 512,2048 \
    --mla-int8 fast --json "$OUT/attention-dot4.json" >"$OUT/attention-dot4.txt" 2>"$OUT/attention-dot4.err"
  el "rc=$?"
  for products in off dot4; do
    el "decode-mla-$products"
    timeout 150 node --import tsx bench/decode.ts --models qwen2.5-7b-mla --weight-dtype int8 --kv-cache-dtype int8 --batches 8,32 \
      --contexts 512 --warmup 20 --steps 32 --logits argmax --pipeline on --profile --mla-int8-products "$products" \
      --json "$OUT/decode-mla-$products.json" >"$OUT/decode-mla-$products.txt" 2>"$OUT/decode-mla-$products.err"
    el "rc=$?"
  done
  grep -A40 "^MLA over int8 cache" "$OUT/attention-dot4.txt" | head -n 40
  grep -A3 "^prefill (1 prompt)" "$OUT/attention-dot4.txt"
  tail -n 3 "$OUT/attention-dot4.err"
  for products in off dot4; do
    echo "== MLA decode, attention products $products"
    summary "$OUT/decode-mla-$products.txt" 4
    grep -i "attention" "$OUT/decode-mla-$products.txt" | head -n 6
    tail -n 2 "$OUT/decode-mla-$products.err"
  done
  ;;
goals)
  el attention-goals
  timeout 150 node --import tsx bench/attention.ts --batches 8,32 --contexts 512,4096 --variants default --prefill 512 \
    --mla-int8 dot4,off --json "$OUT/attention-goals.json" >"$OUT/attention-goals.txt" 2>"$OUT/attention-goals.err"
  el "rc=$?"
  el decode-gqa
  timeout 100 node --import tsx bench/decode.ts --models qwen2.5-7b --weight-dtype int8 --kv-cache-dtype int8 --batches 8,32 \
    --contexts 512 --warmup 10 --steps 16 --logits argmax --pipeline on --profile --json "$OUT/decode-gqa.json" >"$OUT/decode-gqa.txt" 2>&1
  el "rc=$?"
  for products in off dot4; do
    el "decode-mla-$products"
    timeout 100 node --import tsx bench/decode.ts --models qwen2.5-7b-mla --weight-dtype int8 --kv-cache-dtype int8 --batches 8,32 \
      --contexts 512 --warmup 10 --steps 16 --logits argmax --pipeline on --profile --mla-int8-products "$products" \
      --json "$OUT/decode-mla-$products.json" >"$OUT/decode-mla-$products.txt" 2>&1
    el "rc=$?"
  done
  SERVE_RUNS=${SERVE_RUNS:-600MiB:on:512:dot4} bash "$0" serve
  grep -A24 "^MLA over int8 cache" "$OUT/attention-goals.txt" | head -n 24
  grep -A3 "^prefill (1 prompt)" "$OUT/attention-goals.txt"
  tail -n 3 "$OUT/attention-goals.err"
  echo "== GQA decode"
  summary "$OUT/decode-gqa.txt" 4
  grep -A10 "prefill chunk" "$OUT/decode-gqa.txt"
  for products in off dot4; do
    echo "== MLA decode, attention products $products"
    summary "$OUT/decode-mla-$products.txt" 4
    grep -i "attention\|merge" "$OUT/decode-mla-$products.txt" | head -n 6
    grep "prefilled" "$OUT/decode-mla-$products.txt" | cut -c1-200
    grep -A10 "prefill chunk" "$OUT/decode-mla-$products.txt"
  done
  ;;
heads)
  # The W_UK / W_UV decode kernel: 8 and 32 k slices (default 16), and the staged kernel.
  for variant in ${HEAD_VARIANTS:-slices-8 slices-32 kernel-staged}; do
    flag="--mla-head-${variant%%-*} ${variant#*-}"
    [[ $variant == front-* ]] && flag="--mla-front-rows ${variant#front-}"
    [[ $variant == back-* ]] && flag="--mla-back-rows ${variant#back-}"
    [[ $variant == both-* ]] && flag="--mla-front-rows ${variant#both-} --mla-back-rows ${variant#both-}"
    el "decode-mla-heads-$variant"
    timeout 150 node --import tsx bench/decode.ts --models qwen2.5-7b-mla --weight-dtype int8 --kv-cache-dtype int8 --batches 8,32 \
      --contexts 512 --warmup 20 --steps 32 --logits argmax --pipeline on --profile --mla-int8-products dot4 $flag \
      --json "$OUT/decode-mla-heads-$variant.json" >"$OUT/decode-mla-heads-$variant.txt" 2>"$OUT/decode-mla-heads-$variant.err"
    el "rc=$?"
  done
  for variant in ${HEAD_VARIANTS:-slices-8 slices-32 kernel-staged}; do
    echo "== MLA decode, dot4 attention, head products: $variant"
    summary "$OUT/decode-mla-heads-$variant.txt" 4
    grep "head-matmul\|decode front\|decode back\|merge\|int8 query\|latent write\|rope\|dispatches" "$OUT/decode-mla-heads-$variant.txt" | head -n 24
    tail -n 2 "$OUT/decode-mla-heads-$variant.err"
  done
  if [[ " ${HEAD_VARIANTS:-} " == *" kernel-w8a8 "* ]]; then
    timeout 120 node --import tsx --test --test-reporter=spec test/mla-head-w8a8.test.ts >"$OUT/tests-head-w8a8.txt" 2>&1
    grep "^✔\|^✖\|^ℹ \(pass\|fail\)" "$OUT/tests-head-w8a8.txt" | cut -c1-200
  fi
  ;;
prefetch)
  attention_forms prefetch "dot4,dot4 prefetch,dot4 prefetch q-storage,dot4 prefetch v2,off"
  for run in ${PREFETCH_RUNS:-off:1:sliced on:1:sliced on:2:sliced on:1:staged}; do
    IFS=: read -r prefetch rounds heads <<<"$run"
    mla_decode "prefetch-$prefetch-v$rounds-$heads" --mla-dot4-prefetch "$prefetch" --mla-dot4-value-rounds "$rounds" --mla-head-kernel "$heads"
  done
  el decode-gqa
  timeout 100 node --import tsx bench/decode.ts --models qwen2.5-7b --weight-dtype int8 --kv-cache-dtype int8 --batches 8,32 \
    --contexts 512 --warmup 20 --steps 32 --logits argmax --pipeline on --profile --json "$OUT/decode-gqa.json" >"$OUT/decode-gqa.txt" 2>&1
  el "rc=$?"
  grep -A28 "^MLA over int8 cache" "$OUT/attention-prefetch.txt" | cut -c40-200 | head -n 28
  grep -A3 "^prefill (1 prompt)" "$OUT/attention-prefetch.txt" | cut -c1-200
  tail -n 2 "$OUT/attention-prefetch.err"
  echo "== GQA decode"
  summary "$OUT/decode-gqa.txt" 4
  for run in ${PREFETCH_RUNS:-off:1:sliced on:1:sliced on:2:sliced on:1:staged}; do
    IFS=: read -r prefetch rounds heads <<<"$run"
    tag="$prefetch-v$rounds-$heads"
    echo "== MLA decode, dot4, prefetch $prefetch, value rounds $rounds, head kernel $heads"
    summary "$OUT/decode-mla-prefetch-$tag.txt" 3
    grep "mla-attention int8 dot4\|head-matmul" "$OUT/decode-mla-prefetch-$tag.txt" | grep -v tiled | head -n 8
  done
  ;;
warp)
  attention_forms warp "dot4,dot4 warp,dot4 warp w32,dot4 warp v1,dot4 warp v4"
  for run in ${WARP_RUNS:-workgroup:64 subgroup:64 subgroup:32}; do
    IFS=: read -r softmax window <<<"$run"
    mla_decode "$softmax-w$window" --mla-dot4-softmax "$softmax" --mla-window "$window"
  done
  grep -A30 "^MLA over int8 cache" "$OUT/attention-warp.txt" | cut -c40-200 | head -n 30
  grep -A3 "^prefill (1 prompt)" "$OUT/attention-warp.txt" | cut -c1-220
  tail -n 3 "$OUT/attention-warp.err"
  for run in ${WARP_RUNS:-workgroup:64 subgroup:64 subgroup:32}; do
    IFS=: read -r softmax window <<<"$run"
    echo "== MLA decode, dot4, softmax $softmax, window $window"
    summary "$OUT/decode-mla-$softmax-w$window.txt" 3
    grep "mla-attention int8 dot4" "$OUT/decode-mla-$softmax-w$window.txt" | head -n 4
    tail -n 2 "$OUT/decode-mla-$softmax-w$window.txt" | grep -i "error" | cut -c1-300
  done
  ;;
three)
  attention_forms three "${THREE_FORMS:-dot4,three-pass,three-pass tc,three-pass tc both,three-pass tc both parts 4,three-pass tc both target÷2,three-pass tc both target×2,three-pass tc both w32}"
  if [ "${THREE_DECODE:-gqa,dot4,three}" != none ]; then
    if [[ ",${THREE_DECODE:-gqa}," == *,gqa,* ]]; then
      el decode-gqa
      timeout 100 node --import tsx bench/decode.ts --models qwen2.5-7b --weight-dtype int8 --kv-cache-dtype int8 --batches 8,32 \
        --contexts 512 --warmup 20 --steps 32 --logits argmax --pipeline on --json "$OUT/decode-gqa.json" >"$OUT/decode-gqa.txt" 2>&1
      el "rc=$?"
    fi
    mla_decode dot4
    mla_decode three --mla-int8-products three-pass ${THREE_FLAGS:---mla-3pass-products scores}
  fi
  grep -A40 "^MLA over int8 cache" "$OUT/attention-three.txt" | cut -c40-200 | head -n 40
  grep -A3 "^prefill (1 prompt)" "$OUT/attention-three.txt" | cut -c1-220
  grep "vs three-pass" "$OUT/attention-three.txt" | head -n 16
  grep -v "^\s*$" "$OUT/attention-three.err" | grep -v "µs,\|^NVIDIA\|^nvidia" | tail -n 4
  echo "== GQA decode"
  summary "$OUT/decode-gqa.txt" 3
  for tag in dot4 three; do
    echo "== MLA decode, $tag"
    summary "$OUT/decode-mla-$tag.txt" 3
    grep "mla-attention" "$OUT/decode-mla-$tag.txt" | head -n 12
    tail -n 2 "$OUT/decode-mla-$tag.txt" | grep -i "error" | cut -c1-300
  done
  ;;
chunks)
  for run in off:16 off:32 dot4:32; do
    IFS=: read -r products chunk <<<"$run"
    el "decode-mla-$products-chunk$chunk"
    timeout 150 node --import tsx bench/decode.ts --models qwen2.5-7b-mla --weight-dtype int8 --kv-cache-dtype int8 --batches 8,32 \
      --contexts 512 --warmup 20 --steps 32 --logits argmax --pipeline on --profile --mla-int8-products "$products" --mla-min-chunk "$chunk" \
      --json "$OUT/decode-mla-$products-chunk$chunk.json" >"$OUT/decode-mla-$products-chunk$chunk.txt" 2>"$OUT/decode-mla-$products-chunk$chunk.err"
    el "rc=$?"
  done
  for run in off:16 off:32 dot4:32; do
    IFS=: read -r products chunk <<<"$run"
    echo "== MLA decode, attention products $products, min chunk $chunk"
    summary "$OUT/decode-mla-$products-chunk$chunk.txt" 4
    grep "mla-attention" "$OUT/decode-mla-$products-chunk$chunk.txt" | head -n 6
    tail -n 2 "$OUT/decode-mla-$products-chunk$chunk.err"
  done
  ;;
attention)
  el attention
  timeout 500 node --import tsx bench/attention.ts --batches 32 --contexts 512,4096 --variants default --prefill none \
    --json "$OUT/attention.json" >"$OUT/attention.txt" 2>"$OUT/attention.err"
  el "rc=$?"
  grep "score-phase dump\|first:\|^ \{13\}" "$OUT/attention.txt" | cut -c1-300 | head -n 40
  grep "vs dot4\|partials" "$OUT/attention.txt" "$OUT/attention.err" | cut -c1-300 | head -n 12
  grep "µs\|int8\|gqa" "$OUT/attention.txt" | tail -n 16
  # The score tiles in isolation, with the kernel's workgroup-memory load too (bench/probe-device.ts).
  timeout 120 node --import tsx bench/probe-device.ts >"$OUT/probe.txt" 2>&1
  grep "score tiles" "$OUT/probe.txt" | cut -c1-200
  ;;
serve)
  # Served MLA against GQA at two KV budgets (GQA's pool full in both; the tighter one is where MLA's 1.81× capacity
  # counts most), async scheduling on; SERVE_RUNS="600MiB:on 600MiB:off" compares async scheduling instead, and a third
  # field sets --max-num-batched-tokens ("600MiB:on:512": prompts in 512-row chunks). Each start
  # uploads both 7B models (~2 min); the same load each time.
  # Each start's files carry its place in SERVE_RUNS, so a repeated run keeps its own trace and report.
  i=0
  for run in ${SERVE_RUNS:-600MiB:on 256MiB:on}; do
    i=$((i + 1))
    IFS=: read -r budget mode tokens products inlen outlen heads <<<"$run"
    tokens=${tokens:-2048}
    products=${products:-f32}
    inlen=${inlen:-512}
    outlen=${outlen:-128}
    heads=${heads:-auto}
    tag="$i-$budget-$mode-$tokens-$products-$inlen-$outlen-$heads"
    el "serve kv $budget async-scheduling $mode max-num-batched-tokens $tokens mla-int8-attention $products"
    node bin/mla-serve.js serve --synthetic qwen2.5-7b --synthetic qwen2.5-7b-mla --weight-dtype int8 --kv-cache-dtype int8 \
      --kv-cache-memory "$budget" --max-num-seqs 64 --async-scheduling "$mode" --max-num-batched-tokens "$tokens" \
      --mla-int8-attention "$products" --mla-head-kernel "$heads" \
      --step-trace "$OUT/steps-$tag.jsonl" --port 8000 \
      >"$OUT/serve-$tag.log" 2>&1 &
    sp=$!
    node -e "const t=Date.now(); (async()=>{ while(Date.now()-t<200000){ try{ const r=await fetch('http://127.0.0.1:8000/v1/models'); if(r.ok){ console.log('ready after',(Date.now()-t)/1000,'s'); return; } }catch{} await new Promise(r=>setTimeout(r,1000)); } console.log('not ready'); process.exit(1); })()" | tee -a "$OUT/log.txt"
    el bench
    timeout 150 node bin/mla-serve.js bench --url http://127.0.0.1:8000 --model qwen2.5-7b --model qwen2.5-7b-mla --num-prompts 48 \
      --max-concurrency 48 --input-len "$inlen" --output-len "$outlen" --ignore-eos --seed 0 --no-progress --out "$OUT/report-$tag" >"$OUT/bench-$tag.txt" 2>&1
    el "rc=$?"
    kill $sp
    wait $sp 2>/dev/null
  done
  i=0
  for run in ${SERVE_RUNS:-600MiB:on 256MiB:on}; do
    i=$((i + 1))
    IFS=: read -r budget mode tokens products inlen outlen heads <<<"$run"
    tag="$i-$budget-$mode-${tokens:-2048}-${products:-f32}-${inlen:-512}-${outlen:-128}-${heads:-auto}"
    echo "== KV budget $budget, async scheduling $mode, max-num-batched-tokens ${tokens:-2048}, mla-int8-attention ${products:-f32}, ${inlen:-512} + ${outlen:-128} tokens, mla-head-kernel ${heads:-auto}"
    # Decode-only steps against steps with prompt rows, per model (wall and GPU ms): where the served TPOT goes.
    node --import tsx bench/step-trace.ts "$OUT/steps-$tag.jsonl"
    grep -A32 "requests ok" "$OUT/bench-$tag.txt" | head -n 34
  done
  # One line for all starts: MLA / GQA output throughput of each (GQA's own throughput moves ±5 % between starts of
  # the same load, so a goal near the margin wants several).
  echo "== MLA / GQA output throughput per start: $(for f in "$OUT"/bench-*.txt; do awk '/^output throughput/ { printf "%s ", $NF }' "$f"; done)"
  ;;
sweep)
  el sweep
  timeout 500 node --import tsx bench/int8.ts --sweep --rows 32,64 --shapes gate_up,down,qkv,o --spin-ms 150 --json "$OUT/int8.json" \
    >"$OUT/int8.txt" 2>"$OUT/int8.err"
  el "rc=$?"
  OUT="$OUT" node -e '
const j = JSON.parse(require("fs").readFileSync(process.env.OUT + "/int8.json"));
const by = {};
for (const m of j.measurements) (by[m.shape + " rows " + m.rows] ??= []).push(m);
for (const [k, ms] of Object.entries(by)) {
  const sm = ms.filter((m) => m.variant.startsWith("w8a8 sm")).sort((a, b) => a.us - b.us);
  const def = sm.find((m) => m.variant === "w8a8 sm s8 kauto c1 u2 x0");
  console.log(k, "| default", def ? def.us.toFixed(1) : "?", "µs | best:", sm.slice(0, 4).map((m) => m.variant.slice(8) + " " + m.us.toFixed(1) + (m.vsDot4 > 0 ? " WRONG" : "")).join(" | "));
}'
  ;;
flash)
  el flash-dump
  timeout 90 node --import tsx bench/flash-dump.ts >"$OUT/flash-dump.txt" 2>&1
  el "rc=$?"
  grep "^[a-z]\|operands as loaded\|first wrong" "$OUT/flash-dump.txt" | grep -v "^warning" | cut -c1-300
  el flash-test
  timeout 240 node --import tsx --test --test-reporter=spec --test-name-pattern="one-pass tensor-core" test/mla-int8-cache.test.ts >"$OUT/flash-test.txt" 2>&1
  el "rc=$?"
  el attention-flash
  timeout 240 node --import tsx bench/attention.ts --block-size 32 --batches 8,32 --contexts ${FLASH_CONTEXTS:-512,4096,16384} --variants default \
    --prefill ${FLASH_PREFILL:-512} --mla-int8 "${FLASH_FORMS:-dot4,flash,flash target×2,flash target÷2,flash-dot4}" \
    --json "$OUT/attention-flash.json" >"$OUT/attention-flash.txt" 2>"$OUT/attention-flash.err"
  el "rc=$?"
  if [ "${FLASH_DECODE:-on}" != none ]; then
    mla_decode dot4-bs32 --block-size 32
    mla_decode flash --block-size 32 --mla-int8-products flash
  fi
  grep "^✔\|^✖\|^ℹ\|not ok\|Error\|heads beyond" "$OUT/flash-test.txt" | cut -c1-300 | head -n 12
  grep -A30 "^MLA over int8 cache" "$OUT/attention-flash.txt" | cut -c1-200 | head -n 30
  grep -A3 "^prefill (1 prompt)" "$OUT/attention-flash.txt" | cut -c1-220
  grep "flash vs flash-dot4" "$OUT/attention-flash.txt" | head -n 8
  grep -v "^\s*$" "$OUT/attention-flash.err" | grep -v "µs,\|^NVIDIA\|^nvidia" | tail -n 6
  for tag in dot4-bs32 flash; do
    [ -f "$OUT/decode-mla-$tag.txt" ] || continue
    echo "== MLA decode, $tag"
    summary "$OUT/decode-mla-$tag.txt" 3
    grep "mla-attention" "$OUT/decode-mla-$tag.txt" | head -n 6
    tail -n 2 "$OUT/decode-mla-$tag.txt" | grep -i "error" | cut -c1-300
  done
  ;;
flash2)
  el flash2-tests
  timeout 120 node --import tsx --test --test-reporter=spec --test-name-pattern="both products on tensor cores" test/mla-int8-cache.test.ts >"$OUT/flash2-test.txt" 2>&1
  el "rc=$?"
  timeout 90 node --import tsx --test --test-reporter=spec --test-name-pattern="mla-int8-attention flash" test/serve-dtypes.test.ts >"$OUT/flash2-serve-test.txt" 2>&1
  el "rc=$?"
  el attention-flash2
  timeout 150 node --import tsx bench/attention.ts --block-size 32 --batches 8,32 --contexts 4096 --variants default --prefill none \
    --mla-int8 "${FLASH_FORMS:-flash,flash tiled scores,flash tiled values,flash tiled,flash skip products}" --json "$OUT/attention-flash2.json" >"$OUT/attention-flash2.txt" 2>"$OUT/attention-flash2.err"
  el "rc=$?"
  grep "^✔\|^✖\|^ℹ [pf]" "$OUT/flash2-test.txt" "$OUT/flash2-serve-test.txt" | cut -c1-200
  grep -A8 "^MLA over int8 cache" "$OUT/attention-flash2.txt" | cut -c1-200
  grep -v "^\s*$" "$OUT/attention-flash2.err" | grep -v "µs,\|^NVIDIA\|^nvidia" | tail -n 4
  ;;
tests)
  el tests
  timeout 500 node --import tsx --test --test-reporter=spec test/kernels-int8.test.ts test/mla-int8-cache.test.ts test/gpu-model.test.ts \
    >"$OUT/tests.txt" 2>&1
  el "rc=$?"
  grep "^✔\|^✖\|^ℹ" "$OUT/tests.txt" | cut -c1-200 | tail -n 40
  ;;
*)
  echo "unknown phase $phase" >&2
  exit 2
  ;;
esac
