#!/usr/bin/env bash
# Every sampler on one chart (quality vs base passes and vs wall time), on the models `make demo` built.
# Usage: bash benchmarks/all_samplers.sh [DEMO_DIR] [OUT_DIR]
set -euo pipefail
demo=${1:-runs/demo}
out=${2:-runs/all-samplers}
jointdlm=${JOINTDLM:-.venv/bin/jointdlm}
tpl=$demo/template
# Two causal models that share the base's tokenizer, of different seeds: the scorer measures every row's NLL and
# MAUVE, the drafter is the one EDLM and APD sample with (the model that chose their tokens must not judge them).
for name in scorer:0 drafter:1; do
  dir=$tpl/${name%%:*}
  if [ ! -f "$dir/training_done.json" ]; then
    $jointdlm pretrain --corpus "$tpl/corpus.txt" --out "$dir" --objective ar --preset tiny \
      --max-steps 600 --batch-size 128 --tokenizer-from "$tpl/model" --seed "${name##*:}"
  fi
done
samplers="parallel,adjust,edlm,threshold,threshold:tau=0.7,threshold:tau=0.5,eb,eb:gamma=0.5,eb:gamma=2"
samplers="$samplers,punt,punt:epsilon=0.02,punt:epsilon=0.5,apd,apd:mixture_weight=0.9"
$jointdlm eval --model "$tpl/model" --adjust "$tpl/adjust" --scorer "$tpl/scorer" --sampler-scorer "$tpl/drafter" \
  --language template \
  --samplers "$samplers" --tokens-per-step 1,2,4 --num 500 --out "$out/template"
