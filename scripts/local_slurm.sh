#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, from Debian's packages, for trying and testing
# `hydra/launcher=slurm` (README.md "On a Slurm cluster", tests/cluster/).
#
#   scripts/local_slurm.sh up       install slurm-wlm + munge if missing, start munged, slurmctld, slurmd
#   scripts/local_slurm.sh status   sinfo and squeue
#   scripts/local_slurm.sh down     stop the daemons (state and logs stay in $SLURM_STATE)
#
# Root only (it writes /etc/slurm/slurm.conf, where sinfo/sbatch look for it). The daemons are
# started directly rather than through systemd, which containers usually lack. The node is
# `localhost` with this machine's CPUs and 90% of its memory; no accounting, no cgroups
# (task/none, proctrack/pgid: pgid, not linuxproc, because a signal to a job step must reach the
# step's process group only; train.py starts torchrun in a session of its own and forwards the
# signal to the ranks itself, while torchrun answers a direct SIGUSR1 by dying).
set -euo pipefail

SLURM_STATE=${SLURM_STATE:-/var/spool/local_slurm}
CONF=/etc/slurm/slurm.conf

die() { echo "local_slurm: $*" >&2; exit 1; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        return
    fi
    echo "local_slurm: installing slurm-wlm and munge"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_conf() {
    local cpus mem_mb
    cpus=$(nproc)
    # A node that reports less memory than slurm.conf claims is drained: claim 90% of it.
    mem_mb=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
    mkdir -p /etc/slurm "$SLURM_STATE"/{ctld,d,log}
    cat >"$CONF" <<EOF
# Written by scripts/local_slurm.sh: one node, one partition, no accounting.
ClusterName=local
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$SLURM_STATE/ctld
SlurmdSpoolDir=$SLURM_STATE/d
SlurmctldPidFile=$SLURM_STATE/slurmctld.pid
SlurmdPidFile=$SLURM_STATE/slurmd.pid
SlurmctldLogFile=$SLURM_STATE/log/slurmctld.log
SlurmdLogFile=$SLURM_STATE/log/slurmd.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# A node that went away comes back by itself once slurmd answers again.
ReturnToService=2
# Finished jobs stay visible to squeue/scontrol for 5 minutes (tests read their states).
MinJobAge=300
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    if pgrep -x munged >/dev/null; then return; fi
    mkdir -p /run/munge /var/lib/munge /var/log/munge /etc/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown -R munge:munge /run/munge /var/lib/munge /var/log/munge /etc/munge
    chmod 0400 /etc/munge/munge.key
    chmod 0700 /etc/munge
    # --force: run although the key and folders are checked loosely in a container.
    runuser -u munge -- munged --force
}

wait_idle() {
    local deadline=$((SECONDS + 60))
    while ((SECONDS < deadline)); do
        if timeout 5 sinfo -h -n localhost -o %t 2>/dev/null | grep -qx idle; then
            return
        fi
        sleep 1
    done
    die "the node did not become idle within 60 s: see $SLURM_STATE/log/slurmctld.log and slurmd.log"
}

up() {
    [[ $(id -u) -eq 0 ]] || die "run as root (it writes $CONF and starts the daemons)"
    install_packages
    write_conf
    start_munge
    # -N localhost: the node's name is not this machine's hostname.
    pgrep -x slurmctld >/dev/null || slurmctld
    pgrep -x slurmd >/dev/null || slurmd -N localhost
    wait_idle
    # A node that was drained by an earlier run of this script (e.g. killed slurmd) comes back.
    scontrol update nodename=localhost state=resume 2>/dev/null || true
    sinfo
}

stop() {  # the daemon's pid file first, then by exact name (only these daemons have these names)
    local name=$1 pidfile=$2
    if [[ -s $pidfile ]] && kill "$(cat "$pidfile")" 2>/dev/null; then :; else pkill -x "$name" || true; fi
    for _ in $(seq 50); do pgrep -x "$name" >/dev/null || return 0; sleep 0.2; done
    pkill -9 -x "$name" || true
}

down() {
    [[ $(id -u) -eq 0 ]] || die "run as root"
    # Jobs first, so their steps are not left running without a slurmd.
    if pgrep -x slurmctld >/dev/null; then scancel --full --quiet -u root 2>/dev/null || true; sleep 1; fi
    stop slurmd "$SLURM_STATE/slurmd.pid"
    stop slurmctld "$SLURM_STATE/slurmctld.pid"
    stop munged /run/munge/munged.pid
    echo "local_slurm: down"
}

status() {
    if ! timeout 5 sinfo 2>/dev/null; then echo "local_slurm: not up"; return 1; fi
    squeue
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) die "usage: $0 up|down|status" ;;
esac
