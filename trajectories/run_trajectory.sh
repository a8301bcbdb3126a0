#!/usr/bin/env bash
# pysafegeom.trajectory over the miniature runs (checkpoints rebuilt by `make trajectories` into trajectories/runs/).
# First the R2D2 run and its SFT control, then the 200-step R2D2 probe added (the done anchors are skipped).
# Per-anchor setting: the bundled prompt sets, every post-instruction position, every 3rd layer searched for the
# carrier (--layer-stride 3), 32 validation prompts per side, 16 KL controls; greedy 48 tokens (replay 64).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-trajectories/runs/trajectory}
common=(--cases trajectories/fixed_source/gcg --out "$OUT" --layer-stride 3)
$PY -m pysafegeom trajectory --run r2d2=trajectories/runs/r2d2 --run sft=trajectories/runs/sft "${common[@]}"
$PY -m pysafegeom trajectory --run r2d2=trajectories/runs/r2d2 --run sft=trajectories/runs/sft \
    --run r2d2_long=trajectories/runs/r2d2-long "${common[@]}"
