#!/usr/bin/env bash
# One device-machine call (H100, <= 10 min) running the GPU rows of docs/benchmarks.md in order of
# priority; a step that no longer fits the remaining time is skipped (and reported as such).
#
# Needs, in ignored folders of the checkout (see docs/benchmarks.md, "GPU runs"):
#   .whl/  wheels of torch-pruning, fvcore, iopath, yacs, termcolor, torchattacks (the image lacks them)
#   .data/ cifar10-jpeg.tar.gz, resnet20-12fca82f.th, resnet56-4bfd9763.th (copies of ../shared)
# ND_GIT_COMMIT=<sha of the committed tree> names the commit in the JSONs (the device copy's .git is
# the session's first). STEPS="name name ..." runs only those steps (names as in steps.txt; graph_check always runs), e.g.
#   STEPS="train_step_compile_r18 train_step_compile_r20 compile_check cuda_tests" BUDGET=540 bash benchmarks/gpu_session.sh
#   STEPS="table_c_r56 lambda_sweep_r20" BUDGET=540 bash benchmarks/gpu_session.sh
# Results land in $OUT: results.tar.gz (every JSON/PNG/log) and runs.tar.gz.part-* (run directories
# without optimiser state, split into 15 MB parts; `cat runs.tar.gz.part-* | tar xz`).
set -u
BUDGET=${BUDGET:-560}          # seconds for the whole script
START=$(date +%s)
ROOT=$PWD
R=/tmp/results; mkdir -p $R /tmp/runs
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/* . > $R/pip.log 2>&1 \
  || { tail -5 $R/pip.log; exit 1; }
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
mkdir -p /tmp/cifar10 && tar xzf .data/cifar10-jpeg.tar.gz -C /tmp/cifar10
D=imagefolder:/tmp/cifar10
W20=$ROOT/.data/resnet20-12fca82f.th
W56=$ROOT/.data/resnet56-4bfd9763.th
nvidia-smi --query-gpu=name --format=csv,noheader | tee $R/gpu.txt
ND="python3 -m nd_plugin.cli._app"
cd /tmp  # the checkout's nd_plugin/ (without adapters/, cli/) must not shadow the installed package
COMMON="--device cuda --batch-size 128 --workers 6"

step() {  # step NAME NEEDED_SECONDS COMMAND...: run when it fits, with what is left as its timeout
  local name=$1 need=$2; shift 2
  if [ -n "${STEPS:-}" ] && [ "$name" != graph_check ] && [[ " $STEPS " != *" $name "* ]]; then return; fi
  local left=$(( BUDGET - ($(date +%s) - START) - 25 ))
  if (( left < need )); then echo "SKIPPED $name (needs ~${need}s, ${left}s left)" | tee -a $R/steps.txt; return; fi
  local t0=$(date +%s)
  timeout $left "$@" > $R/$name.log 2>&1
  local rc=$?
  echo "$name rc=$rc $(( $(date +%s) - t0 ))s" | tee -a $R/steps.txt
  tail -4 $R/$name.log
}

step train_step_r18 20 python3 $ROOT/benchmarks/train_step.py --device cuda --model tv:resnet18 --size 32 --batch 64 --repeats 30 --out $R/train_step_r18.json
step train_step_r20 20 python3 $ROOT/benchmarks/train_step.py --device cuda --model cifar:resnet20 --size 32 --batch 128 --repeats 30 --out $R/train_step_r20.json
# torch.compile'd steps (compiled; compiled + CUDA graphs), and the trainer's --compile on a real loader
step train_step_compile_r18 150 python3 $ROOT/benchmarks/train_step.py --device cuda --model tv:resnet18 --size 32 --batch 64 --repeats 30 --compile --count-kernels --out $R/train_step_compile_r18.json
step train_step_compile_r20 150 python3 $ROOT/benchmarks/train_step.py --device cuda --model cifar:resnet20 --size 32 --batch 128 --repeats 30 --compile --count-kernels --out $R/train_step_compile_r20.json
step compile_check 120 $ND decouple resnet18 --epochs 1 --warmup-epochs 1 --device cuda --workers 2 --compile --out /tmp/runs/compile_check --quiet
step cuda_tests 90 python3 -m pytest -q $ROOT/tests/test_train.py -k graphed  # graphed == eager, with and without compile
# the trainer's CUDA-graph step on a real loader; when it fails, every run below trains eagerly
GRAPHS=""
step graph_check 20 $ND decouple resnet18 --epochs 1 --warmup-epochs 1 --device cuda --workers 2 --out /tmp/runs/graph_check --quiet
grep -q "graph_check rc=0" $R/steps.txt || GRAPHS="--no-cuda-graphs"
echo "graphs: ${GRAPHS:-on}" | tee -a $R/steps.txt
# a longer, class-specific decoupling run for interpretation (issue 5) and detection (issue 6)
step r20_classpaths 60 $ND decouple cifar:resnet20 --data $D --weights $W20 --ratio 0.5 --lambda-s 0.01 --lambda-m 0.05 \
  --epochs 6 $COMMON $GRAPHS --out /tmp/runs/r20_classpaths --quiet
step table_c_r20 90 python3 $ROOT/benchmarks/table_c.py --model cifar:resnet20 --weights $W20 --data $D --ratio 0.5 --lambda-s 0.01 \
  --epochs 2 $COMMON $GRAPHS --out-dir /tmp/runs/table_c_r20 --json $R/table_c_r20.json
step compare_pruners 120 python3 $ROOT/benchmarks/compare_pruners.py --model cifar:resnet20 --weights $W20 --data $D --lambda-s 0.01 \
  --ratios 0.7 0.5 0.35 --targets --epochs 2 $COMMON $GRAPHS --out-dir /tmp/runs/compare --json $R/compare_pruners.json
step detect_r20 40 python3 $ROOT/benchmarks/detect.py /tmp/runs/r20_classpaths --n 2000 --fit-n 10000 --device cuda --batch-size 500 --json $R/detect_r20.json
step r18_224 30 python3 - $GRAPHS <<'PY'
import sys
from nd_plugin.commands.decoupling import decouple
from nd_plugin.data import load_data
from nd_plugin.training.config import TrainConfig
data = load_data("digits", image_size=224)
cfg = TrainConfig(model="tv:resnet18", data="digits", ratio=0.6, device="cuda", workers=6, cuda_graphs="--no-cuda-graphs" not in sys.argv)
decouple(cfg, "/tmp/runs/r18_224_digits", data=data, progress=False)
PY
# issue 23's runtime target at 224x224: the paper's objective and a routed run (L_c for half the
# decoupling epochs), R 0.5, then nd prune against the static model of the same top-1 on 1 CPU thread
step r18_224_routed 90 python3 - $GRAPHS <<'PY'
import sys
from nd_plugin.commands.decoupling import decouple
from nd_plugin.data import load_data
from nd_plugin.training.config import TrainConfig
data = load_data("digits", image_size=224)
graphs = "--no-cuda-graphs" not in sys.argv
for name, extra in (("paper", {}), ("routed", {"lambda_c": 6.0, "lambda_c_until": 0.5})):
    cfg = TrainConfig(model="tv:resnet18", data="digits", ratio=0.5, device="cuda", workers=6, cuda_graphs=graphs, **extra)
    decouple(cfg, f"/tmp/runs/r18_224_{name}", data=data, progress=False)
PY
step keep_gate_224 150 bash -c "for r in paper routed; do [ -d /tmp/runs/r18_224_\$r ] || continue; taskset -c 0 env OMP_NUM_THREADS=1 \
  $ND prune /tmp/runs/r18_224_\$r --static-match accuracy --engine eager,onnx --threads 1 --repeats 20 && cp /tmp/runs/r18_224_\$r/prune.json $R/prune_r18_224_\$r.json; done"
step table_c_r56 100 python3 $ROOT/benchmarks/table_c.py --model cifar:resnet56 --weights $W56 --data $D --ratio 0.5 --lambda-s 0.01 \
  --epochs 2 --no-baseline $COMMON $GRAPHS --out-dir /tmp/runs/table_c_r56 --json $R/table_c_r56.json
step lambda_sweep_r20 90 python3 $ROOT/benchmarks/lambda_sweep.py --model cifar:resnet20 --weights $W20 --data $D --ratio 0.5 --lambda-s 0.01 \
  --m-values 0,0.005,0.01,0.03,0.1 --k-values 0,0.3,1,3 --s-values 0.001,0.003,0.01,0.03 --epochs 2 $COMMON $GRAPHS --out-dir /tmp/runs/sweep --json $R/lambda_sweep_r20.json

# pack: every small result, and the run directories the CPU benchmarks need (optimiser state dropped)
find /tmp/runs -name summary.json -o -name metrics.jsonl -o -name config.json | tar czf $R/run_summaries.tar.gz -T - 2>/dev/null
cp $R/*.log $R/steps.txt /tmp/results/ 2>/dev/null; tar czf $OUT/results.tar.gz -C /tmp results
python3 - <<'PY'
import pathlib, torch
for ck in pathlib.Path("/tmp/runs").glob("*/checkpoint.pt"):
    state = torch.load(ck, map_location="cpu", weights_only=False)
    state.pop("optimizer", None)
    torch.save(state, ck)
PY
keep=""
for d in r20_classpaths r18_224_digits r18_224_paper r18_224_routed "table_c_r56/ACM+L_s+L_mi+L_kl"; do [ -d /tmp/runs/$d ] && keep="$keep runs/$d"; done
[ -n "$keep" ] && tar czf - -C /tmp $keep | split -b 15M - $OUT/runs.tar.gz.part-
ls -la $OUT; echo "total $(( $(date +%s) - START ))s"
