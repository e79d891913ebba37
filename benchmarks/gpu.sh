#!/usr/bin/env bash
# Issue 13's GPU numbers in one command, for a lent GPU machine (no hub, no PyPI, 64 MiB of carried files).
#
#   bash benchmarks/gpu.sh prepare            # here (CPU): tokenizer + 8 conversations of <= 2K tokens
#   bash benchmarks/gpu.sh run [DEVICE]       # there: random 1B-shaped Llama, steering and capture
#                                             # (benchmarks/attention.py), scoring tokens/s (ctxaware score)
#
# `prepare` writes runs/gpu_assets/ (about 3.5 MB; runs/ is gitignored, so carry it: run(carry=["runs/gpu_assets"])).
# `run` writes its tables and logs under $OUT (default runs/gpu_bench). Speed does not depend on the weight
# values, so the 1B model has random weights of Llama-3.2-1B's shape (benchmarks/make_random_model.py).
set -euo pipefail
cd "$(dirname "$0")/.."
ASSETS=runs/gpu_assets
mode=${1:-run}
if [ "$mode" = prepare ]; then
    mkdir -p "$ASSETS"
    python - "$ASSETS" <<'EOF'
import json, sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from speed import MODEL, build_conversations
from ctxaware.core.models import load_tokenizer
out = Path(sys.argv[1])
tok = load_tokenizer(MODEL)
tok.save_pretrained(out / "tokenizer")
convs = build_conversations(tok, 8, 2000)
(out / "convs.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
print(f"wrote {out}/tokenizer and {len(convs)} conversations to {out}/convs.jsonl")
EOF
    du -sh "$ASSETS"
    exit 0
fi
DEVICE=${2:-cuda}
OUT=${OUT:-runs/gpu_bench}
SHAPE=${SHAPE:-llama-1b}            # SHAPE=smollm2-135m LENGTHS=256 REPS=1: a quick check of this script on a CPU
LENGTHS=${LENGTHS:-1024,2048,4096}
REPS=${REPS:-5}
STEER_ONLY=${STEER_ONLY:-}          # STEER_ONLY=--steer-only: the steering columns alone
SCORE=${SCORE:-1}                   # SCORE=0: skip the scoring runs
mkdir -p "$OUT"
[ -f "$ASSETS/convs.jsonl" ] || { echo "no $ASSETS: run 'bash benchmarks/gpu.sh prepare' first and carry it" >&2; exit 2; }
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')" | tee "$OUT/device.txt"
M="$OUT/$SHAPE"
[ -d "$M" ] || python benchmarks/make_random_model.py --shape "$SHAPE" --tokenizer "$ASSETS/tokenizer" --out "$M"
# steering ratio (goal <= 1.3x at 4K) and capture vs eager output_attentions, bf16
python benchmarks/attention.py --model "$M" --device "$DEVICE" --dtype bfloat16 --lengths "$LENGTHS" --reps "$REPS" --haystack synthetic $STEER_ONLY \
    | tee "$OUT/attention_${SHAPE}_bf16.md"
# scoring throughput at 2K tokens: the CLI prints and records tokens/s (first run warms up the kernels)
[ "$SCORE" = 1 ] && for run in warmup timed; do
    rm -f "$OUT/scores_$run.jsonl"*
    python -m ctxaware.cli score "$ASSETS/convs.jsonl" --model "$M" --device "$DEVICE" --dtype bfloat16 \
        --output "$OUT/scores_$run.jsonl" --no-progress 2>&1 | tail -3 | tee "$OUT/score_$run.log"
done
echo "done: $OUT"
