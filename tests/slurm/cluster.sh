#!/usr/bin/env bash
# A real SLURM cluster on this machine (Debian packages, no systemd), for tests/test_slurm.py and
# tests/test_slurm_multihost.py: by default TWO hosts, each slurmd in its own network + UTS namespace.
#
#   tests/slurm/cluster.sh start    install if needed, write config, start munged/slurmctld/slurmd(s), wait for idle
#   tests/slurm/cluster.sh stop     stop the daemons, remove the namespaces, the bridge and /etc/netns/<host>
#   tests/slurm/cluster.sh status   'running two-host' / 'running one-host' (exit 0) or 'stopped' (exit 1)
#   tests/slurm/cluster.sh env      print the export line for SLURM_CONF
#   tests/slurm/cluster.sh hosts    the node names, one a line (scenessl-h1, scenessl-h2; or this machine's name)
#   tests/slurm/cluster.sh kill-host NODE     the host dies: its link is cut, then everything on it is killed
#   tests/slurm/cluster.sh revive-host NODE   link up again, slurmd restarted, node resumed
#
# Two-host mode (SCENESSL_SLURM_HOSTS=2, the default): slurmctld and munged run here (the root namespaces); the
# nodes scenessl-h1 and scenessl-h2 are network namespaces of the same names ('ip netns'), joined by veth pairs
# to the bridge sslbr0 on the link-local subnet 169.254.77.0/24, which exists only inside this machine (no
# route leaves it): this machine is 169.254.77.1 on the bridge, the hosts .11 and .12. Each slurmd runs in
# its host's network namespace and in new UTS and mount namespaces (in_host: its own hostname, and
# /etc/netns/<host>/hosts bind-mounted over /etc/hosts for it and its jobs only, listing all three names; the
# machine's /etc/hosts is never touched; /sys stays as it is, slurmd needs its cgroup mounts). munged's unix socket is on the shared filesystem, so both hosts use the one munged.
# One-host mode (SCENESSL_SLURM_HOSTS=1): one slurmd in the root namespaces, node name = this machine's name.
#
# Everything (config, state, spool, logs, pid files) lives under $SLURM_TEST_DIR (default /tmp/scenessl-slurm).
# Client commands find the config through SLURM_CONF=$SLURM_TEST_DIR/slurm.conf; the script also copies it to
# /etc/slurm/slurm.conf when that file is absent or was written by this script, so plain `sinfo` works too.
# Exit codes of 'start': 0 cluster up (the mode asked for); 2 SLURM cannot be installed/started here (tests
# skip on it); 3 network namespaces cannot be made here: a ONE-host cluster is up instead (the two-host tests
# skip with the reason printed on stderr and kept in $SLURM_TEST_DIR/netns_error).
set -u

DIR="${SLURM_TEST_DIR:-/tmp/scenessl-slurm}"
CONF="$DIR/slurm.conf"
HOST="$(hostname -s)"
MARK="# written by scenessl tests/slurm/cluster.sh"
export SLURM_CONF="$CONF"
WANT_HOSTS="${SCENESSL_SLURM_HOSTS:-2}"
# two-host mode: the hosts (= netns names = node names = hostnames), their bridge and link-local subnet
NODES=(scenessl-h1 scenessl-h2)
NET=169.254.77
CTL_IP="$NET.1"
BRIDGE=sslbr0

log() { echo "[cluster.sh] $*" >&2; }

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

node_ip() { echo "$NET.$((11 + $1))"; }  # index 0 -> .11

veth_of() { echo "sslv-${1##*-}"; }  # scenessl-h1 -> sslv-h1 (interface names: 15 characters at most)

mode() { cat "$DIR/mode" 2>/dev/null || echo none; }

node_names() {
    if [ "$(mode)" = two-host ]; then printf '%s\n' "${NODES[@]}"; else echo "$HOST"; fi
}

slurmd_pidfile() { echo "$DIR/slurmd-$1.pid"; }

is_running() {
    local node
    pid_alive /run/munge/munged.pid && pid_alive "$DIR/slurmctld.pid" || return 1
    for node in $(node_names); do
        pid_alive "$(slurmd_pidfile "$node")" || return 1
        sinfo -h -n "$node" -o '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc)' || return 1
    done
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

# ---------------------------------------------------------------- the two hosts' network

netns_up() {
    # bridge + one veth pair and one netns per host; on failure: undo, print the reason, return 1
    local i j node out
    [ "$(id -u)" = 0 ] || { echo "not root: cannot create network namespaces"; return 1; }
    command -v ip >/dev/null && command -v unshare >/dev/null || { echo "'ip' or 'unshare' missing"; return 1; }
    netns_down
    out="$( { ip link add "$BRIDGE" type bridge && ip addr add "$CTL_IP/24" dev "$BRIDGE" &&
              ip link set "$BRIDGE" up; } 2>&1 )" ||
        { echo "cannot create the bridge $BRIDGE: ${out//$'\n'/ }"; netns_down; return 1; }
    for i in "${!NODES[@]}"; do
        node="${NODES[$i]}"
        out="$( { ip netns add "$node" &&
                  ip link add "$(veth_of "$node")" type veth peer name eth0 netns "$node" &&
                  ip link set "$(veth_of "$node")" master "$BRIDGE" up &&
                  ip -n "$node" link set lo up &&
                  ip -n "$node" addr add "$(node_ip "$i")/24" dev eth0 &&
                  ip -n "$node" link set eth0 up; } 2>&1 )" ||
            { echo "cannot create the network namespace $node: ${out//$'\n'/ }"; netns_down; return 1; }
        mkdir -p "/etc/netns/$node"
        {
            echo "$MARK"
            echo "127.0.0.1 localhost"
            echo "$CTL_IP $HOST"
            for j in "${!NODES[@]}"; do echo "$(node_ip "$j") ${NODES[$j]}"; done
        } >"/etc/netns/$node/hosts"
    done
    # the subnet must be on the bridge here, or a packet to it could leave the machine by the default route
    ip route get "$(node_ip 0)" 2>/dev/null | grep -q "dev $BRIDGE" ||
        { echo "no route to $NET.0/24 on $BRIDGE"; netns_down; return 1; }
    for node in "${NODES[@]}"; do
        out="$(in_host "$node" hostname 2>&1)"
        [ "$out" = "$node" ] ||
            { echo "cannot enter $node with its own hostname (nsenter/unshare --uts --mount): ${out//$'\n'/ }"
              netns_down; return 1; }
        in_host "$node" getent hosts "${NODES[@]}" "$HOST" >/dev/null 2>&1 ||
            { echo "names do not resolve inside $node (/etc/netns/$node/hosts)"; netns_down; return 1; }
    done
    return 0
}

in_host() {
    # in_host NODE COMMAND...: run COMMAND as on host NODE (its network, its hostname, its /etc/hosts)
    local node="$1"
    shift
    nsenter --net="/run/netns/$node" -- unshare --uts --mount --propagation slave -- \
        sh -c 'mount --bind "/etc/netns/$0/hosts" /etc/hosts && hostname "$0" && exec "$@"' "$node" "$@"
}

netns_exists() { ip netns list 2>/dev/null | grep -q "^$1\( \|$\)"; }

kill_netns_processes() {
    # everything in a host's network namespace belongs to this cluster (slurmd, slurmstepd, job steps)
    local pid
    netns_exists "$1" || return 0
    for pid in $(ip netns pids "$1" 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
    for _ in $(seq 1 30); do [ -z "$(ip netns pids "$1" 2>/dev/null)" ] && return 0; sleep 0.1; done
}

netns_down() {
    local node
    for node in "${NODES[@]}"; do
        kill_netns_processes "$node"
        netns_exists "$node" && ip netns del "$node" 2>/dev/null
        ip link del "$(veth_of "$node")" 2>/dev/null
        if [ -f "/etc/netns/$node/hosts" ] && head -1 "/etc/netns/$node/hosts" | grep -qF "$MARK"; then
            rm -f "/etc/netns/$node/hosts"
            rmdir "/etc/netns/$node" 2>/dev/null
        fi
    done
    rmdir /etc/netns 2>/dev/null
    ip link del "$BRIDGE" 2>/dev/null
    return 0
}

# ---------------------------------------------------------------- configuration

write_conf() {
    local cpus mem nodes_line ctl part_nodes i node
    # not plain nproc: it honours OMP_NUM_THREADS (1 in the test workers), which would give each host 1 CPU
    cpus="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"
    mkdir -p "$DIR/state" "$DIR/log"
    if [ "$(mode)" = two-host ]; then
        # RealMemory (MB) must not exceed what slurmd detects (the whole machine's, on each host): 45 % each
        mem="$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.45}' /proc/meminfo)"
        ctl="$HOST($CTL_IP)"
        nodes_line=""
        for i in "${!NODES[@]}"; do
            nodes_line+="NodeName=${NODES[$i]} NodeAddr=$(node_ip "$i") NodeHostname=${NODES[$i]} CPUs=$cpus Gres=gpu:1 RealMemory=$mem State=UNKNOWN"$'\n'
            mkdir -p "$DIR/spool/${NODES[$i]}"
        done
        part_nodes="$(IFS=,; echo "${NODES[*]}")"
    else
        # 90 % of MemTotal: slurmd drains a node whose RealMemory exceeds what it detects
        mem="$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)"
        ctl="$HOST"
        nodes_line="NodeName=$HOST CPUs=$cpus Gres=gpu:1 RealMemory=$mem State=UNKNOWN"
        part_nodes="$HOST"
        mkdir -p "$DIR/spool/$HOST"
    fi
    cat >"$CONF" <<EOF
$MARK
# mode: $(mode)
ClusterName=scenessl
SlurmctldHost=$ctl
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
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldPort=6817
SlurmdPort=6818
# short timers: quick requeue/cleanup in tests; a host that stops answering is DOWN after SlurmdTimeout
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
# one "gpu" per host (gres.conf: File=/dev/null, no device): --gpus-per-node 1 submits as on a GPU cluster;
# the jobs themselves find no CUDA and train on the CPU with gloo
GresTypes=gpu
$nodes_line
# OverSubscribe=FORCE lets a few small test jobs share the CPUs of a node
PartitionName=debug Nodes=$part_nodes Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
    { echo "$MARK"; for node in $(node_names); do echo "NodeName=$node Name=gpu File=/dev/null"; done; } >"$DIR/gres.conf"
    if [ -d /etc/slurm ] || mkdir -p /etc/slurm 2>/dev/null; then
        if [ ! -e /etc/slurm/slurm.conf ] || head -1 /etc/slurm/slurm.conf | grep -qF "$MARK"; then
            cp "$CONF" /etc/slurm/slurm.conf 2>/dev/null || true
            cp "$DIR/gres.conf" /etc/slurm/gres.conf 2>/dev/null || true
        fi
    fi
}

wait_idle() {
    # wait_idle [NODE...]: default all nodes; a down/drained node is resumed
    local state node pending nodes
    nodes="${*:-$(node_names)}"
    for _ in $(seq 1 80); do
        pending=""
        for node in $nodes; do
            state="$(sinfo -h -n "$node" -o '%t' 2>/dev/null | head -1)"
            case "$state" in
                idle|mix|alloc) ;;
                down*|drain*|inval*)
                    scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true
                    pending+=" $node($state)" ;;
                *) pending+=" $node(${state:-none})" ;;
            esac
        done
        [ -z "$pending" ] && return 0
        sleep 0.5
    done
    log "nodes did not become idle:$pending; logs in $DIR/log"
    tail -5 "$DIR/log/"*.log >&2 2>/dev/null
    return 1
}

start_slurmd() {
    # start_slurmd NODE: in NODE's namespaces (two-host) or here (one-host)
    local node="$1"
    rm -f "$DIR/spool/$node/${node}"_*  # step sockets left by an unclean shutdown
    if [ "$(mode)" = two-host ]; then
        in_host "$node" /usr/sbin/slurmd -f "$CONF" -N "$node"
    else
        /usr/sbin/slurmd -f "$CONF" -N "$node"
    fi || { log "slurmd $node failed, see $DIR/log/slurmd-$node.log"; return 1; }
    for _ in $(seq 1 50); do pid_alive "$(slurmd_pidfile "$node")" && return 0; sleep 0.1; done
    log "slurmd $node wrote no pid file; see $DIR/log/slurmd-$node.log"
    return 1
}

start() {
    local reason="" rc=0 node
    mkdir -p "$DIR" 2>/dev/null && [ -w "$DIR" ] || { log "cannot write $DIR (set SLURM_TEST_DIR)"; return 2; }
    if is_running; then  # already up: as asked, or one host because two were impossible (exit 3 again)
        if [ "$(mode)" = two-host ] || { [ "$WANT_HOSTS" = 1 ] && [ ! -s "$DIR/netns_error" ]; }; then
            echo "export SLURM_CONF=$CONF"
            return 0
        fi
        if [ "$WANT_HOSTS" = 2 ] && [ -s "$DIR/netns_error" ]; then
            echo "export SLURM_CONF=$CONF"
            log "one host only: two hosts impossible here ($(cat "$DIR/netns_error"))"
            return 3
        fi
    fi
    install_packages || return 2
    stop_daemons quiet
    rm -f "$DIR/netns_error"
    if [ "$WANT_HOSTS" = 2 ]; then
        if reason="$(netns_up)"; then
            echo two-host >"$DIR/mode"
        else
            log "two hosts impossible here ($reason): starting a one-host cluster instead"
            echo "$reason" >"$DIR/netns_error"
            echo one-host >"$DIR/mode"
            rc=3
        fi
    else
        echo one-host >"$DIR/mode"
    fi
    setup_munge
    write_conf
    # munged runs as the munge user; it writes its pid file under /run/munge, we keep a copy in $DIR
    if pid_alive /run/munge/munged.pid; then
        log "reusing the running munged ($(cat /run/munge/munged.pid))"
    else
        rm -f /run/munge/munged.pid
        runuser -u munge -- /usr/sbin/munged --force || { log "munged failed to start"; stop_daemons quiet; return 2; }
        for _ in $(seq 1 50); do [ -s /run/munge/munged.pid ] && break; sleep 0.1; done
        cp /run/munge/munged.pid "$DIR/munged.pid"
    fi
    munge -n | unmunge >/dev/null 2>&1 || { log "munge round-trip failed"; stop_daemons quiet; return 2; }
    # -c: start from a clean state (no stale jobs from an earlier session)
    /usr/sbin/slurmctld -c -f "$CONF" || { log "slurmctld failed, see $DIR/log/slurmctld.log"; stop_daemons quiet; return 2; }
    for node in $(node_names); do
        start_slurmd "$node" || { stop_daemons quiet; return 2; }
    done
    wait_idle || { stop_daemons quiet; return 2; }
    log "cluster up ($(mode)): nodes $(node_names | tr '\n' ' ')partition debug; SLURM_CONF=$CONF"
    echo "export SLURM_CONF=$CONF"
    return $rc
}

kill_host() {
    # the host dies as a powered-off machine does: first its link goes (no FIN/RST reaches its peers), then
    # slurmd and every process on it are killed; slurmctld marks it DOWN after SlurmdTimeout
    local node="$1"
    [ "$(mode)" = two-host ] && netns_exists "$node" || { log "kill-host: no host $node"; return 1; }
    ip link set "$(veth_of "$node")" down
    kill_netns_processes "$node"
    rm -f "$(slurmd_pidfile "$node")"
    log "host $node: link down, all its processes killed"
}

revive_host() {
    local node="$1"
    [ "$(mode)" = two-host ] && netns_exists "$node" || { log "revive-host: no host $node"; return 1; }
    kill_netns_processes "$node"
    ip link set "$(veth_of "$node")" up
    start_slurmd "$node" || return 1
    wait_idle "$node" || return 1
    log "host $node: back, idle"
}

stepd_pids() {
    # one-host mode: slurmstepd processes of this cluster, the holders of the step sockets in our spool dir
    # (/proc/net/unix lists this network namespace's sockets; the two hosts' are cleaned up by netns_down)
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

stop_pid() {
    # stop_pid PIDFILE NAME [quiet]
    local pid
    if pid_alive "$1"; then
        pid="$(cat "$1")"
        kill "$pid" 2>/dev/null
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
        [ "${3:-}" = quiet ] || log "stopped $2 ($pid)"
    fi
    rm -f "$1"
}

stop_daemons() {
    local pidfile pid
    drain_jobs
    for pidfile in "$DIR"/slurmd-*.pid "$DIR/slurmd.pid"; do
        [ -e "$pidfile" ] && stop_pid "$pidfile" "$(basename "$pidfile" .pid)" "${1:-}"
    done
    stop_pid "$DIR/slurmctld.pid" slurmctld "${1:-}"
    stop_pid "$DIR/munged.pid" munged "${1:-}"
    for pid in $(stepd_pids); do  # orphaned steps ignore SIGTERM once slurmd is gone
        kill -9 "$pid" 2>/dev/null && log "killed leftover slurmstepd ($pid)"
    done
    netns_down
    rm -f "$DIR/mode"
}

case "${1:-}" in
    start) start ;;
    stop) stop_daemons ;;
    status) if is_running; then echo "running $(mode)"; else echo stopped; exit 1; fi ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    hosts) node_names ;;
    kill-host) kill_host "${2:?kill-host NODE}" ;;
    revive-host) revive_host "${2:?revive-host NODE}" ;;
    *) echo "usage: $0 start|stop|status|env|hosts|kill-host NODE|revive-host NODE" >&2; exit 64 ;;
esac
