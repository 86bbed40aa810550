#!/usr/bin/env bash
# Every sampler on one chart (quality vs base passes and vs wall time), on the models `make demo` built.
# Usage: bash benchmarks/all_samplers.sh [DEMO_DIR] [OUT_DIR]
set -euo pipefail
demo=${1:-runs/demo}
out=${2:-runs/all-samplers}
jointdlm=${JOINTDLM:-.venv/bin/jointdlm}
tpl=$demo/template
if [ ! -f "$tpl/scorer/training_done.json" ]; then
  # EDLM and APD need a causal model that shares the base's tokenizer.
  $jointdlm pretrain --corpus "$tpl/corpus.txt" --out "$tpl/scorer" --objective ar --preset tiny \
    --max-steps 600 --batch-size 128 --tokenizer-from "$tpl/model"
fi
samplers="parallel,adjust,edlm,threshold,threshold:tau=0.7,threshold:tau=0.5,eb,eb:gamma=0.5,eb:gamma=2"
samplers="$samplers,punt,punt:epsilon=0.02,punt:epsilon=0.5,apd,apd:mixture_weight=0.9"
$jointdlm eval --model "$tpl/model" --adjust "$tpl/adjust" --scorer "$tpl/scorer" --language template \
  --samplers "$samplers" --tokens-per-step 1,2,4 --num 500 --out "$out/template"
