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
# packages' services are not started). Stops every daemon it started.
#   scripts/slurm_check.sh          KEEP=1 keeps the work directory, PYTHON=... picks the interpreter
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}
[[ -x "$python" ]] || { echo "FAIL: no $python: PYTHON=<python with torch and copier> $0" >&2 && exit 1; }
work=$(mktemp -d /tmp/slurm-check.XXXXXX)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [[ -z "${KEEP:-}" ]]; then rm -rf "$work"; else echo "kept $work"; fi
}
trap cleanup EXIT
fail() {
    echo "FAIL: $*" >&2
    exit 1
}

if ! command -v slurmctld slurmd slurmdbd munged mariadbd >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurm-wlm slurmdbd munge mariadb-server >/dev/null
fi

# munge: SLURM's authentication, with its own key and socket in the work directory.
mkdir -p "$work"/{munge,state,spool,log}
dd if=/dev/urandom of="$work/munge/munge.key" bs=1024 count=1 status=none
chmod 700 "$work/munge" && chmod 400 "$work/munge/munge.key"
munged --foreground --force --key-file="$work/munge/munge.key" --socket="$work/munge/munge.sock" \
    --pid-file="$work/munge/munged.pid" --seed-file="$work/munge/seed" --log-file="$work/log/munged.log" 2>/dev/null &
pids+=($!)

# Accounting: a throwaway MariaDB for slurmdbd, so that sacct shows every run and step of the job.
db_port=${DB_PORT:-16820}
mariadb-install-db --no-defaults --user=root --datadir="$work/db" >"$work/log/mariadb-install.log" 2>&1
mariadbd --no-defaults --user=root --datadir="$work/db" --socket="$work/db.sock" --bind-address=127.0.0.1 \
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
slurmdbd -D 2>/dev/null &
pids+=($!)
for _ in $(seq 30); do
    sacctmgr --immediate add cluster check >/dev/null 2>&1 && break
    sleep 1
done
sacctmgr --noheader list cluster format=cluster | grep -q check || fail "slurmdbd did not come up"
slurmctld -D -i 2>/dev/null &
pids+=($!)
slurmd -D -N "$host" 2>/dev/null &
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
job=$(PATH="$(dirname "$python"):$PATH" PYTHONPATH="$project/src" OMP_NUM_THREADS=1 \
    sbatch --parsable --time=3 --signal=B:USR1@60 scripts/slurm.sbatch "${overrides[@]}")
echo "submitted job $job (time limit 3 min, USR1 60 s before it)"

state=""
deadline=$((SECONDS + ${CHECK_TIMEOUT:-1500}))
while ((SECONDS < deadline)); do
    info=$(scontrol show job "$job")
    now=$(grep -o 'JobState=[A-Z_]*' <<<"$info" | cut -d= -f2)
    [[ "$now" != "$state" ]] && echo "$(date +%T) job $job $now $(grep -o 'Restarts=[0-9]*' <<<"$info")"
    state=$now
    [[ "$state" =~ ^(COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY)$ ]] && break
    sleep 2
done
info=$(scontrol show job "$job")
log="$project/slurm-$job.out"
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
steps=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["global_step"])' "$work/run/summary.json")
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
echo "      resumed at steps ${resumed[*]}, rendezvous ${rdzv[*]}, COMPLETED 0:0"
