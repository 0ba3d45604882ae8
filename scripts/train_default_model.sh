#!/usr/bin/env bash
# Reproduce the bundled default model: train on Flickr8k's official train split (selecting the
# checkpoint on its dev split), score it on the test split, export it in fp16, and add the words
# only tag-guided captions say (captioner/assets/word_transfers.json; plain captions stay the same).
# The recipe is configs/default_model.yaml: 10 epochs of cross-entropy, then 15 of self-critical
# sequence training (CIDEr-D reward); on a 2-core CPU about 48 + 75 minutes.
#   scripts/train_default_model.sh [FLICKR8K_DIR] [RUN_DIR]     (extra flags: TRAIN_FLAGS="--device cuda")
set -euo pipefail
cd "$(dirname "$0")/.."
data="${1:-../shared/data/flickr8k}"
run="${2:-runs/default}"
scripts/setup.sh train
# shellcheck disable=SC2086
.venv/bin/captioner-train --config configs/default_model.yaml --data "$data" --output-dir "$run" ${TRAIN_FLAGS:-}
.venv/bin/captioner-eval --checkpoint "$run/best.pt" --data "$data" --split test --method beam --beam-size 3 \
    --out "$run/test"
# the test scores travel inside the shipped model (GET /model, captioner info)
.venv/bin/python -c "import json, sys; r = json.load(open(sys.argv[1])); json.dump({'metrics': {'test': r['metrics'], \
    'test_decoding': r['options']}}, open(sys.argv[2], 'w'))" "$run/test/metrics.json" "$run/test/metadata.json"
.venv/bin/captioner export "$run/best.pt" captioner/assets/default.pt --half --metadata "$run/test/metadata.json"
.venv/bin/captioner extend-vocabulary captioner/assets/default.pt captioner/assets/default.pt
