#!/usr/bin/env bash
# A real SLURM cluster on this machine, for development, tests, CI and the README demo.
#
#   bash slurm/cluster.sh install [PKG]  Debian packages: slurm-wlm munge (+ slurmdbd mariadb-server, PKG...)
#   bash slurm/cluster.sh start          munged, [mariadb, slurmdbd,] slurmctld, 3 slurmd "nodes"
#   bash slurm/cluster.sh stop           stop every daemon by its pid file
#   bash slurm/cluster.sh wipe           stop, then delete all state
#   bash slurm/cluster.sh status         sinfo
#   bash slurm/cluster.sh dbd-stop|dbd-start   take accounting (sacct) away and back, for tests
#   bash slurm/cluster.sh preempt-mode user|term   preemption sends the job's user signal (USR2, the default)
#                                        or, as most sites do, SIGTERM and a grace time (restarts slurmctld)
#
# Nodes node[1-3]: 2 CPUs and 2 fake GPUs each (character devices, so --gpus-per-node schedules and sets
# CUDA_VISIBLE_DEVICES). Partitions: debug (default), low (preemptable: requeued), high (preempts low).
# All state lives under $ASRLAUNCH_SLURM_DIR (default /tmp/asrlaunch-slurm); ports 16817-16819, 17001-17003
# and 13306 avoid the defaults. ASRLAUNCH_SLURM_ACCOUNTING=0 skips slurmdbd/MariaDB (then sacct fails).
# /etc/slurm/slurm.conf is linked to our config so that plain `squeue`, `sbatch` ... work in any shell.
set -euo pipefail

DIR=${ASRLAUNCH_SLURM_DIR:-/tmp/asrlaunch-slurm}
ACCOUNTING=${ASRLAUNCH_SLURM_ACCOUNTING:-1}
PREEMPT_MODE_FILE=$DIR/etc/preempt-mode  # user: preempt_send_user_signal; term: SIGTERM + GraceTime only
NODES=(node1 node2 node3)
CONF=$DIR/etc/slurm.conf
export SLURM_CONF=$CONF

log() { echo "[slurm] $*" >&2; }

install() {  # extra arguments: more Debian packages to install in the same apt-get run
  local packages=(slurm-wlm munge "$@")
  [ "$ACCOUNTING" = 1 ] && packages+=(slurmdbd mariadb-server)
  local missing=()
  for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

write_config() {
  mkdir -p "$DIR"/{etc,state,spool,run,log,munge,fakegpu,mysql}
  chmod 755 "$DIR/munge"
  for n in 0 1; do [ -e "$DIR/fakegpu/nvidia$n" ] || mknod "$DIR/fakegpu/nvidia$n" c 195 "$n"; done
  for node in "${NODES[@]}"; do mkdir -p "$DIR/spool/$node"; done
  local preempt_signal="SlurmctldParameters=preempt_send_user_signal"
  [ "$(cat "$PREEMPT_MODE_FILE" 2>/dev/null)" = term ] && preempt_signal="# preemption: SIGTERM, GraceTime, SIGKILL"
  local storage="AccountingStorageType=accounting_storage/none"
  # cred_expire (job credential lifetime) is also how long a requeued job waits before it may start again:
  # 5 s, SLURM's minimum (lower is rejected and falls back to 120 s); ample for step launches on localhost.
  if [ "$ACCOUNTING" = 1 ]; then
    storage="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=16819
AccountingStoragePass=$DIR/munge/munge.socket.2
AccountingStorageTRES=gres/gpu"
  fi
  cat >"$CONF" <<EOF
ClusterName=asrlaunch
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
SlurmctldPort=16817
SlurmdPort=16818
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket.2,cred_expire=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=2
$preempt_signal
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=600
KillWait=10
MaxArraySize=1001
$storage
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
GresTypes=gpu
NodeName=node[1-3] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[17001-17003] CPUs=2 RealMemory=8000 Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
PartitionName=low Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=20
PartitionName=high Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
  cat >"$DIR/etc/gres.conf" <<EOF
AutoDetect=off
NodeName=node[1-3] Name=gpu File=$DIR/fakegpu/nvidia[0-1]
EOF
  cat >"$DIR/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket.2
DbdHost=localhost
DbdPort=16819
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=13306
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$DIR/etc/slurmdbd.conf"
  mkdir -p /etc/slurm
  if [ ! -e /etc/slurm/slurm.conf ] || [ -L /etc/slurm/slurm.conf ]; then ln -sfn "$CONF" /etc/slurm/slurm.conf; fi
}

# A pid file counts only while its pid runs the daemon it names: after a reboot, or on a machine restored
# from a snapshot, pid files and sockets are left over and their pids may belong to any other process.
alive() {  # alive PID_FILE DAEMON
  [ -f "$1" ] && [ "$(cat "/proc/$(cat "$1")/comm" 2>/dev/null)" = "$2" ]
}

# A leftover socket file looks like a live server to a client but refuses connections (ECONNREFUSED).
wait_for_mariadb() {
  for _ in $(seq 300); do
    mariadb-admin --socket="$DIR/run/mysql.sock" -u root ping >/dev/null 2>&1 && return 0
    alive "$DIR/run/mariadb.pid" mariadbd || [ ! -f "$DIR/run/mariadb.pid" ] || break
    sleep 0.2
  done
  log "MariaDB did not start; the end of $DIR/log/mariadb.log:"; tail -n 20 "$DIR/log/mariadb.log" >&2
  return 1
}

start_munge() {
  alive "$DIR/run/munged.pid" munged && return
  [ -f "$DIR/munge/munge.key" ] || { dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 2>/dev/null; chmod 400 "$DIR/munge/munge.key"; }
  munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket.2" \
    --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/seed"
}

start_accounting() {
  if ! alive "$DIR/run/mariadb.pid" mariadbd; then
    rm -f "$DIR/run/mariadb.pid" "$DIR/run/mysql.sock"
    if [ ! -d "$DIR/mysql/mysql" ]; then
      mariadb-install-db --user=root --datadir="$DIR/mysql" --auth-root-authentication-method=socket \
        --skip-test-db >"$DIR/log/mariadb-install.log" 2>&1
    fi
    setsid mariadbd --no-defaults --user=root --datadir="$DIR/mysql" --socket="$DIR/run/mysql.sock" \
      --port=13306 --bind-address=127.0.0.1 --pid-file="$DIR/run/mariadb.pid" \
      >"$DIR/log/mariadb.log" 2>&1 </dev/null &
    wait_for_mariadb
    mariadb --socket="$DIR/run/mysql.sock" -u root -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
      CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
      CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
      GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
  fi
  alive "$DIR/run/slurmdbd.pid" slurmdbd || slurmdbd
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/16819) 2>/dev/null && break; sleep 0.2; done
}

wait_idle() {
  for _ in $(seq 150); do
    # up: every node answers (idle, or running jobs already), none unknown, down or drained
    states=$(sinfo -h -N -o '%T' 2>/dev/null | sort -u)
    if [ -n "$states" ] && ! grep -qvE '^(idle|mixed|allocated|completing)$' <<<"$states"; then
      log "up: ${#NODES[@]} nodes ($(tr '\n' ' ' <<<"$states")) in $DIR"; return 0
    fi
    sleep 0.2
  done
  log "nodes did not become idle: $(sinfo -N 2>&1)"; return 1
}

start() {
  command -v slurmctld >/dev/null || install
  write_config
  start_munge
  [ "$ACCOUNTING" = 1 ] && start_accounting
  alive "$DIR/run/slurmctld.pid" slurmctld || slurmctld
  for node in "${NODES[@]}"; do alive "$DIR/run/slurmd-$node.pid" slurmd || slurmd -N "$node"; done
  wait_idle
}

stop() {
  alive "$DIR/run/slurmctld.pid" slurmctld && { scancel --full -u root >/dev/null 2>&1 || true; }
  local daemons=()
  for node in "${NODES[@]}"; do daemons+=("slurmd-$node.pid slurmd"); done
  daemons+=("slurmctld.pid slurmctld" "slurmdbd.pid slurmdbd" "mariadb.pid mariadbd" "munged.pid munged")
  for entry in "${daemons[@]}"; do
    read -r pid_file name <<<"$entry"
    if alive "$DIR/run/$pid_file" "$name"; then
      pid=$(cat "$DIR/run/$pid_file"); kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
  done
  log "stopped"
}

case "${1:-}" in
  install) shift; install "$@" ;;
  start) start ;;
  stop) stop ;;
  restart) stop; start ;;
  wipe) stop; rm -rf "$DIR"; [ -L /etc/slurm/slurm.conf ] && rm -f /etc/slurm/slurm.conf; log "wiped $DIR" ;;
  status) sinfo ;;
  dbd-stop) alive "$DIR/run/slurmdbd.pid" slurmdbd && kill "$(cat "$DIR/run/slurmdbd.pid")"; sleep 0.5; log "slurmdbd stopped (sacct fails now)" ;;
  dbd-start) start_accounting; log "slurmdbd started" ;;
  preempt-mode)
    case "${2:-}" in user|term) ;; *) echo "usage: $0 preempt-mode user|term" >&2; exit 2 ;; esac
    mkdir -p "$DIR/etc"; echo "$2" >"$PREEMPT_MODE_FILE"; write_config
    if alive "$DIR/run/slurmctld.pid" slurmctld; then
      pid=$(cat "$DIR/run/slurmctld.pid"); kill "$pid"
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    slurmctld; wait_idle; log "preemption signals: $2" ;;
  *) echo "usage: $0 {install|start|stop|restart|wipe|status|dbd-stop|dbd-start|preempt-mode}" >&2; exit 2 ;;
esac
