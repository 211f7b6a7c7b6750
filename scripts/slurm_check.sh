#!/usr/bin/env bash
# Prove a rendered project's scripts/slurm.sbatch against a real SLURM on this machine.
#
# Starts a one-host cluster (munged, MariaDB and slurmdbd for accounting, slurmctld, slurmd binding
# tasks to their CPUs with task/affinity; no systemd, all traffic on 127.0.0.1), renders a DDP project
# with device=cpu from this working tree, submits its sbatch unedited except for a short time limit,
# and checks from sacct, scontrol and the job's log that: the run saves at the time-limit warning
# mid-epoch, the job is requeued (recorded as REQUEUED, with a COMPLETED batch step), every run resumes
# from the step the previous one saved, the job ends COMPLETED 0:0, the log kept every run, every run
# had a rendezvous id of its own, and no traceback was printed.
# Needs root; installs Debian's slurm-wlm, slurmdbd, munge and mariadb-server when missing (the
# packages' services are not started). However it ends (passed, failed, timed out, or stopped by a
# signal), it stops every process it started: the job, the daemons and what they started.
#   scripts/slurm_check.sh          KEEP=1 keeps the work directory, PYTHON=... picks the interpreter,
#                                   STALL_TIMEOUT, CHECK_TIMEOUT: how long to wait for the job (below)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}
[[ -x "$python" ]] || { echo "FAIL: no $python: PYTHON=<python with torch and copier> $0" >&2 && exit 1; }
work=$(mktemp -d /tmp/slurm-check.XXXXXX)
# Every process this check starts carries this in its environment, and passes it on: the daemons,
# slurmd's slurmstepd, and the job's (sbatch passes the submitting environment on): its batch script,
# srun, torchrun and the workers. That finds them all, however they have detached.
mark="SLURM_CHECK_RUN=$work"
pids=() # the daemons
job=""
marked() {
    local dir
    for dir in /proc/[0-9]*; do
        grep -qzxF "$mark" "$dir/environ" 2>/dev/null && echo "${dir#/proc/}"
    done
    return 0
}
# Send $1 to the processes given, then wait up to $2 seconds for them to end; prints those left.
signal_and_wait() {
    local signal=$1 seconds=$2 left
    shift 2
    kill -s "$signal" "$@" 2>/dev/null
    for _ in $(seq $((seconds * 5))); do
        left=$(for pid in "$@"; do [[ -d /proc/$pid ]] && ! grep -q '^State:.*Z' "/proc/$pid/status" 2>/dev/null && echo "$pid"; done)
        [[ -z "$left" ]] && return 0
        sleep 0.2
    done
    echo "$left"
}
cleanup() {
    local status=$? left
    set +e
    trap '' TERM INT HUP
    if [[ -n "$job" ]]; then  # the job first, through SLURM, while its daemons run: TERM, KILL 30 s on
        scancel "$job" 2>/dev/null
        for _ in $(seq 90); do
            squeue --noheader --jobs="$job" 2>/dev/null | grep -q . || break
            sleep 1
        done
    fi
    # Then the daemons, the last started first, and whatever outlived them: what scancel could not
    # stop of the job (srun, torchrun, workers), slurmstepd.
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        left=$(signal_and_wait TERM 20 "${pids[i]}") && [[ -n "$left" ]] && signal_and_wait KILL 5 $left >/dev/null
    done
    left=$(marked)
    if [[ -n "$left" ]]; then
        echo "stopping the processes left running: $(ps -o comm= -p "$(xargs <<<"$left" | tr ' ' ,)" | sort | uniq -c | xargs)"
        left=$(signal_and_wait TERM 10 $left) && [[ -n "$left" ]] && left=$(signal_and_wait KILL 10 $left)
    fi
    if [[ -n "$left" ]]; then  # never remove the spool and state under running processes
        echo "FAIL: processes $(xargs <<<"$left") of this check outlived SIGKILL; kept $work" >&2
        exit 1
    fi
    if [[ -z "${KEEP:-}" ]]; then rm -rf "$work"; else echo "kept $work"; fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 143' TERM INT HUP
fail() {
    echo "FAIL: $*" >&2
    exit 1
}
stall_timeout=${STALL_TIMEOUT:-900} check_timeout=${CHECK_TIMEOUT:-10800}
[[ $stall_timeout =~ ^[0-9]+$ && $check_timeout =~ ^[0-9]+$ ]] || fail "STALL_TIMEOUT and CHECK_TIMEOUT are seconds"

if ! command -v slurmctld slurmd slurmdbd munged mariadbd >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurm-wlm slurmdbd munge mariadb-server >/dev/null
fi

# munge: SLURM's authentication, with its own key and socket in the work directory.
mkdir -p "$work"/{munge,state,spool,log}
dd if=/dev/urandom of="$work/munge/munge.key" bs=1024 count=1 status=none
chmod 700 "$work/munge" && chmod 400 "$work/munge/munge.key"
env "$mark" munged --foreground --force --key-file="$work/munge/munge.key" --socket="$work/munge/munge.sock" \
    --pid-file="$work/munge/munged.pid" --seed-file="$work/munge/seed" --log-file="$work/log/munged.log" 2>/dev/null &
pids+=($!)

# Accounting: a throwaway MariaDB for slurmdbd, so that sacct shows every run and step of the job.
db_port=${DB_PORT:-16820}
mariadb-install-db --no-defaults --user=root --datadir="$work/db" >"$work/log/mariadb-install.log" 2>&1
env "$mark" mariadbd --no-defaults --user=root --datadir="$work/db" --socket="$work/db.sock" --bind-address=127.0.0.1 \
    --port="$db_port" --pid-file="$work/mariadbd.pid" --log-error="$work/log/mariadbd.log" --skip-log-bin \
    >/dev/null 2>&1 &
pids+=($!)
for _ in $(seq 60); do
    [[ -S "$work/db.sock" ]] && break
    sleep 0.5
done
mariadb --no-defaults --socket="$work/db.sock" --user=root -e "CREATE DATABASE slurm_acct_db;
    CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'check'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"

# One node, this machine, reached as 127.0.0.1; ports away from SLURM's defaults.
host=$(hostname -s)
node_config=$(slurmd -C | head -n 1 | sed 's/^NodeName=[^ ]* //')
dbd_port=${SLURMDBD_PORT:-16819}
cat >"$work/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$work/munge/munge.sock
DbdAddr=127.0.0.1
DbdHost=$host
DbdPort=$dbd_port
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$db_port
StorageUser=slurm
StoragePass=check
StorageLoc=slurm_acct_db
LogFile=$work/log/slurmdbd.log
PidFile=$work/slurmdbd.pid
EOF
chmod 600 "$work/slurmdbd.conf"
export SLURM_CONF="$work/slurm.conf"  # slurmdbd reads the slurmdbd.conf next to it
cat >"$SLURM_CONF" <<EOF
ClusterName=check
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=${SLURMCTLD_PORT:-16817}
SlurmdPort=${SLURMD_PORT:-16818}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$work/munge/munge.sock
CredType=cred/munge
StateSaveLocation=$work/state
SlurmdSpoolDir=$work/spool
SlurmctldPidFile=$work/slurmctld.pid
SlurmdPidFile=$work/slurmd.pid
SlurmctldLogFile=$work/log/slurmctld.log
SlurmdLogFile=$work/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$dbd_port
AccountingStoragePass=$work/munge/munge.sock
JobAcctGatherType=jobacct_gather/none
MinJobAge=3600
ReturnToService=2
NodeName=$host NodeAddr=127.0.0.1 $node_config State=UNKNOWN
PartitionName=check Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
env "$mark" slurmdbd -D 2>/dev/null &
pids+=($!)
for _ in $(seq 30); do
    sacctmgr --immediate add cluster check >/dev/null 2>&1 && break
    sleep 1
done
sacctmgr --noheader list cluster format=cluster | grep -q check || fail "slurmdbd did not come up"
env "$mark" slurmctld -D -i 2>/dev/null &
pids+=($!)
env "$mark" slurmd -D -N "$host" 2>/dev/null &
pids+=($!)
for _ in $(seq 60); do
    sinfo --noheader --format=%T 2>/dev/null | grep -q idle && break
    sleep 1
done
sinfo --noheader --format=%T | grep -q idle || fail "the node did not come up: $(tail -n 5 "$work"/log/*.log)"
echo "cluster up: $(sinfo --noheader --format='%P %D node(s) %T, %c CPUs')"

# A DDP project on the CPU, rendered from this working tree as the tests do.
project="$work/project"
PYTHONPATH="$repo/tests" "$python" - "$project" <<'EOF'
import sys
from pathlib import Path

from rendering import render, snapshot_template

project = Path(sys.argv[1])
render(snapshot_template(project.parent / "template"), project, {"parallelism": "ddp", "device": "cpu"})
EOF

# Epochs of 20 to 40 s on two cores, so that the warning lands mid-epoch. SLURM's time limits count
# in minutes and it may signal up to a minute early: 3 minutes with a 60 s lead makes each run train
# for one to two minutes, and the 8 epochs (over two minutes even on idle cores) take two to four.
epochs=8
overrides=(data.dataset=synthetic data.synthetic_size=32768 data.batch_size=8 log.progress_bar=false
    "epochs=$epochs" "output_dir=$work/run")
cd "$project"
# The project is not installed: its Python is the one on PATH, with the sources on PYTHONPATH.
job=$(env -u VIRTUAL_ENV -u CONDA_PREFIX "$mark" PATH="$(dirname "$python"):$PATH" PYTHONPATH="$project/src" \
    OMP_NUM_THREADS=1 sbatch --parsable --time=3 --signal=B:USR1@60 scripts/slurm.sbatch "${overrides[@]}")
echo "submitted job $job (time limit 3 min, USR1 60 s before it)"

# How long the job takes depends on the host: on a busy one every run trains less far before its time
# limit, so there are more runs (a loaded 2-core host took three times as long as an idle one). So the
# check waits as long as the job moves on (its state changes or its log grows) and gives up when it has
# not for STALL_TIMEOUT seconds (default 900: longer than a run, the two minutes a requeued job waits
# and a start together) or after CHECK_TIMEOUT seconds in all (default 10800), saying which.
log="$project/slurm-$job.out"
state="" size=0 started=$SECONDS
moved=$SECONDS
while true; do
    info=$(scontrol show job "$job") || fail "slurmctld does not answer: $(tail -n 2 "$work/log/slurmctld.log" | tr '\n' ' ')"
    now=$(grep -o 'JobState=[A-Z_]*' <<<"$info" | cut -d= -f2)
    if [[ "$now" != "$state" ]]; then
        echo "$(date +%T) job $job $now $(grep -o 'Restarts=[0-9]*' <<<"$info")"
        state=$now moved=$SECONDS
    fi
    grown=$(stat -c %s "$log" 2>/dev/null || echo 0)
    ((grown == size)) || size=$grown moved=$SECONDS
    [[ "$state" =~ ^(COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY)$ ]] && break
    ((SECONDS - moved < stall_timeout)) ||
        fail "job $job $state: nothing new for $((SECONDS - moved)) s (STALL_TIMEOUT=$stall_timeout); its log ends: $(tail -n 2 "$log" 2>/dev/null | tr '\n' ' ')"
    ((SECONDS - started < check_timeout)) ||
        fail "job $job still $state after $((SECONDS - started)) s (CHECK_TIMEOUT=$check_timeout), still moving on: a slow host?"
    sleep 2
done
echo "job $job ended $state after $((SECONDS - started)) s"
info=$(scontrol show job "$job")
echo "--- $log (trimmed)"
grep -E 'rendezvous|time limit|received|resumed|requeueing|epoch [0-9]+/|torchrun:|Traceback|Error' "$log" |
    cut -c1-160 || true
# Every run of the job (--duplicates) and its steps, as accounting recorded them.
for _ in $(seq 30); do
    sacct --noheader --parsable2 --jobs="$job" --format=JobID,State | grep -q "^$job|COMPLETED" && break
    sleep 1
done
runs=$(sacct --noheader --parsable2 --duplicates --jobs="$job" --format=JobID,State,ExitCode)
echo "--- sacct --duplicates (JobID|State|ExitCode)"
echo "$runs"

# What must hold.
[[ "$state" == COMPLETED ]] || fail "job ended $state"
grep -q 'ExitCode=0:0' <<<"$info" || fail "job exit code $(grep -o 'ExitCode=[0-9:]*' <<<"$info")"
restarts=$(grep -o 'Restarts=[0-9]*' <<<"$info" | cut -d= -f2)
((restarts >= 1)) || fail "the job was never requeued"
# train.py's lines: "received SIGTERM on ranks 0, 1: saved <last.pt> at step N (epoch E, B batches in); ..." and
# "resumed from <last.pt> at step N (epoch E, B batches in)".
mapfile -t saved < <(sed -nE 's/^received SIGTERM( on ranks? [0-9, ]+)?: saved .* at step ([0-9]+) \(.*\); resume with .*/\2/p' "$log")
mapfile -t resumed < <(sed -nE 's/^resumed from .* at step ([0-9]+) \(.*\)$/\1/p' "$log")
((${#saved[@]} == restarts)) || fail "$restarts requeues but ${#saved[@]} saves at the warning"
[[ "${saved[*]}" == "${resumed[*]}" ]] || fail "saved at steps ${saved[*]} but resumed at ${resumed[*]}"
# summary.json: the run's steps, and its time and allocations counted over every run of the job.
read -r steps allocations wall_time < <(python3 -c 'import json, sys; s = json.load(open(sys.argv[1]))
print(s["global_step"], s["allocations"], s["wall_time_s"])' "$work/run/summary.json")
((allocations == restarts + 1)) || fail "summary.json counts $allocations allocations of $((restarts + 1))"
steps_per_epoch=$((steps / epochs))
for step in "${saved[@]}"; do
    ((step % steps_per_epoch != 0)) || fail "step $step is an epoch boundary, not mid-epoch"
done
(($(grep -cE '^received SIGTERM( on ranks? [0-9, ]+)?: saved .* batches in\); ' "$log") == restarts)) || fail "a save was not mid-epoch"
(($(grep -c "^epoch 1/$epochs |" "$log") == 1)) && grep -q "^epoch $epochs/$epochs |" "$log" ||
    fail "the log lost a run's lines"
! grep -q Traceback "$log" || fail "a traceback in $log"
# Every run a rendezvous of its own: slurm-<job>-<requeues>, from SLURM_RESTART_COUNT in the step.
mapfile -t rdzv < <(sed -nE 's/^train_multi_node.sh: .* rendezvous ([^ ]+) at .*/\1/p' "$log")
[[ "${rdzv[*]}" == "$(for run in $(seq 0 "$restarts"); do echo "slurm-$job-$run"; done | xargs)" ]] ||
    fail "rendezvous ids ${rdzv[*]}"
# Each requeued run: the job REQUEUED, its batch step COMPLETED, its training step exit code 75
# (preempted; SLURM calls every non-zero step FAILED); the last run COMPLETED 0:0 throughout.
requeued="$job|REQUEUED|0:0 $job.batch|COMPLETED|0:0 $job.0|FAILED|75:0"
expected="$(for _ in $(seq "$restarts"); do echo "$requeued"; done) $job|COMPLETED|0:0"
expected="$expected $job.batch|COMPLETED|0:0 $job.0|COMPLETED|0:0"
[[ "$(xargs <<<"$runs")" == "$(xargs <<<"$expected")" ]] || fail "accounting recorded: $(xargs <<<"$runs")"
echo "PASS: saved at steps ${saved[*]} (of $steps, $steps_per_epoch per epoch), requeued $restarts time(s),"
echo "      resumed at steps ${resumed[*]}, rendezvous ${rdzv[*]}, COMPLETED 0:0,"
echo "      summary.json: $allocations allocations, wall_time_s $wall_time"
