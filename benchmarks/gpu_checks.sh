#!/usr/bin/env bash
# The GPU checks, in one go, on a machine with a CUDA GPU: the `gpu` tests, then each
# benchmark's --device cuda run, each bounded in time. Logs go to $1 (default gpu-checks/).
#
#     benchmarks/gpu_checks.sh [LOG_DIR]   # PYTHON=... picks the interpreter, ONLY="wpe features" the steps
#
# Each step prints its own figures; a step that fails or times out is reported and the
# next one runs. The exit status is the number of failed steps.
set -u
LOGS=${1:-gpu-checks}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$LOGS"
export DO_NOT_TRACK=true PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true \
       PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=60 PYTHONUNBUFFERED=1
failed=0

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    case " ${ONLY:-$name} " in *" $name "*) ;; *) return ;; esac
    local start=$SECONDS
    echo "=== $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$LOGS/$name.log"
    echo "=== $name: exit $rc after $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
step gpu-tests 170 "$PY" -m pytest -m gpu -p no:cacheprovider -q -rs tests
step training 100 "$PY" benchmarks/bench_training.py --device cuda --precision bf16-mixed --batches 30 --repeats 3
step wpe 90 "$PY" benchmarks/bench_wpe.py --device cuda --repeats 5
step kmeans 60 "$PY" benchmarks/bench_kmeans.py fit --device cuda --repeats 3
step features 150 "$PY" benchmarks/bench_features.py vs-librosa --device cuda --clips 40 --repeats 2 \
    --cache "${TMPDIR:-/tmp}/mirflow-bench-gpu"
echo "failed steps: $failed"
exit "$failed"
