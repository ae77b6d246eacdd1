#!/usr/bin/env bash
# The prepared device run of issue 20 (one NVIDIA GPU, >= 8 CPU cores, no network; < 9 minutes):
#   1. the gpu-marked tests (tests/test_gpu.py): nvjpeg decode, GPU vs CPU augmentation, no host-device
#      sync in the hot paths, bf16 + channels_last MoCo step, torch.compile, NCCL, multi-task models in bf16;
#   2. launch/bench_pretrain.py, both recipes, ResNet-50, batch 256, on generated COCO-size JPEGs;
#   3. downstream/bench_mtl.py at the published setting (HRNet-18, NYUD 480x640, batch 8), then MTI-Net
#      with torch.compile if time is left;
#   4. one table of img/s and the targets (launch/gpu_report.py); exit 0 only if every target is met.
#
#   make gpu-wheels                     # here, with network: kornia/kornia_rs/submitit wheels into .whl/
#   bash launch/gpu_check.sh            # on the GPU machine (see docs/benchmarks.md for the device command)
#   bash launch/gpu_check.sh --smoke    # dry run of the same steps on the CPU: tiny sizes, no torch.compile
# Wheels in .whl/ are installed into a temporary folder first when kornia or submitit is missing.
# Outputs (logs, JSON, the table) go to $OUT if set (the device tool's folder), else a temporary folder.
set -uo pipefail

SMOKE=0
for arg in "$@"; do
    case "$arg" in
        --smoke) SMOKE=1 ;;
        -h|--help) sed -n '2,/^set /{/^#/p}' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: error: unknown argument '$arg' (expected --smoke or --help)" >&2; exit 2 ;;
    esac
done

REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
RESULTS=${OUT:-$(mktemp -d)}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$RESULTS" "$WORK/shim"
# import selfsup / downstream from this checkout without installing it
ln -s "$REPO/ssl" "$WORK/shim/selfsup"
ln -s "$REPO/downstream" "$WORK/shim/downstream"
export PYTHONPATH="$WORK/shim${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export SCENESSL_DATA="$WORK/data_cache"
START=$SECONDS
CORES=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc alone honours OMP_NUM_THREADS

# The device image lacks kornia and submitit and has no network: install the wheels of `make gpu-wheels`.
WHEELS=${GPU_CHECK_WHEELS:-$REPO/.whl}
if ! "$PY" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ('kornia', 'submitit')))"
then
    if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
        echo "gpu_check.sh: error: kornia or submitit is missing and $WHEELS holds no wheels (run 'make gpu-wheels' and carry .whl)" >&2
        exit 1
    fi
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-deps --no-compile --no-cache-dir \
        --target "$WORK/site" "$WHEELS"/*.whl \
        || { echo "gpu_check.sh: error: could not install the wheels of $WHEELS" >&2; exit 1; }
    export PYTHONPATH="$WORK/site:$PYTHONPATH"
fi

if [ "$SMOKE" = 1 ]; then
    DEVICE=cpu
    PRETRAIN=(--backbone resnet_tiny --batch-size 4 --steps 1 --workers 0 --images 8 --jpeg-size 96x72 --device cpu)
    MTL=(--backbone resnet_tiny --narrow --height 64 --width 64 --batch-size 2 --steps 1 --warmup 1 --models mti_net
         --device cpu)
    TESTS=(-q -rs -p no:cacheprovider)
else
    DEVICE=cuda
    nvidia-smi -L || true
    PRETRAIN=(--backbone resnet50 --batch-size 256 --steps 10 --workers "$CORES" --images 2048 --jpeg-size 640x480
              --device cuda)
    MTL=(--backbone hrnet18 --dataset nyud --tasks semseg depth --height 480 --width 640 --batch-size 8 --steps 30
         --warmup 5 --device cuda)
    TESTS=(-q -rs -p no:cacheprovider)
fi
if [ "$SMOKE" = 1 ]; then  # versions from the metadata: importing torch here would cost seconds of the dry run
    "$PY" -c "from importlib.metadata import version as v; print(*(f'{m} {v(m)}' for m in ('torch', 'torchvision', 'kornia', 'submitit')))"
else
    "$PY" -c "import sys, torch, torchvision, kornia, submitit
print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'kornia', kornia.__version__,
      'submitit', submitit.__version__, 'cuda', torch.cuda.is_available())
sys.exit(0 if torch.cuda.is_available() else 1)" \
        || { echo "gpu_check.sh: error: no CUDA device or a missing package (on a CPU machine use --smoke)" >&2; exit 1; }
fi

echo "== 1. gpu tests"
"$PY" -m pytest "${TESTS[@]}" -m gpu "$REPO/tests/test_gpu.py" 2>&1 | tee "$RESULTS/gpu_tests.log"
TESTS_RC=${PIPESTATUS[0]}
if [ "$SMOKE" = 1 ] && [ "$TESTS_RC" = 5 ]; then TESTS_RC=0; fi  # smoke: no test selected is fine

echo "== 2. pretraining throughput (elapsed $((SECONDS - START)) s)"
DATA="$WORK/coco_synth"  # generated once, read by both recipes
"$PY" "$REPO/launch/bench_pretrain.py" "${PRETRAIN[@]}" --generate "$DATA" \
    || { echo "gpu_check.sh: error: could not generate the JPEGs in $DATA" >&2; exit 1; }
for recipe in moco ours; do
    "$PY" "$REPO/launch/bench_pretrain.py" "${PRETRAIN[@]}" --recipe "$recipe" --data "$DATA" \
        --output "$RESULTS/pretrain_$recipe.json" 2>&1 | tee "$RESULTS/pretrain_$recipe.log"
done

echo "== 3. multi-task training throughput (elapsed $((SECONDS - START)) s)"
"$PY" "$REPO/downstream/bench_mtl.py" "${MTL[@]}" --output "$RESULTS/mtl.json" 2>&1 | tee "$RESULTS/mtl.log"
MTL_JSON=("$RESULTS/mtl.json")
if [ "$SMOKE" = 1 ]; then
    echo "skipping MTI-Net + torch.compile: smoke run (compiling on the CPU costs most of the dry run)"
elif [ $((SECONDS - START)) -lt 330 ]; then
    "$PY" "$REPO/downstream/bench_mtl.py" "${MTL[@]}" --models mti_net --compile --output "$RESULTS/mtl_compile.json" \
        2>&1 | tee "$RESULTS/mtl_compile.log" && MTL_JSON+=("$RESULTS/mtl_compile.json")
else
    echo "skipping MTI-Net + torch.compile: $((SECONDS - START)) s elapsed"
fi

echo "== 4. summary (elapsed $((SECONDS - START)) s, $CORES cores)"
PRETRAIN_JSON=()
for recipe in moco ours; do
    if [ -f "$RESULTS/pretrain_$recipe.json" ]; then PRETRAIN_JSON+=("$RESULTS/pretrain_$recipe.json"); fi
done
"$PY" "$REPO/launch/gpu_report.py" --pretrain "${PRETRAIN_JSON[@]}" --mtl "${MTL_JSON[@]}" --tests-rc "$TESTS_RC" \
    | tee "$RESULTS/summary.md"
RC=${PIPESTATUS[0]}
echo "gpu_check: done in $((SECONDS - START)) s; results in $RESULTS"
if [ "$SMOKE" = 1 ]; then exit 0; fi  # tiny CPU sizes miss the targets by design
exit "$RC"
