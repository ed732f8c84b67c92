#!/usr/bin/env bash
# A real, throwaway Slurm (slurmctld + slurmd) on this one machine, for tests and for trying the
# templates in slurm/ without a cluster.
#
#   scripts/local_slurm.sh start     install Debian's slurmctld/slurmd/slurm-client if missing (root),
#                                    write slurm.conf + cgroup.conf, start both daemons, wait until
#                                    the node is idle, print `export SLURM_CONF=...`
#   scripts/local_slurm.sh status    print `export SLURM_CONF=...` and sinfo; exit 1 when not running
#   scripts/local_slurm.sh stop      cancel jobs, stop both daemons, remove the state directory
#
# Knobs (environment):
#   DFT_SLURM_DIR   state directory: slurm.conf, logs, spool, pid files (default: $TMPDIR/dft_ds-slurm-$UID)
#   DFT_SLURM_PORT  slurmctld port; slurmd uses the next one (default 16817: not Slurm's 6817, so a real
#                   Slurm on the same machine is left alone)
#   DFT_SLURM_WAIT  seconds to wait for the node to become idle (default 60)
#
# Both commands are safe to call twice: `start` on a running instance only prints the export line,
# `stop` on a stopped one does nothing. Everything listens on 127.0.0.1. Authentication is off
# (auth/none, cred/none) and everything runs as root: never use this configuration on a shared host.
set -euo pipefail
PATH=$PATH:/usr/sbin:/sbin  # slurmctld and slurmd live in sbin

DIR=${DFT_SLURM_DIR:-${TMPDIR:-/tmp}/dft_ds-slurm-$(id -u)}
PORT=${DFT_SLURM_PORT:-16817}
WAIT=${DFT_SLURM_WAIT:-60}
CONF=$DIR/slurm.conf
MARK=$DIR/.dft_local_slurm   # only a directory carrying this mark is ever removed by `stop`
HOST=$(hostname -s)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

say() { printf 'local_slurm: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

install_if_missing() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null; then
        return
    fi
    [ "$(id -u)" = 0 ] || die "Slurm is not installed and installing it needs root (apt-get install slurmctld slurmd slurm-client)"
    command -v apt-get >/dev/null || die "Slurm is not installed and apt-get is not available"
    say "installing slurmctld slurmd slurm-client (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    # The packages' own services are not wanted (they would start without a slurm.conf and fail
    # the install): a policy-rc.d that says "no" while installing, unless one is there already.
    local policy=/usr/sbin/policy-rc.d added=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && added=1
    fi
    local rc=0
    { apt-get update -q && apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client; } >&2 || rc=$?
    if [ "$added" = 1 ]; then rm -f "$policy"; fi
    [ "$rc" = 0 ] || die "apt-get failed ($rc)"
}

pid_alive() {  # pid_alive PIDFILE
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

running() {
    pid_alive "$DIR/slurmctld.pid" && pid_alive "$DIR/slurmd.pid"
}

write_conf() {
    local cpus
    cpus=$(nproc)
    mkdir -p "$DIR/state" "$DIR/spool"
    : > "$MARK"
    # The shared settings and why each is there: scripts/slurm.conf.in.
    {
        echo "# Written by scripts/local_slurm.sh from scripts/slurm.conf.in; removed by 'scripts/local_slurm.sh stop'."
        sed -e "s|@CLUSTER@|dftlocal|g" -e "s|@HOST@|$HOST|g" -e "s|@ADDRESS@|127.0.0.1|g" \
            -e "s|@PORT@|$PORT|g" -e "s|@SLURMD_PORT@|$((PORT + 1))|g" -e "s|@DIR@|$DIR|g" -e "s|@NODE@||g" \
            -e "s|@SLURMD_TIMEOUT@|60|g" "$HERE/slurm.conf.in"
        echo "NodeName=$HOST NodeAddr=127.0.0.1 NodeHostname=$HOST CPUs=$cpus State=UNKNOWN"
        echo "PartitionName=local Nodes=$HOST Default=YES MaxTime=INFINITE State=UP"
    } > "$CONF"
    if grep -v '^#' "$CONF" | grep -q '@[A-Z_]*@'; then die "$CONF: a field of slurm.conf.in was left unfilled"; fi
    # slurmd reads cgroup.conf from beside slurm.conf; v1 without automount is what runs here.
    printf 'CgroupPlugin=cgroup/v1\nCgroupAutomount=no\n' > "$DIR/cgroup.conf"
}

node_state() {
    SLURM_CONF=$CONF sinfo -h -N -n "$HOST" -o '%T' 2>/dev/null | head -n1
}

start() {
    install_if_missing
    if running; then
        say "already running (state in $DIR)"
        echo "export SLURM_CONF=$CONF"
        return
    fi
    stop_daemons  # leftovers of a half-started instance
    local port
    for port in "$PORT" "$((PORT + 1))"; do
        # Something already listening (another Slurm, an instance in another DFT_SLURM_DIR) would
        # answer our clients in place of the daemons started here.
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            die "port $port is in use (another local Slurm? choose others with DFT_SLURM_PORT)"
        fi
    done
    rm -rf "$DIR/state" "$DIR/spool"
    write_conf
    # -c: a clean start (no jobs from an earlier instance); -i: ignore state that does not fit.
    slurmctld -f "$CONF" -c -i
    slurmd -f "$CONF"
    local deadline=$((SECONDS + WAIT)) grace=$((SECONDS + 5)) state=""
    while [ "$SECONDS" -lt "$deadline" ]; do
        if [ "$SECONDS" -ge "$grace" ] && ! running; then
            state="daemon exited"
            break
        fi
        state=$(node_state || true)
        case "$state" in
            idle*|mixed*|allocated*) break ;;
            down*|drain*)  # a first registration can race with the controller: bring it back once
                SLURM_CONF=$CONF scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    running || state="daemon exited"
    case "$state" in
        idle*|mixed*|allocated*) ;;
        *) say "node state after ${WAIT}s: '${state:-none}'"
           tail -n 20 "$DIR/slurmctld.log" "$DIR/slurmd.log" >&2 2>/dev/null || true
           die "the local Slurm did not become ready" ;;
    esac
    say "running: node $HOST ($(nproc) CPUs) idle; state in $DIR"
    echo "export SLURM_CONF=$CONF"
}

stop_daemons() {
    local name pidfile pid i
    for name in slurmd slurmctld; do
        pidfile=$DIR/$name.pid
        [ -s "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null || true
            for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
            kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$pidfile"
    done
}

stop() {
    if [ ! -e "$MARK" ]; then
        say "not running (no instance in $DIR)"
        return
    fi
    if running; then
        # Cancel jobs first, so their steps (slurmstepd and the job's processes) end with them.
        SLURM_CONF=$CONF scancel --full --quiet --partition=local >/dev/null 2>&1 || true
        local deadline=$((SECONDS + 30))
        while [ "$SECONDS" -lt "$deadline" ] && [ -n "$(SLURM_CONF=$CONF squeue -h -o %i 2>/dev/null)" ]; do
            sleep 0.5
        done
    fi
    stop_daemons
    rm -rf "$DIR"
    say "stopped; removed $DIR"
}

status() {
    if running; then
        echo "export SLURM_CONF=$CONF"
        SLURM_CONF=$CONF sinfo -N >&2
    else
        say "not running (state directory $DIR)"
        return 1
    fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status   (state in \$DFT_SLURM_DIR, default $DIR)" >&2; exit 2 ;;
esac
