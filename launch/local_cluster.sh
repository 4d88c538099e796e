#!/usr/bin/env bash
# A real N-node SLURM on one machine (loopback addresses, one UTS namespace per node), for the launcher tests and
# for trying `unimlip-submit` on a laptop.
#
#   launch/local_cluster.sh up [--nodes N]  install Debian's packages if missing, write the config, start
#                                           slurmctld and N slurmd nodes xn1..xnN, wait until every node is idle
#                                           (default N=1; idempotent; another N reconfigures; a killed node is
#                                           started again)
#   launch/local_cluster.sh down            stop everything `up` started (node processes, job steps included)
#                                           and remove everything it made: config, /etc/hosts lines, state,
#                                           accounting database, logs (the packages and the munge key stay)
#   launch/local_cluster.sh kill-node NAME  a power loss: SIGKILL of that node's slurmd and of every process of
#                                           the jobs on it; slurmctld marks it down after SlurmdTimeout and
#                                           requeues the jobs that asked for it (`up` brings the node back)
#   launch/local_cluster.sh status          the daemons and the nodes; exit 0 only when every node is usable
#
# The nodes: node K is named xnK, has the address 127.0.0.(K+1) (listed in /etc/hosts, so every name resolves
# on every node) and runs its slurmd in its own UTS namespace (`unshare -u`), so every job step on it sees the
# hostname xnK. One slurmd port serves all nodes: each slurmd binds only its own address
# (CommunicationParameters=NoInAddrAny). Each node declares the machine's CPUs as `slurmd -C` reports them:
# N nodes share the machine's cores (oversubscribed N-fold), so a 2-node job with 2 tasks per node fits on a
# 2-core machine, and so does every one-node test job. slurmctld (and slurmdbd, MariaDB) run on 127.0.0.1 in
# the machine's own namespace.
#
# Environment:
#   LOCAL_SLURM_DIR          state, logs, pid files, MariaDB data (default /tmp/local-slurm)
#   LOCAL_SLURM_ACCOUNTING   1 (default): MariaDB + slurmdbd, so `sacct` (and submitit) can see failed
#                            and cancelled jobs; 0: no accounting (faster, but a job that dies without
#                            a result makes submitit's `job.result()` wait forever)
#
# Needs root (writes /etc/slurm and /etc/hosts, runs the daemons as root). The choices below come from
# ../shared/notes/local-slurm-facts.md: short credential expiry and scheduler intervals so requeued jobs restart
# within seconds, zombies count as dead (PID 1 here reaps orphans late), no systemd.
set -euo pipefail
# The daemons live in /usr/sbin, which a non-login or minimal environment may leave off PATH.
export PATH="$PATH:/usr/sbin:/sbin"

STATE_ROOT=${LOCAL_SLURM_DIR:-/tmp/local-slurm}
ACCOUNTING=${LOCAL_SLURM_ACCOUNTING:-1}
RUN_DIR=$STATE_ROOT/run
LOG_DIR=$STATE_ROOT/log
NODES_FILE=$STATE_ROOT/nodes # "NAME ADDRESS" per line: the nodes the current config has
# The config that job steps read (TaskProlog sets SLURM_CONF): slurm.conf without NoInAddrAny. With it, an srun
# inside a job listens on its node's address (xn2: 127.0.0.3), but each slurmstepd answers the address the launch
# request came from, which the kernel sets to 127.0.0.1 for every loopback connection: the step would never start.
# Without it srun listens on the wildcard address, as slurmctld does; the traffic itself stays on loopback.
JOBS_CONF=$STATE_ROOT/slurm-jobs.conf
CONF_DIR=/etc/slurm
CLUSTER=localslurm
PARTITION=debug
DB_PORT=16033
DB_SOCKET=$RUN_DIR/mariadb.sock
CONTROLLER=$(hostname -s)
# slurmctld pings every SlurmdTimeout/3 s and marks a silent node down SlurmdTimeout s after its last answer:
# measured 12-20 s from kill-node to `down` with 5 (docs/slurm.md). Real clusters use 300.
SLURMD_TIMEOUT=5
MESSAGE_TIMEOUT=5
HOSTS_TAG="# local_cluster.sh"
MAX_NODES=250
# Start order of the machine's own daemons; `down` stops them in reverse (the nodes' slurmds before them).
DAEMONS=(munged mariadbd slurmdbd slurmctld)

log() { printf 'local_cluster: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# True when PID runs program NAME and is not a zombie (state Z counts as dead).
alive() {
    local pid=$1 name=$2 stat state comm
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    stat=$(cat "/proc/$pid/stat" 2> /dev/null) || return 1
    state=${stat##*) }
    state=${state%% *}
    [[ $state != Z ]] || return 1
    comm=$(cat "/proc/$pid/comm" 2> /dev/null) || return 1
    [[ $comm == "$name" ]]
}

# The pid in RUN_DIR/KEY.pid (KEY: a daemon, or slurmd-NODE).
pid_of() {
    local file=$RUN_DIR/$1.pid pid=""
    [[ -r $file ]] && read -r pid < "$file"
    printf '%s' "$pid"
}

program_of() { printf '%s' "${1%%-*}"; } # slurmd-xn1 -> slurmd

running() { alive "$(pid_of "$1")" "$(program_of "$1")"; }

wanted() {
    case $1 in
        mariadbd | slurmdbd) [[ $ACCOUNTING == 1 ]] ;;
        *) return 0 ;;
    esac
}

# Poll CMD... until it succeeds, for at most SECONDS (0.2 s steps).
wait_for() {
    local seconds=$1 i
    shift
    for ((i = 0; i < seconds * 5; i++)); do
        if "$@" > /dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    return 1
}

# Stop the daemon whose pid file is RUN_DIR/KEY.pid (SIGTERM, SIGKILL after 20 s).
stop_daemon() {
    local key=$1 name pid i
    name=$(program_of "$key")
    pid=$(pid_of "$key")
    if alive "$pid" "$name"; then
        kill -TERM "$pid" 2> /dev/null || true
        for ((i = 0; i < 100; i++)); do
            alive "$pid" "$name" || break
            sleep 0.2
        done
        if alive "$pid" "$name"; then
            log "$key ($pid) ignored SIGTERM for 20 s: SIGKILL"
            kill -KILL "$pid" 2> /dev/null || true
        fi
        log "stopped $key ($pid)"
    fi
    rm -f "$RUN_DIR/$key.pid"
}

install_packages() {
    local pkgs=(slurmctld slurmd slurm-client munge) missing=() p
    [[ $ACCOUNTING == 1 ]] && pkgs+=(slurmdbd mariadb-server mariadb-client)
    for p in "${pkgs[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2> /dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    command -v apt-get > /dev/null || die "packages missing (${missing[*]}) and no apt-get to install them"
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends "${missing[@]}" > "$LOG_DIR/apt.log" 2>&1; then
        apt-get update -q > "$LOG_DIR/apt-update.log" 2>&1 || die "apt-get update failed: see $LOG_DIR/apt-update.log"
        apt-get install -y -q --no-install-recommends "${missing[@]}" > "$LOG_DIR/apt.log" 2>&1 \
            || die "apt-get install failed: see $LOG_DIR/apt.log"
    fi
}

# ------------------------------------------------------------------------------------------------ nodes

# "NAME ADDRESS" lines for N nodes: xn1 127.0.0.2, xn2 127.0.0.3, ...
node_table() {
    local n=$1 k
    for ((k = 1; k <= n; k++)); do printf 'xn%d 127.0.0.%d\n' "$k" "$((k + 1))"; done
}

node_names() { [[ -r $NODES_FILE ]] && awk '{print $1}' "$NODES_FILE"; }

# /etc/hosts without our lines, then ours: the nodes (and the controller's name when nothing else resolves it).
# Written in place: in a container /etc/hosts is often a bind mount that cannot be replaced.
write_hosts() {
    local table=$1 controller_line=$2 body
    body=$(grep -vF "$HOSTS_TAG" /etc/hosts || true)
    {
        printf '%s\n' "$body"
        if [[ -n $controller_line ]]; then printf '%s %s\n' "$controller_line" "$HOSTS_TAG"; fi
        if [[ -n $table ]]; then
            while read -r name addr; do printf '%s %s %s\n' "$addr" "$name" "$HOSTS_TAG"; done <<< "$table"
        fi
    } > "$STATE_ROOT/hosts.new"
    cmp -s "$STATE_ROOT/hosts.new" /etc/hosts || cat "$STATE_ROOT/hosts.new" > /etc/hosts
    rm -f "$STATE_ROOT/hosts.new"
}

# The controller's own name must resolve (slurmctld checks it); a name the machine already knows is left alone.
controller_hosts_line() {
    if grep -F "$HOSTS_TAG" /etc/hosts | grep -qw "$CONTROLLER"; then
        printf '127.0.0.1 %s' "$CONTROLLER"
    elif ! getent hosts "$CONTROLLER" > /dev/null; then
        log "adding '127.0.0.1 $CONTROLLER' to /etc/hosts"
        printf '127.0.0.1 %s' "$CONTROLLER"
    fi
}

# The UTS namespace of NODE ("uts:[inode]"): its slurmd's, or the one recorded when it started.
node_namespace() {
    local node=$1 pid ns=""
    pid=$(pid_of "slurmd-$node")
    if alive "$pid" slurmd; then
        ns=$(readlink "/proc/$pid/ns/uts" 2> /dev/null || true)
    elif [[ -r $RUN_DIR/$node.uts ]]; then
        read -r ns < "$RUN_DIR/$node.uts"
    fi
    # Never the machine's own namespace: that would be every process here.
    [[ -n $ns && $ns != "$(readlink /proc/self/ns/uts)" ]] && printf '%s' "$ns"
}

# Every process in NODE's namespace: its slurmd, the slurmstepds and the job processes they started.
node_pids() {
    local ns=$1 p
    for p in /proc/[0-9]*; do
        [[ $(readlink "$p/ns/uts" 2> /dev/null) == "$ns" ]] && printf '%s\n' "${p#/proc/}"
    done
    return 0
}

# SIGKILL every process of NODE; prints how many there were.
kill_node_processes() {
    local node=$1 ns pids total=0 pass
    ns=$(node_namespace "$node") || true
    if [[ -z $ns ]]; then
        printf '0'
        return 0
    fi
    for ((pass = 0; pass < 10; pass++)); do # a slurmstepd may fork while it dies: repeat until none is left
        pids=$(node_pids "$ns")
        [[ -z $pids ]] && break
        total=$((total + $(wc -l <<< "$pids")))
        # shellcheck disable=SC2086  # one pid per word
        kill -KILL $pids 2> /dev/null || true
        sleep 0.1
    done
    printf '%s' "$total"
}

start_slurmd() {
    local node=$1 pid
    running "slurmd-$node" && return 0
    mkdir -p "$STATE_ROOT/spool-$node"
    # Its own UTS namespace: the node's hostname for slurmd and everything it starts; it daemonises inside.
    unshare -u sh -c 'hostname "$1" && exec slurmd -N "$1"' sh "$node" \
        || die "slurmd for $node failed: see $LOG_DIR/slurmd-$node.log"
    wait_for 10 running "slurmd-$node" || die "slurmd for $node wrote no pid file: see $LOG_DIR/slurmd-$node.log"
    pid=$(pid_of "slurmd-$node")
    readlink "/proc/$pid/ns/uts" > "$RUN_DIR/$node.uts"
    log "started node $node: slurmd ($pid), hostname $node"
}

# Nodes the last config had that the new one does not: their slurmd and job processes go, and their files.
forget_node() {
    local node=$1 killed
    killed=$(kill_node_processes "$node")
    if ((killed)); then log "removed node $node ($killed processes killed)"; fi
    rm -rf "${STATE_ROOT:?}/spool-$node" "$RUN_DIR/slurmd-$node.pid" "$RUN_DIR/$node.uts"
}

node_state() { sinfo -h -N -n "$1" -o %T 2> /dev/null | head -n1; }

# Usable: idle, or running jobs from an earlier session (mixed/allocated).
usable() { [[ $1 == idle || $1 == mixed || $1 == allocated ]]; }

nodes_usable() {
    local node
    for node in $(node_names); do usable "$(node_state "$node")" || return 1; done
}

wait_nodes_usable() {
    local i node state
    for ((i = 0; i < 300; i++)); do
        nodes_usable && return 0
        if ((i % 25 == 10)); then
            for node in $(node_names); do
                state=$(node_state "$node")
                if [[ $state == down* || $state == drain* ]]; then
                    scontrol update NodeName="$node" State=RESUME > /dev/null 2>&1 || true
                fi
            done
        fi
        sleep 0.2
    done
    for node in $(node_names); do
        state=$(node_state "$node")
        usable "$state" || die "node $node is '$state', not idle, after 60 s: see $LOG_DIR/slurmd-$node.log"
    done
}

# ------------------------------------------------------------------------------------------------ config

db_password() {
    local file=$STATE_ROOT/db.password
    if [[ ! -s $file ]]; then
        (umask 077 && od -An -tx1 -N12 /dev/urandom | tr -d ' \n' > "$file")
    fi
    cat "$file"
}

write_configs() {
    local table=$1 hw mem_kb real_mem acct_lines="" node_lines
    hw=$(slurmd -C | head -n1 | grep -oE '(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=[0-9]+' | tr '\n' ' ')
    [[ -n $hw ]] || die "slurmd -C reported no hardware"
    mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
    real_mem=$(((mem_kb * 9 / 10 / 1024 / 1024) * 1024))
    node_lines=$(while read -r name addr; do
        printf 'NodeName=%s NodeAddr=%s %sRealMemory=%s State=UNKNOWN\n' "$name" "$addr" "$hw" "$real_mem"
    done <<< "$table")
    if [[ $ACCOUNTING == 1 ]]; then
        acct_lines="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819"
    else
        acct_lines="AccountingStorageType=accounting_storage/none"
    fi
    mkdir -p "$CONF_DIR"
    cat > "$STATE_ROOT/slurm.conf.new" << EOF
# Written by launch/local_cluster.sh: a test cluster on loopback, one UTS namespace per node. Do not edit by hand.
ClusterName=$CLUSTER
SlurmctldHost=$CONTROLLER(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CommunicationParameters=NoInAddrAny
StateSaveLocation=$STATE_ROOT/state
SlurmdSpoolDir=$STATE_ROOT/spool-%n
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd-%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
SlurmctldPort=6817
SlurmdPort=6818
SlurmdTimeout=$SLURMD_TIMEOUT
MessageTimeout=$MESSAGE_TIMEOUT
TaskProlog=$STATE_ROOT/task_prolog.sh
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
KillWait=5
ReturnToService=2
JobRequeue=1
MailProg=/bin/true
JobAcctGatherType=jobacct_gather/none
$acct_lines
$node_lines
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    # What job steps read (see JOBS_CONF); the daemons and this machine's own commands keep NoInAddrAny.
    grep -v '^CommunicationParameters=NoInAddrAny$' "$STATE_ROOT/slurm.conf.new" > "$JOBS_CONF"
    printf '#!/bin/sh\n# Written by launch/local_cluster.sh: every job task reads %s\necho "export SLURM_CONF=%s"\n' \
        "$JOBS_CONF" "$JOBS_CONF" > "$STATE_ROOT/task_prolog.sh"
    chmod 755 "$STATE_ROOT/task_prolog.sh"
    if [[ $ACCOUNTING == 1 ]]; then
        (umask 077 && cat > "$STATE_ROOT/slurmdbd.conf.new" << EOF
# Written by launch/local_cluster.sh. Do not edit by hand.
AuthType=auth/munge
DbdAddr=127.0.0.1
DbdHost=localhost
DbdPort=6819
SlurmUser=root
PidFile=$RUN_DIR/slurmdbd.pid
LogFile=$LOG_DIR/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$(db_password)
StorageLoc=slurm_acct_db
EOF
        )
    fi
}

# Install the freshly written configs; true when one changed (the running daemons must restart).
install_configs() {
    local changed=1 name
    for name in slurm.conf slurmdbd.conf; do
        [[ -e $STATE_ROOT/$name.new ]] || continue
        if ! cmp -s "$STATE_ROOT/$name.new" "$CONF_DIR/$name"; then
            install -m "$([[ $name == slurmdbd.conf ]] && echo 600 || echo 644)" "$STATE_ROOT/$name.new" "$CONF_DIR/$name"
            changed=0
        fi
        rm -f "$STATE_ROOT/$name.new"
    done
    return $changed
}

# ------------------------------------------------------------------------------------------------ daemons

munge_works() { munge -n < /dev/null 2> /dev/null | unmunge > /dev/null 2>&1; }

start_munged() {
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        mungekey -c -f
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    install -d -o munge -g munge -m 0755 /run/munge
    if running munged; then return 0; fi
    if munge_works; then
        log "using an munged that this script did not start"
        return 0
    fi
    runuser -u munge -- munged --force --pid-file=/run/munge/munged.pid
    wait_for 10 munge_works || die "munged did not start (see /var/log/munge/munged.log)"
    cp /run/munge/munged.pid "$RUN_DIR/munged.pid"
    log "started munged ($(pid_of munged))"
}

db_ready() { mariadb-admin --no-defaults -S "$DB_SOCKET" -uroot ping; }

start_mariadbd() {
    local datadir=$STATE_ROOT/mariadb
    if ! running mariadbd; then
        if [[ ! -d $datadir/mysql ]]; then
            mkdir -p "$datadir"
            mariadb-install-db --no-defaults --datadir="$datadir" --user=root --skip-test-db \
                --auth-root-authentication-method=socket > "$LOG_DIR/mariadb-install.log" 2>&1 \
                || die "mariadb-install-db failed: see $LOG_DIR/mariadb-install.log"
        fi
        # innodb values: the ones slurmdbd recommends (it logs a warning otherwise).
        setsid mariadbd --no-defaults --user=root --datadir="$datadir" --socket="$DB_SOCKET" \
            --port=$DB_PORT --bind-address=127.0.0.1 --skip-name-resolve --pid-file="$RUN_DIR/mariadbd.pid" \
            --log-error="$LOG_DIR/mariadb.log" --innodb-buffer-pool-size=128M \
            --innodb-log-file-size=64M --innodb-lock-wait-timeout=900 < /dev/null > /dev/null 2>&1 &
        wait_for 60 db_ready || die "mariadbd did not start: see $LOG_DIR/mariadb.log"
        wait_for 10 running mariadbd || die "mariadbd wrote no pid file"
        log "started mariadbd ($(pid_of mariadbd))"
    fi
    mariadb --no-defaults -S "$DB_SOCKET" -uroot -e "
        CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$(db_password)';
        ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$(db_password)';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" \
        || die "could not create the slurmdbd database user"
}

start_slurmdbd() {
    running slurmdbd && return 0
    slurmdbd || die "slurmdbd failed: see $LOG_DIR/slurmdbd.log"
    wait_for 30 sacctmgr -n list cluster || die "slurmdbd does not answer: see $LOG_DIR/slurmdbd.log"
    log "started slurmdbd ($(pid_of slurmdbd))"
    if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
        sacctmgr -i add cluster "$CLUSTER" > /dev/null || die "sacctmgr add cluster failed"
    fi
}

start_slurmctld() {
    running slurmctld && return 0
    slurmctld || die "slurmctld failed: see $LOG_DIR/slurmctld.log"
    wait_for 30 scontrol ping || die "slurmctld does not answer: see $LOG_DIR/slurmctld.log"
    log "started slurmctld ($(pid_of slurmctld))"
}

# Every slurmd pid file there is (the nodes of this config and of earlier ones, and an older script's).
slurmd_keys() {
    local f
    for f in "$RUN_DIR"/slurmd*.pid; do
        [[ -e $f ]] && basename "$f" .pid
    done
    return 0
}

all_running() {
    local name node
    for name in "${DAEMONS[@]}"; do
        wanted "$name" || continue
        if [[ $name == munged ]]; then munge_works || return 1; else running "$name" || return 1; fi
    done
    for node in $(node_names); do running "slurmd-$node" || return 1; done
}

# ------------------------------------------------------------------------------------------------ commands

cmd_up() {
    local n=1 table old_table key node
    while (($#)); do
        case $1 in
            --nodes)
                [[ $# -ge 2 ]] || die "--nodes needs a number"
                n=$2
                shift 2
                ;;
            --nodes=*)
                n=${1#--nodes=}
                shift
                ;;
            *) die "up: unknown argument '$1' (usage: up [--nodes N])" ;;
        esac
    done
    [[ $n =~ ^[0-9]+$ ]] && ((n >= 1 && n <= MAX_NODES)) || die "--nodes '$n': expected a whole number from 1 to $MAX_NODES"
    [[ $(id -u) == 0 ]] || die "must run as root (it writes $CONF_DIR and /etc/hosts and starts the daemons)"
    mkdir -p "$RUN_DIR" "$LOG_DIR" "$STATE_ROOT/state"
    install_packages
    table=$(node_table "$n")
    old_table=$(cat "$NODES_FILE" 2> /dev/null || true)
    write_configs "$table"
    if install_configs || [[ $table != "$old_table" ]]; then
        log "configuration changed ($n node(s)): restarting the SLURM daemons"
        for key in $(slurmd_keys); do stop_daemon "$key"; done
        stop_daemon slurmctld
        stop_daemon slurmdbd
        for node in $(node_names); do
            grep -qx "$node .*" <<< "$table" || forget_node "$node"
        done
        printf '%s\n' "$table" > "$NODES_FILE"
    elif all_running && nodes_usable; then
        log "already up: $n node(s) ($(node_names | paste -sd, -)), partition $PARTITION"
        return 0
    fi
    write_hosts "$table" "$(controller_hosts_line)"
    if [[ $ACCOUNTING != 1 ]]; then
        stop_daemon slurmdbd
        stop_daemon mariadbd
    fi
    start_munged
    if [[ $ACCOUNTING == 1 ]]; then
        start_mariadbd
        start_slurmdbd
    fi
    start_slurmctld
    for node in $(node_names); do start_slurmd "$node"; done
    wait_nodes_usable
    log "up: $n node(s) ($(node_names | paste -sd, -)) in partition $PARTITION (state in $STATE_ROOT)"
}

cmd_down() {
    local node killed key i name
    for node in $(node_names); do
        killed=$(kill_node_processes "$node")
        if ((killed)); then log "stopped node $node ($killed processes killed: slurmd and job steps)"; fi
    done
    for key in $(slurmd_keys); do stop_daemon "$key"; done # an older script's one-node slurmd
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        stop_daemon "${DAEMONS[i]}"
    done
    if [[ -w /etc/hosts ]] && grep -qF "$HOSTS_TAG" /etc/hosts; then
        write_hosts "" ""
        log "removed this script's lines from /etc/hosts"
    fi
    for name in slurm.conf slurmdbd.conf; do
        if head -n1 "$CONF_DIR/$name" 2> /dev/null | grep -q '^# Written by launch/local_cluster.sh'; then
            rm -f "$CONF_DIR/$name"
        fi
    done
    # Only what `up` creates, by name: LOCAL_SLURM_DIR may point anywhere.
    rm -rf "${STATE_ROOT:?}"/{run,log,state,spool,mariadb} "${STATE_ROOT:?}"/spool-* "$STATE_ROOT/db.password" \
        "$NODES_FILE" "$JOBS_CONF" "$STATE_ROOT/task_prolog.sh" "$STATE_ROOT"/*.new
    rmdir "$STATE_ROOT" 2> /dev/null || true
    log "down: everything this script made is removed (the packages and /etc/munge/munge.key stay)"
}

cmd_kill_node() {
    local node=${1:-} killed
    [[ -n $node ]] || die "usage: kill-node NAME (one of: $(node_names | paste -sd' ' -))"
    [[ $(id -u) == 0 ]] || die "must run as root"
    node_names | grep -qx "$node" || die "no node '$node' in this cluster (nodes: $(node_names | paste -sd' ' -))"
    killed=$(kill_node_processes "$node")
    ((killed)) || die "node $node has no processes: already dead? (\`up\` starts it again)"
    rm -f "$RUN_DIR/slurmd-$node.pid"
    log "killed node $node: $killed processes (slurmd and every job step on it), SIGKILL; slurmctld marks it down" \
        "about $SLURMD_TIMEOUT-$((4 * SLURMD_TIMEOUT)) s from now and requeues its jobs that asked for it; \`up\` brings it back"
}

cmd_status() {
    local name pid ok=0 node addr state
    for name in "${DAEMONS[@]}"; do
        wanted "$name" || continue
        pid=$(pid_of "$name")
        if alive "$pid" "$name"; then
            printf '%-10s running (pid %s)\n' "$name" "$pid"
        elif [[ $name == munged ]] && munge_works 2> /dev/null; then
            printf '%-10s running (not started by this script)\n' "$name"
        else
            printf '%-10s stopped\n' "$name"
            ok=1
        fi
    done
    [[ -r $NODES_FILE ]] || {
        printf 'no nodes (not up)\n'
        return 1
    }
    while read -r node addr; do
        pid=$(pid_of "slurmd-$node")
        state=$( ((ok == 0)) && node_state "$node" || true)
        if alive "$pid" slurmd; then
            printf 'node %-6s %-11s slurmd running (pid %s)  %s\n' "$node" "$addr" "$pid" "${state:-?}"
        else
            printf 'node %-6s %-11s slurmd stopped  %s\n' "$node" "$addr" "${state:-?}"
            ok=1
        fi
        usable "$state" || ok=1
    done < "$NODES_FILE"
    return $ok
}

case ${1:-} in
    up)
        shift
        cmd_up "$@"
        ;;
    down) cmd_down ;;
    kill-node) cmd_kill_node "${2:-}" ;;
    status) cmd_status ;;
    *)
        printf 'usage: %s up [--nodes N] | down | kill-node NAME | status\n' "$0" >&2
        exit 2
        ;;
esac
