#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine (Debian packages, no systemd), for tests/test_slurm.py.
#
#   tests/slurm/cluster.sh start    install if needed, write config, start munged/slurmctld/slurmd, wait for idle
#   tests/slurm/cluster.sh stop     stop the daemons this script started (by pid file)
#   tests/slurm/cluster.sh status   'running' (exit 0) or 'stopped' (exit 1)
#   tests/slurm/cluster.sh env      print the export line for SLURM_CONF
#
# Everything (config, state, spool, logs, pid files) lives under $SLURM_TEST_DIR (default /tmp/scenessl-slurm).
# Client commands find the config through SLURM_CONF=$SLURM_TEST_DIR/slurm.conf; the script also copies it to
# /etc/slurm/slurm.conf when that file is absent or was written by this script, so plain `sinfo` works too.
# Exit code 2 on 'start' means SLURM cannot be installed/started here (tests skip on it).
set -u

DIR="${SLURM_TEST_DIR:-/tmp/scenessl-slurm}"
CONF="$DIR/slurm.conf"
HOST="$(hostname -s)"
MARK="# written by scenessl tests/slurm/cluster.sh"
export SLURM_CONF="$CONF"

log() { echo "[cluster.sh] $*" >&2; }

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

is_running() {
    pid_alive /run/munge/munged.pid && pid_alive "$DIR/slurmctld.pid" && pid_alive "$DIR/slurmd.pid" &&
        sinfo -h -n "$HOST" -o '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc)'
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null &&
        command -v munged >/dev/null; then
        return 0
    fi
    if [ "$(id -u)" != 0 ]; then
        log "SLURM is not installed and we are not root: cannot apt-get install munge slurmctld slurmd slurm-client"
        return 2
    fi
    log "installing munge slurmctld slurmd slurm-client (apt-get) ..."
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get install -y -qq munge slurmctld slurmd slurm-client >"$DIR/apt.log" 2>&1 ||
           { apt-get update -qq >>"$DIR/apt.log" 2>&1 &&
             apt-get install -y -qq munge slurmctld slurmd slurm-client >>"$DIR/apt.log" 2>&1; }; }; then
        log "apt-get install failed, see $DIR/apt.log"
        tail -5 "$DIR/apt.log" >&2
        return 2
    fi
}

setup_munge() {
    mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
    if [ ! -s /etc/munge/munge.key ]; then
        log "creating /etc/munge/munge.key"
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
    chmod 0700 /etc/munge /var/log/munge
    chmod 0400 /etc/munge/munge.key
    chmod 0755 /run/munge
}

write_conf() {
    local cpus mem
    cpus="$(nproc)"
    # RealMemory (MB) must not exceed what slurmd detects, or the node is drained: use 90 % of MemTotal
    mem="$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)"
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    cat >"$CONF" <<EOF
$MARK
ClusterName=scenessl
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s)
AuthInfo=cred_expire=5
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
# short timers: quick requeue/cleanup in tests
MinJobAge=30
KillWait=5
MessageTimeout=10
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
WaitTime=0
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
JobRequeue=1
NodeName=$HOST CPUs=$cpus RealMemory=$mem State=UNKNOWN
# OverSubscribe=FORCE lets a few small test jobs share the CPUs of this one node
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
    if [ -d /etc/slurm ] || mkdir -p /etc/slurm 2>/dev/null; then
        if [ ! -e /etc/slurm/slurm.conf ] || head -1 /etc/slurm/slurm.conf | grep -qF "$MARK"; then
            cp "$CONF" /etc/slurm/slurm.conf 2>/dev/null || true
        fi
    fi
}

wait_idle() {
    local i state
    for i in $(seq 1 60); do
        state="$(sinfo -h -n "$HOST" -o '%t' 2>/dev/null | head -1)"
        case "$state" in
            idle|mix|alloc) return 0 ;;
            down*|drain*|inval*)
                scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    log "node $HOST did not become idle (state: '${state:-none}'); logs in $DIR/log"
    tail -5 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 2>/dev/null
    return 1
}

start() {
    mkdir -p "$DIR" 2>/dev/null && [ -w "$DIR" ] || { log "cannot write $DIR (set SLURM_TEST_DIR)"; return 2; }
    if is_running; then
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    install_packages || return 2
    stop_daemons quiet
    rm -f "$DIR/spool/${HOST}"_*  # step sockets left by an unclean shutdown
    setup_munge
    write_conf
    # munged runs as the munge user; it writes its pid file under /run/munge, we keep a copy in $DIR
    if pid_alive /run/munge/munged.pid; then
        log "reusing the running munged ($(cat /run/munge/munged.pid))"
    else
        rm -f /run/munge/munged.pid
        runuser -u munge -- /usr/sbin/munged --force || { log "munged failed to start"; return 2; }
        for _ in $(seq 1 50); do [ -s /run/munge/munged.pid ] && break; sleep 0.1; done
        cp /run/munge/munged.pid "$DIR/munged.pid"
    fi
    munge -n | unmunge >/dev/null 2>&1 || { log "munge round-trip failed"; stop_daemons quiet; return 2; }
    # -c: start from a clean state (no stale jobs from an earlier session)
    /usr/sbin/slurmctld -c -f "$CONF" || { log "slurmctld failed, see $DIR/log/slurmctld.log"; stop_daemons quiet; return 2; }
    /usr/sbin/slurmd -f "$CONF" || { log "slurmd failed, see $DIR/log/slurmd.log"; stop_daemons quiet; return 2; }
    wait_idle || { stop_daemons quiet; return 2; }
    log "cluster up: node $HOST, partition debug; SLURM_CONF=$CONF"
    echo "export SLURM_CONF=$CONF"
}

stepd_pids() {
    # slurmstepd processes of this cluster: the holders of the step sockets in our spool dir
    local inodes inode
    inodes="$(awk -v dir="$DIR/spool/" 'index($8, dir) == 1 {print $7}' /proc/net/unix 2>/dev/null)"
    [ -n "$inodes" ] || return 0
    for inode in $inodes; do
        find /proc/[0-9]*/fd -lname "socket:\[$inode\]" 2>/dev/null | cut -d/ -f3
    done | sort -u
}

drain_jobs() {
    # cancel what is left and let the steps finish reporting, so no slurmstepd outlives the daemons
    pid_alive "$DIR/slurmctld.pid" || return 0
    local jobs
    jobs="$(squeue -h -o %i 2>/dev/null)"
    [ -n "$jobs" ] && scancel $jobs 2>/dev/null
    for _ in $(seq 1 40); do
        [ -z "$(squeue -h -t PD,R,CG,S -o %i 2>/dev/null)" ] && [ -z "$(stepd_pids)" ] && return 0
        sleep 0.25
    done
}

stop_daemons() {
    local name pidfile pid
    drain_jobs
    for name in slurmd slurmctld munged; do
        pidfile="$DIR/$name.pid"
        if pid_alive "$pidfile"; then
            pid="$(cat "$pidfile")"
            kill "$pid" 2>/dev/null
            for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
            [ "${1:-}" = quiet ] || log "stopped $name ($pid)"
        fi
        rm -f "$pidfile"
    done
    for pid in $(stepd_pids); do  # orphaned steps ignore SIGTERM once slurmd is gone
        kill -9 "$pid" 2>/dev/null && log "killed leftover slurmstepd ($pid)"
    done
}

case "${1:-}" in
    start) start ;;
    stop) stop_daemons ;;
    status) if is_running; then echo running; else echo stopped; exit 1; fi ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 start|stop|status|env" >&2; exit 64 ;;
esac
