#!/usr/bin/env bash
# Run fedunlearn on a real Flower deployment on this machine (loopback only):
# one `flower-superlink`, N `flower-supernode`s, then `flwr run . <connection> --stream`.
# Node FORGET_NODE asks to be forgotten through its node-config (not through the
# run-config: `forget.clients` is set empty so that only node-config requests count).
#
# Usage (from the repository root):
#   scripts/deploy_local.sh [run-config pairs...]
#   scripts/deploy_local.sh 'pretrain.rounds=10' 'unlearn.rounds=5'
#   NUM_NODES=5 FORGET_SCOPE=class FORGET_CLASSES=3 METHOD=retrain,ft,not scripts/deploy_local.sh
#
# Environment (all optional):
#   NUM_NODES          SuperNodes to start and federation.num-clients      (default 3)
#   FORGET_NODE        partition id of the node that asks to be forgotten   (default 0;
#                      "none" or -1: no node asks)
#   FORGET_SCOPE       client | class | instance                           (default client)
#   FORGET_CLASSES     e.g. "3" or "3,5" (class-wise)                      (default empty)
#   FORGET_SAMPLE_IDS  e.g. "12,40" global training ids (instance-wise)   (default empty)
#   FORGET_FRACTION    e.g. 0.1: share of the node's samples (instance-wise, no ids)
#   METHOD             run-config `method`                                 (default not)
#   OUTPUT_DIR         run-config `output-dir`              (default $WORKDIR/results)
#   WORKDIR            scratch dir: FLWR_HOMEs, logs, pids  (default: mktemp -d; kept)
#   FLWR_BIN_DIR       where flower-superlink/flower-supernode/flwr live
#                      (default .venv/bin if it exists, else $PATH)
#   NODE_CONFIG_<i>    extra node-config pairs for SuperNode i, e.g.
#                      NODE_CONFIG_1='forget-scope="class" forget-classes="3"'
#   RUN_TIMEOUT        seconds before `flwr run` is given up                (default 0: none)
#
# Every run-config pair given as an argument is passed to `flwr run --run-config`
# after the script's own (later keys win), e.g. 'dataset.name="digits"' pretrain.rounds=5.
#
# The SuperLink and SuperNodes get free ports of their own, so several runs (and the
# default ports 8000/9094 or the simulation's 39091/39093) do not collide. On exit
# (success, error, Ctrl-C, SIGTERM) every process this script started, and the
# processes they started (SuperExec, ServerApp, ClientApp), is stopped by its PID.
#
# Exit status: 0 when the ServerApp finished and wrote its results file, 1 otherwise
# (note that `flwr run --stream` itself exits 0 even when the ServerApp crashed).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

NUM_NODES="${NUM_NODES:-3}"
FORGET_NODE="${FORGET_NODE:-0}"
FORGET_SCOPE="${FORGET_SCOPE:-client}"
FORGET_CLASSES="${FORGET_CLASSES:-}"
FORGET_SAMPLE_IDS="${FORGET_SAMPLE_IDS:-}"
FORGET_FRACTION="${FORGET_FRACTION:-}"
METHOD="${METHOD:-not}"
RUN_TIMEOUT="${RUN_TIMEOUT:-0}"
WORKDIR="${WORKDIR:-$(mktemp -d "${TMPDIR:-/tmp}/fedunlearn-deploy.XXXXXX")}"
mkdir -p "$WORKDIR"
WORKDIR="$(cd "$WORKDIR" && pwd)"
OUTPUT_DIR="${OUTPUT_DIR:-$WORKDIR/results}"
LOG_DIR="$WORKDIR/logs"
PID_FILE="$WORKDIR/pids"          # one PID a line, every process started (for tests)
mkdir -p "$LOG_DIR"
: > "$PID_FILE"

if [[ -z "${FLWR_BIN_DIR:-}" ]]; then
    if [[ -x "$REPO_ROOT/.venv/bin/flower-superlink" ]]; then
        FLWR_BIN_DIR="$REPO_ROOT/.venv/bin"
    else
        FLWR_BIN_DIR="$(dirname "$(command -v flower-superlink)")"
    fi
fi
# SuperLink and SuperNodes start `flower-superexec`, `flwr-serverapp` and
# `flwr-clientapp` by name: they must be on PATH (as in an activated venv).
export PATH="$FLWR_BIN_DIR:$PATH"
PYTHON="$FLWR_BIN_DIR/python"
[[ -x "$PYTHON" ]] || PYTHON="$(command -v python3)"

if ! [[ "$NUM_NODES" =~ ^[1-9][0-9]*$ ]]; then
    echo "NUM_NODES=$NUM_NODES must be a positive integer" >&2
    exit 2
fi

# Environment of every Flower process: a private FLWR_HOME, no `uv sync` of the app's
# dependencies at run time (they are already installed here), no update check/telemetry.
export FLWR_HOME="$WORKDIR/flwr-home"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_TELEMETRY_ENABLED=0
mkdir -p "$FLWR_HOME"

STARTED=()   # PIDs of the processes this script started, in start order

log() { printf '[deploy_local] %s\n' "$*" >&2; }

descendants() {  # every descendant PID of $1, deepest last
    local child
    for child in $(pgrep -P "$1" 2>/dev/null); do
        echo "$child"
        descendants "$child"
    done
}

alive() {  # running and not a zombie
    local line
    if [[ -d /proc/self ]]; then
        { read -r line < "/proc/$1/stat"; } 2>/dev/null || return 1
        line="${line##*) }"
        [[ "${line:0:1}" != Z && "${line:0:1}" != X ]]
    else
        kill -0 "$1" 2>/dev/null
    fi
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    local pid all=() left=()
    # Snapshot the whole tree first: once a parent is gone its children are re-parented.
    for pid in "${STARTED[@]}"; do
        all+=("$pid")
        all+=($(descendants "$pid"))
    done
    printf '%s\n' "${all[@]}" >> "$PID_FILE"
    if ((${#all[@]})); then
        log "stopping ${#all[@]} process(es): ${all[*]}"
        for pid in "${STARTED[@]}"; do kill -TERM "$pid" 2>/dev/null; done
        for _ in $(seq 50); do                  # up to 5 s for a clean shutdown
            left=()
            for pid in "${all[@]}"; do alive "$pid" && left+=("$pid"); done
            ((${#left[@]})) || break
            sleep 0.1
        done
        for pid in "${left[@]}"; do kill -TERM "$pid" 2>/dev/null; done
        for _ in $(seq 50); do                  # and 5 s more for the descendants
            left=()
            for pid in "${all[@]}"; do alive "$pid" && left+=("$pid"); done
            ((${#left[@]})) || break
            sleep 0.1
        done
        for pid in "${left[@]}"; do
            log "process $pid did not stop on SIGTERM: SIGKILL"
            kill -KILL "$pid" 2>/dev/null
        done
        wait 2>/dev/null   # reap our own children
    fi
    log "logs: $LOG_DIR"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start() {  # start <log-file> <command...>: run in the background, record its PID
    local logfile="$1"
    shift
    "$@" > "$logfile" 2>&1 < /dev/null &
    STARTED+=("$!")
    echo "$!" >> "$PID_FILE"
}

free_ports() {  # free_ports <n>: n distinct free TCP ports on 127.0.0.1
    "$PYTHON" - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
EOF
}

read -r -a PORTS <<< "$(free_ports $((NUM_NODES + 1)))"
SUPERLINK_PORT="${PORTS[0]}"
SUPERLINK="127.0.0.1:$SUPERLINK_PORT"

# --- SuperLink: Fleet, Control and Runtime HTTP APIs all on one port ------------------
log "starting SuperLink on $SUPERLINK (insecure, loopback only)"
start "$LOG_DIR/superlink.log" "$FLWR_BIN_DIR/flower-superlink" --insecure \
    --host 127.0.0.1 --port "$SUPERLINK_PORT" \
    --disable-runtime-dependency-installation
SUPERLINK_PID="${STARTED[-1]}"
if ! "$PYTHON" - "$SUPERLINK" "$SUPERLINK_PID" <<'EOF'
import os, sys, time, urllib.request

address, pid = sys.argv[1], int(sys.argv[2])

def alive() -> bool:  # running and not a zombie
    if os.path.isdir("/proc/self"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except OSError:
            return False
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False

deadline = time.monotonic() + 60
while time.monotonic() < deadline and alive():
    try:
        urllib.request.urlopen(f"http://{address}/health", timeout=1)
        sys.exit(0)
    except OSError:
        time.sleep(0.1)
sys.exit(1)
EOF
then
    log "SuperLink did not come up on $SUPERLINK:"
    tail -n 30 "$LOG_DIR/superlink.log" >&2
    exit 1
fi

# --- SuperNodes -------------------------------------------------------------------------
# Each SuperNode gets its own FLWR_HOME: its ClientApp processes install the app
# bundle there, and nodes sharing one directory could race on the first message.
for ((i = 0; i < NUM_NODES; i++)); do
    node_config="partition-id=$i num-partitions=$NUM_NODES"
    if [[ "$i" == "$FORGET_NODE" ]]; then
        node_config+=" forget-scope=\"$FORGET_SCOPE\""
        [[ -n "$FORGET_CLASSES" ]] && node_config+=" forget-classes=\"$FORGET_CLASSES\""
        [[ -n "$FORGET_SAMPLE_IDS" ]] && node_config+=" forget-sample-ids=\"$FORGET_SAMPLE_IDS\""
        [[ -n "$FORGET_FRACTION" ]] && node_config+=" forget-fraction=$FORGET_FRACTION"
    fi
    extra_var="NODE_CONFIG_$i"
    [[ -n "${!extra_var:-}" ]] && node_config+=" ${!extra_var}"
    log "starting SuperNode $i (Runtime API on 127.0.0.1:${PORTS[i + 1]}): --node-config '$node_config'"
    mkdir -p "$WORKDIR/supernode-$i"
    FLWR_HOME="$WORKDIR/supernode-$i" start "$LOG_DIR/supernode-$i.log" \
        "$FLWR_BIN_DIR/flower-supernode" --insecure --superlink "$SUPERLINK" \
        --host 127.0.0.1 --port "${PORTS[i + 1]}" --node-config "$node_config"
done

# --- Connection for the Flower CLI --------------------------------------------------------
cat > "$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "local-deployment"

[superlink.local-deployment]
address = "$SUPERLINK"
insecure = true
EOF

# --- Run ---------------------------------------------------------------------------------
RUN_CONFIG="federation.num-clients=$NUM_NODES forget.clients=\"\" method=\"$METHOD\" output-dir=\"$OUTPUT_DIR\""
for pair in "$@"; do RUN_CONFIG+=" $pair"; done
log "flwr run . local-deployment --stream --run-config '$RUN_CONFIG'"
STARTED_MARK="$WORKDIR/.run-started"
touch "$STARTED_MARK"
RUN_CMD=("$FLWR_BIN_DIR/flwr" run . local-deployment --stream --run-config "$RUN_CONFIG")
if [[ "$RUN_TIMEOUT" != 0 ]]; then RUN_CMD=(timeout "$RUN_TIMEOUT" "${RUN_CMD[@]}"); fi
# In the background and `wait`ed for, so that SIGINT/SIGTERM run the trap at once.
: > "$LOG_DIR/run.log"
start "$LOG_DIR/run.log" "${RUN_CMD[@]}"
RUN_PID="${STARTED[-1]}"
tail -n +1 -f --pid="$RUN_PID" "$LOG_DIR/run.log" &
TAIL_PID=$!
STARTED+=("$TAIL_PID")
set +e
wait "$RUN_PID"
run_rc=$?
wait "$TAIL_PID" 2>/dev/null
set -e

# `flwr run --stream` exits 0 even when the ServerApp failed: look at what it wrote
# (only files written by this run count, in case OUTPUT_DIR is reused).
results=""
for f in "$OUTPUT_DIR/results.json" "$OUTPUT_DIR"/*/results.json "$OUTPUT_DIR/no-request.json"; do
    [[ -f "$f" && "$f" -nt "$STARTED_MARK" ]] && results+="$f "
done
if [[ $run_rc -ne 0 ]] || grep -qE "Exit Code: [0-9]+|An unhandled exception occurred" "$LOG_DIR/run.log" \
        || [[ -z "$results" ]]; then
    log "run FAILED (flwr run exit status $run_rc); see $LOG_DIR/run.log and $LOG_DIR/superlink.log"
    exit 1
fi
log "results: $results"
