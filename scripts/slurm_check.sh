#!/usr/bin/env bash
# Prove a rendered project's scripts/slurm.sbatch against a real SLURM on this machine.
#
# Starts a one-host cluster (munged, slurmctld, slurmd; no systemd, all traffic on 127.0.0.1),
# renders a DDP project with device=cpu from this working tree, submits its sbatch unedited except
# for a short time limit, and checks from scontrol, the job-completion log and the job's log that:
# the run saves at the time-limit warning mid-epoch, the job is requeued, every run resumes from the
# step the previous one saved, the job ends COMPLETED 0:0, the log kept every run, no traceback.
# Needs root; installs Debian's slurm-wlm and munge when missing. Stops every daemon it started.
#   scripts/slurm_check.sh          KEEP=1 keeps the work directory, PYTHON=... picks the interpreter
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}
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

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

# munge: SLURM's authentication, with its own key and socket in the work directory.
mkdir -p "$work"/{munge,state,spool,log}
dd if=/dev/urandom of="$work/munge/munge.key" bs=1024 count=1 status=none
chmod 700 "$work/munge" && chmod 400 "$work/munge/munge.key"
munged --foreground --force --key-file="$work/munge/munge.key" --socket="$work/munge/munge.sock" \
    --pid-file="$work/munge/munged.pid" --seed-file="$work/munge/seed" --log-file="$work/log/munged.log" 2>/dev/null &
pids+=($!)

# One node, this machine, reached as 127.0.0.1; ports away from SLURM's defaults.
host=$(hostname -s)
node_config=$(slurmd -C | head -n 1 | sed 's/^NodeName=[^ ]* //')
export SLURM_CONF="$work/slurm.conf"
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
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
JobCompType=jobcomp/filetxt
JobCompLoc=$work/log/jobcomp.log
MinJobAge=3600
ReturnToService=2
NodeName=$host NodeAddr=127.0.0.1 $node_config State=UNKNOWN
PartitionName=check Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
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
from test_launchers import wire_preempted_exit

project = render(snapshot_template(Path(sys.argv[1]).parent / "template"), Path(sys.argv[1]), {"parallelism": "ddp", "device": "cpu"})
wire_preempted_exit(project)
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
grep -E 'time limit|received|resumed|requeueing|epoch [0-9]+/|torchrun:|Traceback|Error' "$log" | cut -c1-160 || true
echo "--- job-completion records"
sed -E 's/.*(JobId=[0-9]+).*(JobState=[A-Z_]+).*(DerivedExitCode=[0-9:]+) (ExitCode=[0-9:]+).*/\1 \2 \4 \3/' \
    "$work/log/jobcomp.log"

# What must hold.
[[ "$state" == COMPLETED ]] || fail "job ended $state"
grep -q 'ExitCode=0:0' <<<"$info" || fail "job exit code $(grep -o 'ExitCode=[0-9:]*' <<<"$info")"
restarts=$(grep -o 'Restarts=[0-9]*' <<<"$info" | cut -d= -f2)
((restarts >= 1)) || fail "the job was never requeued"
mapfile -t saved < <(sed -nE 's/^received SIGTERM: saved .* at epoch [0-9]+, step ([0-9]+);.*/\1/p' "$log")
mapfile -t resumed < <(sed -nE 's/^resumed from .*: epoch [0-9]+, step ([0-9]+)$/\1/p' "$log")
((${#saved[@]} == restarts)) || fail "$restarts requeues but ${#saved[@]} saves at the warning"
[[ "${saved[*]}" == "${resumed[*]}" ]] || fail "saved at steps ${saved[*]} but resumed at ${resumed[*]}"
steps=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["global_step"])' "$work/run/summary.json")
steps_per_epoch=$((steps / epochs))
for step in "${saved[@]}"; do
    ((step % steps_per_epoch != 0)) || fail "step $step is an epoch boundary, not mid-epoch"
done
(($(grep -c "^epoch 1/$epochs |" "$log") == 1)) && grep -q "^epoch $epochs/$epochs |" "$log" || fail "the log lost a run's lines"
! grep -q Traceback "$log" || fail "a traceback in $log"
# SLURM 22.05 records a requeued run as PENDING (REQUEUED in later versions), never as FAILED.
(($(grep -cE 'JobState=(PENDING|REQUEUED) ' "$work/log/jobcomp.log") == restarts)) || fail "a run not recorded as requeued"
! grep -qE 'JobState=(FAILED|TIMEOUT|CANCELLED) ' "$work/log/jobcomp.log" || fail "a run recorded as failed"
echo "PASS: saved at steps ${saved[*]} (of $steps, $steps_per_epoch per epoch), requeued $restarts time(s), resumed at ${resumed[*]}, COMPLETED 0:0"
