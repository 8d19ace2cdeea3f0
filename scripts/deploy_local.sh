#!/usr/bin/env bash
# Run fedunlearn on a real Flower deployment on this machine (loopback only):
# one `flower-superlink`, N `flower-supernode`s, then `flwr run . <connection> --stream`.
#
# By default the deployment is secured as a real one would be: a throwaway CA and
# server certificate (TLS on every API), one ECDSA key pair per SuperNode, SuperNode
# authentication on the SuperLink, and each SuperNode's public key registered with
# `flwr supernode register` before it starts. Every SuperNode has a request inbox
# (node-config `inbox=...`); node FORGET_NODE's data owner files its request there with
# `fedunlearn request file` once the SuperNodes run, the server's verdicts come back to
# the inbox as receipts, and the ServerApp writes an audit log ($OUTPUT_DIR/audit.jsonl).
# The run-config's `forget.clients` keeps its default: a deployment ignores it (requests
# come from the nodes).
#
# With --private-data, the nodes hold data of their own and no partition id: each
# SuperNode starts with only `dataset-path` (its own folder) and `inbox` in its
# node-config, and a user's app built with `fedunlearn.client.attach()` and
# `fedunlearn.serve()` runs (APP, default examples/quickstart-pytorch-unlearning). Every
# request binds to the node that filed it. Each node's folder is DATASET_PATH_<i> when
# set, else the script writes node i's share of scikit-learn's digits there (an on-disk
# Hugging Face dataset, train/test) before the SuperNodes start.
#
# The defaults finish in a sitting on 2 cores: measured 8 min (harness) and 11 min
# (--private-data) while other jobs kept the machine at load average 5-10; the script
# prints its estimate for an idle machine first (docs/deployment.md, "Timing").
#
# Usage (from the repository root):
#   scripts/deploy_local.sh [--private-data] [run-config pairs...]
#   scripts/deploy_local.sh 'pretrain.rounds=10' 'unlearn.rounds=5'
#   FORGET_NODE=1 FORGET_SCOPE=class FORGET_CLASSES=3 scripts/deploy_local.sh --private-data
#   NUM_NODES=5 FORGET_SCOPE=class FORGET_CLASSES=3 METHOD=retrain,ft,not scripts/deploy_local.sh
#   STRANGER_NODES=1 scripts/deploy_local.sh   # plus a SuperNode whose key is not registered
#   SECURE=0 FORGET_VIA=node-config scripts/deploy_local.sh   # insecure, node-config request
#
# Environment (all optional):
#   NUM_NODES          SuperNodes to start and federation.num-clients      (default 3)
#   SECURE             1: TLS + SuperNode authentication; 0: --insecure     (default 1)
#   STRANGER_NODES     extra SuperNodes with unregistered keys claiming partition 0
#                      (needs SECURE=1): the SuperLink must refuse them     (default 0)
#   FORGET_NODE        partition id of the node that asks to be forgotten   (default 0;
#                      "none" or -1: no node asks)
#   FORGET_VIA         inbox: filed with `fedunlearn request file` once the SuperNodes
#                      run; node-config: forget-* pairs in its node-config  (default inbox)
#   FORGET_SCOPE       client | class | instance                           (default client)
#   FORGET_CLASSES     e.g. "3" or "3,5" (class-wise)                      (default empty)
#   FORGET_SAMPLE_IDS  e.g. "12,40" global training ids (instance-wise)   (default empty)
#   FORGET_FRACTION    e.g. 0.1: share of the node's samples (instance-wise, no ids)
#   INBOX_REQUEST_<i>  arguments of one more `fedunlearn request file` on SuperNode i's
#                      inbox, e.g. INBOX_REQUEST_1='--scope class --classes 3'; several
#                      requests separated by ';', filed in that order
#   RUNS               jobs (`flwr run`) one after the other on the same SuperLink and
#                      SuperNodes (a node's inbox sends one scope per job); with RUNS>1
#                      job k writes to $OUTPUT_DIR/run-<k>                   (default 1)
#   RESTARTS           when a job's ServerApp dies (killed, lost: no closing line), run
#                      the job again with the same run-config on the same output dir, up
#                      to this many times, as a supervisor would; a service-mode job
#                      (service.rounds > 0) resumes from its checkpoint       (default 0)
#   METHOD             run-config `method`                                 (default not)
#   OUTPUT_DIR         run-config `output-dir`              (default $WORKDIR/results)
#   WORKDIR            scratch dir: FLWR_HOMEs, certificates and keys, inboxes, logs, pids
#                      (default: mktemp -d; kept)
#   FLWR_BIN_DIR       where flower-superlink/flower-supernode/flwr/fedunlearn live
#                      (default .venv/bin if it exists, else $PATH)
#   NODE_CONFIG_<i>    extra node-config pairs for SuperNode i, e.g.
#                      NODE_CONFIG_1='forget-scope="class" forget-classes="3"'
#   RUN_TIMEOUT        seconds before `flwr run` is given up                (default 0: none)
#   APP                the Flower app to run: this repository (the harness) or another
#                      app's folder, e.g. examples/quickstart-pytorch-unlearning; for
#                      another app only output-dir and the arguments go into its
#                      run-config       (default . ; --private-data: the example)
#   DATASET_PATH_<i>   --private-data: SuperNode i's own data folder (default: node i's
#                      share of digits, written to $WORKDIR/node-data/node-<i>)
#
# Every run-config pair given as an argument is passed to `flwr run --run-config`
# after the script's own (later keys win), e.g. 'dataset.name="digits"' pretrain.rounds=5.
# The script's own: for the harness pretrain.rounds=5 unlearn.rounds=3 (the app's
# defaults, 30 and 11 rounds, do not finish in a sitting on 2 cores); for the example
# app num-server-rounds=3 recovery-rounds=5 methods="not" (fewer recovery rounds can leave
# NoT degraded, which serve() reports as a failure).
#
# The SuperLink and SuperNodes get free ports of their own, so several runs (and the
# default ports 8000/9094 or the simulation's 39091/39093) do not collide. On exit
# (success, error, Ctrl-C, SIGTERM) every process this script started, and the
# processes they started (SuperExec, ServerApp, ClientApp), is stopped by its PID.
#
# In WORKDIR: certs/ (ca.crt, server.pem, supernode-<i> and supernode-<i>.pub),
# inbox-<i>/ (SuperNode i's request inbox), node-ids ("<partition> <registered node id>"
# lines), strangers ("<name> exited <status>" lines), logs/, pids.
#
# Exit status: 0 when the ServerApp finished and wrote its results file and every
# unregistered SuperNode was refused, 1 otherwise (note that `flwr run --stream` itself
# exits 0 even when the ServerApp crashed), 2 on bad settings.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

PRIVATE_DATA="${PRIVATE_DATA:-0}"
ARGS=()
for arg in "$@"; do
    case "$arg" in
        --private-data) PRIVATE_DATA=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        --*) echo "unknown option $arg (options: --private-data, --help; anything else is a" \
                  "run-config pair key=value)" >&2; exit 2 ;;
        *) ARGS+=("$arg") ;;
    esac
done
set -- ${ARGS[@]+"${ARGS[@]}"}

NUM_NODES="${NUM_NODES:-3}"
SECURE="${SECURE:-1}"
STRANGER_NODES="${STRANGER_NODES:-0}"
FORGET_NODE="${FORGET_NODE:-0}"
FORGET_VIA="${FORGET_VIA:-inbox}"
FORGET_SCOPE="${FORGET_SCOPE:-client}"
FORGET_CLASSES="${FORGET_CLASSES:-}"
FORGET_SAMPLE_IDS="${FORGET_SAMPLE_IDS:-}"
FORGET_FRACTION="${FORGET_FRACTION:-}"
METHOD="${METHOD:-not}"
RUN_TIMEOUT="${RUN_TIMEOUT:-0}"
RUNS="${RUNS:-1}"
RESTARTS="${RESTARTS:-0}"
if [[ "$PRIVATE_DATA" == 1 ]]; then
    APP="${APP:-examples/quickstart-pytorch-unlearning}"
else
    APP="${APP:-.}"
fi
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
if [[ -x "$FLWR_BIN_DIR/fedunlearn" ]]; then
    FEDUNLEARN=("$FLWR_BIN_DIR/fedunlearn")
else  # an install without the console script
    FEDUNLEARN=("$PYTHON" -m fedunlearn.cli)
fi

if ! [[ "$NUM_NODES" =~ ^[1-9][0-9]*$ ]]; then
    echo "NUM_NODES=$NUM_NODES must be a positive integer" >&2
    exit 2
fi
if ! [[ "$RUNS" =~ ^[1-9][0-9]*$ ]]; then
    echo "RUNS=$RUNS must be a positive integer (jobs to run one after the other)" >&2
    exit 2
fi
if ! [[ "$RESTARTS" =~ ^[0-9]+$ ]]; then
    echo "RESTARTS=$RESTARTS must be a count (restarts of a job whose ServerApp died)" >&2
    exit 2
fi
if [[ "$SECURE" != 0 && "$SECURE" != 1 ]]; then
    echo "SECURE=$SECURE must be 1 (TLS + SuperNode authentication) or 0 (insecure)" >&2
    exit 2
fi
if ! [[ "$STRANGER_NODES" =~ ^[0-9]+$ ]] || { [[ "$SECURE" == 0 ]] && ((STRANGER_NODES > 0)); }; then
    echo "STRANGER_NODES=$STRANGER_NODES must be a count and needs SECURE=1 (without" \
         "SuperNode authentication nothing refuses an unregistered SuperNode)" >&2
    exit 2
fi
if [[ "$PRIVATE_DATA" == 1 && "$(cd "$APP" && pwd)" == "$REPO_ROOT" ]]; then
    echo "--private-data runs a user's app (attach() + serve(), e.g." \
         "APP=examples/quickstart-pytorch-unlearning): the harness at the repository root" \
         "needs partition-id on every node" >&2
    exit 2
fi
if [[ "$FORGET_VIA" != inbox && "$FORGET_VIA" != node-config ]]; then
    echo "FORGET_VIA=$FORGET_VIA must be inbox or node-config" >&2
    exit 2
fi

# The run-config is checked before anything starts (every key's type and range, the
# device, the output folder): a bad value exits 2 naming it.
if [[ "$(cd "$APP" && pwd)" == "$REPO_ROOT" ]]; then
    if ! "$PYTHON" -m fedunlearn.launch --check "federation.num-clients=$NUM_NODES" \
            "method=$METHOD" "output-dir=$OUTPUT_DIR" "$@" > /dev/null; then
        echo "bad run-config (see above); nothing was started" >&2
        exit 2
    fi
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

start_appending() {  # start_appending <log-file> <command...>: as start, appending to the log
    local logfile="$1"
    shift
    "$@" >> "$logfile" 2>&1 < /dev/null &
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

# --- The script's run-config defaults (sized to finish in a sitting), the estimate -------
DEFAULT_RUN_CONFIG=""   # another app: its own defaults
if [[ "$(cd "$APP" && pwd)" == "$REPO_ROOT" ]]; then
    DEFAULT_RUN_CONFIG="pretrain.rounds=5 unlearn.rounds=3"
elif [[ "$(cd "$APP" && pwd)" == "$REPO_ROOT/examples/quickstart-pytorch-unlearning" ]]; then
    DEFAULT_RUN_CONFIG="num-server-rounds=3 recovery-rounds=5 methods=\"not\""
fi
[[ -n "$DEFAULT_RUN_CONFIG" ]] && "$PYTHON" - "$NUM_NODES" "$RUNS" "$METHOD" \
    $DEFAULT_RUN_CONFIG "$@" <<'EOF' >&2
# Every message starts a ClientApp process (~9 CPU-s: torch and fedunlearn imported) and
# SuperNodes poll every 3 s: a wave of messages to N nodes takes about 4.5 N + 3 s on 2
# cores. Measured: docs/deployment.md, "Timing".
import re, sys
nodes, runs, method, pairs = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:]
cfg = {}
for pair in pairs:
    key, _, value = pair.partition("=")
    cfg[key.strip()] = value.strip().strip('"')
num = lambda key, default: int(cfg[key]) if re.fullmatch(r"\d+", cfg.get(key, "")) else default
if "num-server-rounds" in cfg or "recovery-rounds" in cfg:  # the example app
    methods = len(cfg.get("methods", "not").split(","))
    waves = 2 * num("num-server-rounds", 3) + 3 + methods * (num("recovery-rounds", 2) + 2)
else:  # the harness: pretraining, then per method its rounds and two evaluations
    methods = len(cfg.get("method", method).split(","))
    waves = num("pretrain.rounds", 5) + 6 + methods * (num("unlearn.rounds", 3) + 3)
seconds = runs * (40 + waves * (4.5 * nodes + 3))
print(f"[deploy_local] expected duration: about {seconds / 60:.0f} min on an idle 2-core "
      f"machine ({waves} message waves to {nodes} SuperNodes), up to 3x on a busy one")
EOF

# --- --private-data: each node's own data folder, written before anything starts -------
DATASET_PATHS=()
if [[ "$PRIVATE_DATA" == 1 ]]; then
    missing=()
    for ((i = 0; i < NUM_NODES; i++)); do
        path_var="DATASET_PATH_$i"
        if [[ -n "${!path_var:-}" ]]; then
            if [[ ! -d "${!path_var}" ]]; then
                echo "$path_var=${!path_var} is not a folder (SuperNode $i's own data)" >&2
                exit 2
            fi
            DATASET_PATHS+=("$(cd "${!path_var}" && pwd)")
        else
            DATASET_PATHS+=("$WORKDIR/node-data/node-$i")
            missing+=("$i")
        fi
    done
    if ((${#missing[@]})); then
        "$PYTHON" - "$WORKDIR/node-data" "$NUM_NODES" "${missing[@]}" <<'EOF'
# Node i's share of scikit-learn's digits (the example app's own split: the last 360 of
# the shuffle are the server's test set), as an on-disk Hugging Face dataset.
import sys
import numpy as np
from datasets import Dataset, DatasetDict
from datasets.utils.logging import disable_progress_bar
from sklearn.datasets import load_digits

disable_progress_bar()
root, n = sys.argv[1], int(sys.argv[2])
x, y = load_digits(return_X_y=True)
order = np.random.default_rng(42).permutation(len(y))[: len(y) - 360]
for i in map(int, sys.argv[3:]):
    part = np.array_split(order, n)[i]
    cut = int(0.8 * len(part))
    table = lambda ids: Dataset.from_dict({"img": (x[ids] / 16.0).reshape(-1, 8, 8).tolist(),
                                           "label": y[ids].tolist()})
    DatasetDict({"train": table(part[:cut]), "test": table(part[cut:])}).save_to_disk(
        f"{root}/node-{i}")
EOF
        log "wrote node(s) ${missing[*]}'s own digits data to $WORKDIR/node-data/node-<i>"
    fi
fi

read -r -a PORTS <<< "$(free_ports $((NUM_NODES + STRANGER_NODES + 1)))"
SUPERLINK_PORT="${PORTS[0]}"
SUPERLINK="127.0.0.1:$SUPERLINK_PORT"
CERTS="$WORKDIR/certs"

# --- Certificates and SuperNode keys (generated here, nothing is downloaded) ------------
if [[ "$SECURE" == 1 ]]; then
    key_names=()
    for ((i = 0; i < NUM_NODES; i++)); do key_names+=(--node "$i"); done
    for ((k = 0; k < STRANGER_NODES; k++)); do key_names+=(--node "stranger-$k"); done
    "$PYTHON" "$REPO_ROOT/scripts/make_certs.py" "$CERTS" --host 127.0.0.1 --host localhost \
        "${key_names[@]}"
    log "throwaway CA, SuperLink certificate and SuperNode keys in $CERTS"
    LINK_SECURITY=(--ssl-ca-certfile "$CERTS/ca.crt" --ssl-certfile "$CERTS/server.pem"
                   --ssl-keyfile "$CERTS/server.key" --enable-supernode-auth)
    HEALTH_URL="https://$SUPERLINK/health"
    SECURITY_NAME="TLS + SuperNode authentication"
else
    LINK_SECURITY=(--insecure)
    HEALTH_URL="http://$SUPERLINK/health"
    SECURITY_NAME="insecure"
fi

# --- SuperLink: Fleet, Control and Runtime HTTP APIs all on one port ------------------
log "starting SuperLink on $SUPERLINK ($SECURITY_NAME, loopback only)"
start "$LOG_DIR/superlink.log" "$FLWR_BIN_DIR/flower-superlink" "${LINK_SECURITY[@]}" \
    --host 127.0.0.1 --port "$SUPERLINK_PORT" \
    --disable-runtime-dependency-installation
SUPERLINK_PID="${STARTED[-1]}"
if ! "$PYTHON" - "$HEALTH_URL" "$SUPERLINK_PID" "$CERTS/ca.crt" <<'EOF'
import os, ssl, sys, time, urllib.request

url, pid, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3]
context = ssl.create_default_context(cafile=ca) if url.startswith("https") else None

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
        urllib.request.urlopen(url, timeout=1, context=context)
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

# --- Connection for the Flower CLI --------------------------------------------------------
if [[ "$SECURE" == 1 ]]; then
    CONNECTION_SECURITY="root-certificates = \"$CERTS/ca.crt\""
else
    CONNECTION_SECURITY="insecure = true"
fi
cat > "$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "local-deployment"

[superlink.local-deployment]
address = "$SUPERLINK"
$CONNECTION_SECURITY
EOF

# --- SuperNode keys, registered before the SuperNodes start -------------------------------
: > "$WORKDIR/node-ids"
if [[ "$SECURE" == 1 ]]; then
    for ((i = 0; i < NUM_NODES; i++)); do
        out="$("$FLWR_BIN_DIR/flwr" supernode register "$CERTS/supernode-$i.pub" \
               local-deployment 2>&1)" || {
            log "registering SuperNode $i's public key failed:"
            echo "$out" >&2
            exit 1
        }
        node_id="$(grep -oE 'SuperNode [0-9]+ registered' <<< "$out" | grep -oE '[0-9]+' || true)"
        echo "$i $node_id" >> "$WORKDIR/node-ids"
        log "registered SuperNode $i's public key: node id $node_id"
    done
fi

# --- SuperNodes -------------------------------------------------------------------------
# Each SuperNode gets its own FLWR_HOME: its ClientApp processes install the app
# bundle there, and nodes sharing one directory could race on the first message.
start_supernode() {  # start_supernode <name> <port> <node-config>: key certs/supernode-<name>
    local name="$1" port="$2" node_config="$3" security=(--insecure)
    if [[ "$SECURE" == 1 ]]; then
        security=(--root-certificates "$CERTS/ca.crt"
                  --auth-supernode-private-key "$CERTS/supernode-$name")
    fi
    log "starting SuperNode $name (Runtime API on 127.0.0.1:$port): --node-config '$node_config'"
    mkdir -p "$WORKDIR/supernode-$name"
    FLWR_HOME="$WORKDIR/supernode-$name" start "$LOG_DIR/supernode-$name.log" \
        "$FLWR_BIN_DIR/flower-supernode" "${security[@]}" --superlink "$SUPERLINK" \
        --host 127.0.0.1 --port "$port" --node-config "$node_config"
}
for ((i = 0; i < NUM_NODES; i++)); do
    mkdir -p "$WORKDIR/inbox-$i"
    if [[ "$PRIVATE_DATA" == 1 ]]; then  # its own data folder and inbox, no partition id
        node_config="dataset-path=\"${DATASET_PATHS[i]}\" inbox=\"$WORKDIR/inbox-$i\""
    else
        node_config="partition-id=$i num-partitions=$NUM_NODES inbox=\"$WORKDIR/inbox-$i\""
    fi
    if [[ "$i" == "$FORGET_NODE" && "$FORGET_VIA" == node-config ]]; then
        node_config+=" forget-scope=\"$FORGET_SCOPE\""
        [[ -n "$FORGET_CLASSES" ]] && node_config+=" forget-classes=\"$FORGET_CLASSES\""
        [[ -n "$FORGET_SAMPLE_IDS" ]] && node_config+=" forget-sample-ids=\"$FORGET_SAMPLE_IDS\""
        [[ -n "$FORGET_FRACTION" ]] && node_config+=" forget-fraction=$FORGET_FRACTION"
    fi
    extra_var="NODE_CONFIG_$i"
    [[ -n "${!extra_var:-}" ]] && node_config+=" ${!extra_var}"
    start_supernode "$i" "${PORTS[i + 1]}" "$node_config"
done
STRANGER_PIDS=()
for ((k = 0; k < STRANGER_NODES; k++)); do
    stranger_config="partition-id=0 num-partitions=$NUM_NODES"
    [[ "$PRIVATE_DATA" == 1 ]] && stranger_config="dataset-path=\"${DATASET_PATHS[0]}\""
    start_supernode "stranger-$k" "${PORTS[NUM_NODES + k + 1]}" \
        "$stranger_config forget-scope=\"client\""
    STRANGER_PIDS+=("${STARTED[-1]}")
done

# --- Requests filed by the data owners, in the running SuperNodes' inboxes ---------------
file_request() {  # file_request <partition> <`fedunlearn request file` arguments...>
    local i="$1" id
    shift
    id="$("${FEDUNLEARN[@]}" request file --inbox "$WORKDIR/inbox-$i" "$@")"
    log "filed inbox request $id on SuperNode $i: fedunlearn request file $*"
}
if [[ "$FORGET_VIA" == inbox && "$FORGET_NODE" =~ ^[0-9]+$ ]] && ((FORGET_NODE < NUM_NODES)); then
    request_args=(--scope "$FORGET_SCOPE")
    [[ -n "$FORGET_CLASSES" ]] && request_args+=(--classes "$FORGET_CLASSES")
    [[ -n "$FORGET_SAMPLE_IDS" ]] && request_args+=(--sample-ids "$FORGET_SAMPLE_IDS")
    [[ -n "$FORGET_FRACTION" ]] && request_args+=(--fraction "$FORGET_FRACTION")
    file_request "$FORGET_NODE" "${request_args[@]}"
fi
for ((i = 0; i < NUM_NODES; i++)); do
    extra_var="INBOX_REQUEST_$i"
    if [[ -n "${!extra_var:-}" ]]; then
        IFS=';' read -r -a node_requests <<< "${!extra_var}"
        for one in "${node_requests[@]}"; do
            read -r -a request_args <<< "$one"
            ((${#request_args[@]})) && file_request "$i" "${request_args[@]}"
        done
    fi
done

# --- Run ---------------------------------------------------------------------------------
run_job() {  # run_job <k> <output dir>: one job, restarted up to RESTARTS times if its ServerApp dies
    local k="$1" out="$2" attempt status
    for ((attempt = 0; ; attempt++)); do
        status=0
        run_job_once "$k" "$out" "$attempt" || status=$?
        if ((status == 3 && attempt < RESTARTS)); then
            log "job $k: the ServerApp died; restarting it ($((attempt + 1))/$RESTARTS) with" \
                "the same run-config on $out"
            continue
        fi
        ((RUNS > 1)) && cat "$LOG_DIR/run-$k.log" >> "$LOG_DIR/run.log"
        ((status == 0)) || exit 1
        return 0
    done
}

merge_pairs() {  # run-config pairs, each key once (flwr refuses a repeated key): later win
    local -A value=()
    local -a order=()
    local pair key out=""
    for pair in "$@"; do
        key="${pair%%=*}"
        [[ -z "${value[$key]+set}" ]] && order+=("$key")
        value[$key]="$pair"
    done
    for key in "${order[@]}"; do out+="${out:+ }${value[$key]}"; done
    printf '%s' "$out"
}

run_job_once() {  # one `flwr run`: 0 done, 3 the ServerApp died, 1 any other failure
    local k="$1" out="$2" attempt="$3" run_config pair run_log results f run_rc from
    if [[ "$(cd "$APP" && pwd)" == "$REPO_ROOT" ]]; then
        run_config="federation.num-clients=$NUM_NODES method=\"$METHOD\" output-dir=\"$out\""
    else  # a user's app: its own run-config keys
        run_config="output-dir=\"$out\""
    fi
    # shellcheck disable=SC2086  # the script's own pairs hold no spaces
    run_config="$(merge_pairs $run_config $DEFAULT_RUN_CONFIG "${RUN_ARGS[@]}")"
    run_log="$LOG_DIR/run.log"
    ((RUNS > 1)) && run_log="$LOG_DIR/run-$k.log"
    log "job $k/$RUNS: flwr run $APP local-deployment --stream --run-config '$run_config'"
    touch "$STARTED_MARK"
    RUN_CMD=("$FLWR_BIN_DIR/flwr" run "$APP" local-deployment --stream --run-config "$run_config")
    if [[ "$RUN_TIMEOUT" != 0 ]]; then RUN_CMD=(timeout "$RUN_TIMEOUT" "${RUN_CMD[@]}"); fi
    # In the background and `wait`ed for, so that SIGINT/SIGTERM run the trap at once.
    ((attempt == 0)) && : > "$run_log"
    from=$(($(wc -l < "$run_log") + 1))  # this attempt's output starts here
    start_appending "$run_log" "${RUN_CMD[@]}"
    RUN_PID="${STARTED[-1]}"
    tail -n +"$from" -f --pid="$RUN_PID" "$run_log" &
    TAIL_PID=$!
    STARTED+=("$TAIL_PID")
    set +e
    wait "$RUN_PID"
    run_rc=$?
    wait "$TAIL_PID" 2>/dev/null
    set -e

    # `flwr run --stream` exits 0 even when the ServerApp failed: look at what it wrote
    # (only files written by this run count, in case the output dir is reused).
    results=""
    for f in "$out/results.json" "$out"/*/results.json "$out/no-request.json" \
             "$out/service.json"; do
        [[ -f "$f" && "$f" -nt "$STARTED_MARK" ]] && results+="$f "
    done
    if [[ $run_rc -ne 0 ]] || tail -n +"$from" "$run_log" | grep -qE "Exit Code: [0-9]+|An unhandled exception occurred"; then
        log "job $k FAILED (flwr run exit status $run_rc); see $run_log and $LOG_DIR/superlink.log"
        return 1
    fi
    # The harness's ServerApp logs a closing line; without it it was killed or lost
    # (`flwr run --stream` still exits 0), even if some methods had written results.
    if [[ "$(cd "$APP" && pwd)" == "$REPO_ROOT" ]] \
            && ! tail -n +"$from" "$run_log" | grep -qE "Results written to |No valid unlearning request was received|\[service\] stopped at round "; then
        log "job $k FAILED: the ServerApp did not finish (no closing line in $run_log: it was" \
            "killed or lost); the methods it had not finished wrote no results"
        return 3
    fi
    if [[ -z "$results" ]]; then
        log "job $k FAILED: no results file written by this run in $out; see $run_log"
        return 1
    fi
    log "job $k results: $results"
}
RUN_ARGS=("$@")
STARTED_MARK="$WORKDIR/.run-started"
if ((RUNS > 1)); then : > "$LOG_DIR/run.log"; fi
for ((k = 1; k <= RUNS; k++)); do
    if ((RUNS > 1)); then run_job "$k" "$OUTPUT_DIR/run-$k"; else run_job 1 "$OUTPUT_DIR"; fi
done

# The SuperLink must have refused every SuperNode whose key was not registered.
: > "$WORKDIR/strangers"
refused_all=1
for ((k = 0; k < ${#STRANGER_PIDS[@]}; k++)); do
    pid="${STRANGER_PIDS[k]}"
    if alive "$pid"; then
        log "SuperNode stranger-$k (unregistered key) is still running: it was NOT refused"
        echo "stranger-$k running" >> "$WORKDIR/strangers"
        refused_all=0
    else
        set +e
        wait "$pid"
        code=$?
        set -e
        log "SuperNode stranger-$k (unregistered key) was refused: exit status $code"
        echo "stranger-$k exited $code" >> "$WORKDIR/strangers"
    fi
done

# What the data owners and the auditor can read now.
for ((i = 0; i < NUM_NODES; i++)); do
    if compgen -G "$WORKDIR/inbox-$i/requests/*.json" > /dev/null; then
        log "SuperNode $i's inbox (fedunlearn request list --inbox $WORKDIR/inbox-$i):"
        "${FEDUNLEARN[@]}" request list --inbox "$WORKDIR/inbox-$i" >&2 || true
    fi
done
for AUDIT_LOG in "${FEDUNLEARN_AUDIT_LOG:-$OUTPUT_DIR/audit.jsonl}" "$OUTPUT_DIR"/run-*/audit.jsonl; do
    if [[ -f "$AUDIT_LOG" ]]; then
        log "audit log (fedunlearn audit $AUDIT_LOG):"
        "${FEDUNLEARN[@]}" audit "$AUDIT_LOG" >&2 || true
    fi
done
((refused_all)) || exit 1
