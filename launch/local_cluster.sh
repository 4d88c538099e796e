#!/usr/bin/env bash
# A real one-node SLURM on loopback, for the launcher tests and for trying `unimlip-submit` on a laptop.
#
#   launch/local_cluster.sh up       install Debian's packages if missing, write the config, start the
#                                    daemons, wait until the node is idle (idempotent: a no-op when up)
#   launch/local_cluster.sh down     stop exactly the daemons `up` started (by their pid files)
#   launch/local_cluster.sh status   show the daemons and the node; exit 0 only when the node is usable
#
# Environment:
#   LOCAL_SLURM_DIR          state, logs, pid files, MariaDB data (default /tmp/local-slurm)
#   LOCAL_SLURM_ACCOUNTING   1 (default): MariaDB + slurmdbd, so `sacct` (and submitit) can see failed
#                            and cancelled jobs; 0: no accounting (faster, but a job that dies without
#                            a result makes submitit's `job.result()` wait forever)
#
# Needs root (writes /etc/slurm, runs the daemons as root). The choices below come from
# ../shared/notes/local-slurm-facts.md: short credential expiry and scheduler intervals so requeued
# jobs restart within seconds, zombies count as dead (PID 1 here reaps orphans late), no systemd.
set -euo pipefail
# The daemons live in /usr/sbin, which a non-login or minimal environment may leave off PATH.
export PATH="$PATH:/usr/sbin:/sbin"

STATE_ROOT=${LOCAL_SLURM_DIR:-/tmp/local-slurm}
ACCOUNTING=${LOCAL_SLURM_ACCOUNTING:-1}
RUN_DIR=$STATE_ROOT/run
LOG_DIR=$STATE_ROOT/log
CONF_DIR=/etc/slurm
CLUSTER=localslurm
PARTITION=debug
DB_PORT=16033
DB_SOCKET=$RUN_DIR/mariadb.sock
NODE=$(hostname -s)
# Start order; `down` stops them in reverse.
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)

log() { printf 'local_cluster: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# True when PID runs program NAME and is not a zombie (state Z counts as dead).
alive() {
    local pid=$1 name=$2 stat state comm
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    state=${stat##*) }
    state=${state%% *}
    [[ $state != Z ]] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [[ $comm == "$name" ]]
}

pid_of() {
    local file=$RUN_DIR/$1.pid pid=""
    [[ -r $file ]] && read -r pid < "$file"
    printf '%s' "$pid"
}

running() { alive "$(pid_of "$1")" "$1"; }

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

stop_daemon() {
    local name=$1 pid i
    pid=$(pid_of "$name")
    if alive "$pid" "$name"; then
        kill -TERM "$pid" 2> /dev/null || true
        for ((i = 0; i < 100; i++)); do
            alive "$pid" "$name" || break
            sleep 0.2
        done
        if alive "$pid" "$name"; then
            log "$name ($pid) ignored SIGTERM for 20 s: SIGKILL"
            kill -KILL "$pid" 2> /dev/null || true
        fi
        log "stopped $name ($pid)"
    fi
    rm -f "$RUN_DIR/$name.pid"
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

ensure_hostname() {
    getent hosts "$NODE" > /dev/null && return 0
    log "adding '127.0.0.1 $NODE' to /etc/hosts (torch's rendezvous uses the node name)"
    printf '127.0.0.1 %s\n' "$NODE" >> /etc/hosts
}

db_password() {
    local file=$STATE_ROOT/db.password
    if [[ ! -s $file ]]; then
        (umask 077 && od -An -tx1 -N12 /dev/urandom | tr -d ' \n' > "$file")
    fi
    cat "$file"
}

write_configs() {
    local hw mem_kb real_mem acct_lines=""
    hw=$(slurmd -C | head -n1 | grep -oE '(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=[0-9]+' | tr '\n' ' ')
    [[ -n $hw ]] || die "slurmd -C reported no hardware"
    mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
    real_mem=$(((mem_kb * 9 / 10 / 1024 / 1024) * 1024))
    if [[ $ACCOUNTING == 1 ]]; then
        acct_lines="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819"
    else
        acct_lines="AccountingStorageType=accounting_storage/none"
    fi
    mkdir -p "$CONF_DIR"
    cat > "$STATE_ROOT/slurm.conf.new" << EOF
# Written by launch/local_cluster.sh: a one-node test cluster on loopback. Do not edit by hand.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CommunicationParameters=NoInAddrAny
StateSaveLocation=$STATE_ROOT/state
SlurmdSpoolDir=$STATE_ROOT/spool
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
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
NodeName=$NODE NodeAddr=127.0.0.1 ${hw}RealMemory=$real_mem State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
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

start_slurmd() {
    running slurmd && return 0
    slurmd -N "$NODE" || die "slurmd failed: see $LOG_DIR/slurmd.log"
    wait_for 10 running slurmd || die "slurmd wrote no pid file: see $LOG_DIR/slurmd.log"
    log "started slurmd ($(pid_of slurmd))"
}

node_state() { sinfo -h -n "$NODE" -o %T 2> /dev/null; }

node_idle() {
    local state
    state=$(node_state)
    # `mixed`/`allocated`: jobs from an earlier session are still running; usable all the same.
    [[ $state == idle || $state == mixed || $state == allocated ]]
}

wait_node_idle() {
    local i state
    for ((i = 0; i < 300; i++)); do
        node_idle && return 0
        state=$(node_state)
        if [[ $state == down* || $state == drain* ]] && ((i % 25 == 10)); then
            scontrol update NodeName="$NODE" State=RESUME > /dev/null 2>&1 || true
        fi
        sleep 0.2
    done
    die "node $NODE is '$(node_state)', not idle, after 60 s: see $LOG_DIR/slurmd.log"
}

all_running() {
    local name
    for name in "${DAEMONS[@]}"; do
        wanted "$name" || continue
        if [[ $name == munged ]]; then munge_works || return 1; else running "$name" || return 1; fi
    done
}

cmd_up() {
    [[ $(id -u) == 0 ]] || die "must run as root (it writes $CONF_DIR and starts the daemons)"
    mkdir -p "$RUN_DIR" "$LOG_DIR" "$STATE_ROOT/state" "$STATE_ROOT/spool"
    install_packages
    ensure_hostname
    write_configs
    if install_configs; then
        log "configuration changed: restarting the SLURM daemons"
        stop_daemon slurmd
        stop_daemon slurmctld
        stop_daemon slurmdbd
    elif all_running && node_idle; then
        log "already up ($NODE, partition $PARTITION)"
        return 0
    fi
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
    start_slurmd
    wait_node_idle
    log "up: node $NODE is $(node_state) in partition $PARTITION (state in $STATE_ROOT)"
}

cmd_down() {
    local i
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        stop_daemon "${DAEMONS[i]}"
    done
    log "down"
}

cmd_status() {
    local name pid ok=0
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
    if command -v sinfo > /dev/null && ((ok == 0)); then
        sinfo -N -o '%N %P %T %c %m' || ok=1
        node_idle || ok=1
    fi
    return $ok
}

case ${1:-} in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *)
        printf 'usage: %s up|down|status\n' "$0" >&2
        exit 2
        ;;
esac
