#!/usr/bin/env bash
# charstream's two Quick start commands, on a fresh machine with Python >= 3.10:
#
#   ./run.sh demo    set up .venv, train a small model on Shakespeare (reused on later
#                    runs; --retrain forces it), export + verify it, start the gRPC
#                    server on localhost, stream a passage from it, stop the server.
#   ./run.sh test    set up the same .venv and run the whole test suite.
#   ./run.sh serve   start the server on the demo model and keep it running (gRPC, and
#                    HTTP with the browser playground).
#
# Environment: PYTHON (interpreter that makes the venv, default python3),
# CHARSTREAM_VENV (default .venv), CHARSTREAM_TORCH (pip requirement for torch,
# default torch==2.13.0; see the README for CPU and GPU machines),
# CHARSTREAM_DEMO_MINUTES (training budget, default 4), CHARSTREAM_PORT and
# CHARSTREAM_HTTP_PORT (serve: gRPC and HTTP ports, default 50051 and 8080).
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
VENV=${CHARSTREAM_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}
TORCH_REQ=${CHARSTREAM_TORCH:-torch==2.13.0}
RUN_DIR=$ROOT/runs/demo
SERVER_PID=
MODEL_DIR=$ROOT/models/demo

say() { printf '\n==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

setup_env() {
    command -v "$PYTHON" >/dev/null || die "$PYTHON not found; install Python >= 3.10 or set PYTHON"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || die "Python >= 3.10 is needed ($PYTHON is $("$PYTHON" -V 2>&1))"
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating virtual environment $VENV"
        "$PYTHON" -m venv "$VENV" || die "could not create a venv (on Debian/Ubuntu: apt install python3-venv)"
    fi
    local py="$VENV/bin/python" stamp="$VENV/.charstream-installed"
    # (setup.py builds the sampler's C kernel: a change to it reinstalls too)
    local want; want="$(cat pyproject.toml setup.py server/engine/sampling_kernel.h server/engine/sampling_*.c) $TORCH_REQ"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0
    fi
    say "installing charstream and its dependencies into $VENV"
    "$py" -m pip install --quiet --upgrade pip
    # torch first and by exact version: a bare "torch" requirement would let pip pick
    # its default build (with CUDA libraries) on machines that have no GPU.
    if ! "$py" -c 'import torch' 2>/dev/null; then
        "$py" -m pip install --quiet "$TORCH_REQ"
    fi
    "$py" -m pip install --quiet -e ".[all]"
    printf '%s' "$want" >"$stamp"
}

run_tests() {
    setup_env
    say "running the test suite"
    # Temporary files of the tests (and of what they start) stay in the checkout.
    export TMPDIR="$ROOT/.pytest_tmp/tmp"
    rm -rf "$ROOT/.pytest_tmp" && mkdir -p "$TMPDIR"
    exec "$VENV/bin/python" -m pytest --basetemp "$ROOT/.pytest_tmp/pytest" "$@"
}

free_port() {
    "$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_ready() {  # wait_ready TARGET PID
    "$VENV/bin/python" - "$1" <<'PY' || return 1
import sys, grpc
grpc.channel_ready_future(grpc.insecure_channel(sys.argv[1])).result(timeout=60)
PY
}

prepare_model() {
    local retrain=$1
    if [ "$retrain" = 1 ] || [ ! -f "$RUN_DIR/config.json" ]; then
        say "training a small model on Shakespeare for ${CHARSTREAM_DEMO_MINUTES:-4} minutes"
        rm -rf "$RUN_DIR" "$MODEL_DIR"
        # A size that writes recognisable Shakespeare-like text after minutes on
        # a 2-core CPU; one torch thread avoids spinning thread pools there.
        "$VENV/bin/charstream-train" --corpus shakespeare --out "$RUN_DIR" \
            --embedding-dim 64 --hidden-size 256 --batch-size 32 --lr 4e-3 \
            --eval-every 500 --threads 1 --seed 1 \
            --max-minutes "${CHARSTREAM_DEMO_MINUTES:-4}"
    else
        say "reusing the trained model in $RUN_DIR (pass --retrain to train again)"
    fi
    if [ ! -f "$MODEL_DIR/manifest.json" ] || [ "$RUN_DIR/config.json" -nt "$MODEL_DIR/manifest.json" ]; then
        say "exporting to ONNX and verifying against PyTorch"
        "$VENV/bin/charstream-export" "$RUN_DIR" --out "$MODEL_DIR" --force --threads 1
    else
        say "reusing the verified export in $MODEL_DIR"
    fi
}

run_demo() {
    local retrain=0
    for arg in "$@"; do
        case $arg in
            --retrain) retrain=1 ;;
            *) die "unknown demo option: $arg (known: --retrain)" ;;
        esac
    done
    setup_env
    prepare_model "$retrain"
    local port; port=$(free_port)
    mkdir -p "$ROOT/runs"
    say "starting the gRPC server on 127.0.0.1:$port"
    "$VENV/bin/charstream-serve" --model "$MODEL_DIR" --host 127.0.0.1 --port "$port" \
        >"$ROOT/runs/demo-server.log" 2>&1 &
    SERVER_PID=$!
    # Stop the server however the demo ends (success, error or Ctrl-C).
    trap 'kill -TERM "$SERVER_PID" 2>/dev/null; wait "$SERVER_PID" 2>/dev/null || true' EXIT
    wait_ready "127.0.0.1:$port" || die "server did not start; see runs/demo-server.log"
    say "streaming from the server (temperature 0.8, seed 1):"
    "$VENV/bin/charstream-generate" --target "127.0.0.1:$port" --prompt "ROMEO:" \
        --max-chars 600 --temperature 0.8 --seed 1 --echo
    echo
    say "done; the demo server has been stopped. To keep one running and connect clients:"
    cat <<TXT
    ./run.sh serve                      # or: $VENV/bin/charstream-serve --model models/demo --port 50051 --http-port 8080
    $VENV/bin/charstream-generate --target localhost:50051 --prompt "JULIET:" --max-chars 400
    open http://127.0.0.1:8080/ in a browser: the playground streams from the same server
    curl -N http://127.0.0.1:8080/v1/generate -H 'Accept: text/event-stream' -d '{"prompt": "JULIET:", "max_chars": 400}'
    Any language: compile protos/charstream/v1/generator.proto (see protos/README.md).
TXT
}

run_serve() {
    setup_env
    [ -f "$MODEL_DIR/manifest.json" ] || prepare_model 0
    local http_port=${CHARSTREAM_HTTP_PORT:-8080}
    say "serving gRPC on 127.0.0.1:${CHARSTREAM_PORT:-50051}; playground and HTTP API on http://127.0.0.1:$http_port/"
    # The server prints the URL it bound too (the one to use when flags below change host or port).
    exec "$VENV/bin/charstream-serve" --model "$MODEL_DIR" --port "${CHARSTREAM_PORT:-50051}" \
        --http-port "$http_port" "$@"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case $cmd in
    demo) run_demo "$@" ;;
    test) run_tests "$@" ;;
    serve) run_serve "$@" ;;
    *) die "usage: ./run.sh demo [--retrain] | test [pytest args] | serve [server flags]" ;;
esac
