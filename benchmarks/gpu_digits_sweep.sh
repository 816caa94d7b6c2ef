#!/usr/bin/env bash
# Device-machine script (H100): the digits defaults sweep of docs/benchmarks.md and the GPU
# train-step benchmark. Run from the repository root with the wheels of torch-pruning, fvcore,
# iopath, yacs, termcolor and torchattacks in .whl/ (the device image lacks them); $OUT receives the summaries.
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/* . > /tmp/pip.log 2>&1 || { tail -5 /tmp/pip.log; exit 1; }
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
ROOT=$PWD
cd /tmp
nvidia-smi --query-gpu=name --format=csv,noheader
for cfg in "A:--acm-lr 0.5 --gate-bias 3" "B:--acm-lr 0.1 --gate-bias 3" "D:--acm-lr 0.1 --lambda-s 0.03 --gate-bias 3" "E:--acm-lr 0.1 --lambda-m 0.05 --gate-bias 3"; do
  name=${cfg%%:*}; opts=${cfg#*:}
  start=$(date +%s)
  timeout 90 python3 -m nd_plugin.cli._app decouple resnet18 --ratio 0.6 --device cuda --out /tmp/runs/$name --quiet $opts > /tmp/$name.log 2>&1 || tail -3 /tmp/$name.log
  python3 - "$name" "$opts" "$(( $(date +%s) - start ))" <<'PY'
import json, sys
name, opts, secs = sys.argv[1:]
s = json.load(open(f"/tmp/runs/{name}/summary.json"))
m = [json.loads(l) for l in open(f"/tmp/runs/{name}/metrics.jsonl")]
print(name, opts or "(defaults)", f"{secs}s", "top1", round(s["top1"], 4), "density", round(s["density"], 3), "states", {k: round(v, 3) for k, v in s["filter_states"].items()},
      "mi", [round(r["train_l_mi"], 2) for r in m][-1], "per-epoch", [(round(r["val_top1"], 3), round(r["val_density"], 3)) for r in m])
PY
  cp /tmp/runs/$name/summary.json $OUT/$name-summary.json 2>/dev/null
done
python3 $ROOT/benchmarks/train_step.py --device cuda --model tv:resnet18 --size 32 --batch 64 --repeats 30 --out $OUT/train_step_gpu_r18.json
