#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine (Debian's munge, slurmctld, slurmd), and the
# checks of sharded runs against single-process ones:
#   1. a 4-shard array of a small sweep plus its merge job give the single-process grid.md and
#      the same NLLs for every cell;
#   2. a shard requeued mid-run (scontrol requeue: cancel and back in the queue) resumes from
#      its checkpoint to identical NLLs;
#   3. two processes started at once on the same sweep compute every cell once, and both end
#      with the same grid.
# Usage: scripts/slurm/test-cluster.sh STREAMPPL MODEL CORPUS
# Exit 0: passed; 3: skipped (Slurm could not be installed, and STREAMPPL_REQUIRE_MODELS is
# not 1); anything else: failed. It stops the daemons it started.
set -euo pipefail
BIN=$(realpath "$1"); MODEL=$(realpath "$2"); CORPUS=$(realpath "$3")
REPO=$(cd "$(dirname "$0")/../.." && pwd)
required() { [[ "${STREAMPPL_REQUIRE_MODELS:-}" == 1 ]]; }
trap 'echo "FAILED at line $LINENO: $BASH_COMMAND" >&2' ERR

install_slurm() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && return 0
    echo "installing Debian's slurm-wlm and munge" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge; } >&2
}
if ! install_slurm; then
    required && { echo "FAILED: cannot install slurm-wlm and munge (STREAMPPL_REQUIRE_MODELS=1)" >&2; exit 1; }
    echo "!!! SKIPPED: cannot install slurm-wlm and munge !!!" >&2
    exit 3
fi

WORK=$(mktemp -d /tmp/streamppl-slurm.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    # Gone before the next run looks for them (a munged still answering, then exiting, leaves
    # that run without a socket).
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

# munge: one key, one daemon (one that answers is reused: it is the machine's; one that a run
# just before is stopping still shows in pgrep but no longer answers).
munge_answers() { munge -n 2>/dev/null | unmunge > /dev/null 2>&1; }
if ! munge_answers; then
    mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
    [[ -f /etc/munge/munge.key ]] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; chmod 400 /etc/munge/munge.key; }
    for _ in $(seq 20); do pgrep -x munged > /dev/null || break; sleep 0.5; done
    munged --force --pid-file="$WORK/munged.pid" 2>/dev/null
    PIDS+=("$(cat "$WORK/munged.pid")")
    for _ in $(seq 20); do munge_answers && break; sleep 0.5; done
fi

HOST=$(hostname -s)
PORT=$((17000 + RANDOM % 2000))
mkdir -p "$WORK/state" "$WORK/spool" "$WORK/jobs"
export SLURM_CONF="$WORK/slurm.conf"
cat > "$SLURM_CONF" <<EOF
ClusterName=streamppl-test
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$WORK/state
SlurmdSpoolDir=$WORK/spool
SlurmctldPidFile=$WORK/slurmctld.pid
SlurmdPidFile=$WORK/slurmd.pid
SlurmctldLogFile=$WORK/slurmctld.log
SlurmdLogFile=$WORK/slurmd.log
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
JobRequeue=1
NodeName=$HOST CPUs=$(nproc) State=UNKNOWN
PartitionName=test Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
slurmctld -i; sleep 1; PIDS+=("$(cat "$WORK/slurmctld.pid")")
slurmd; sleep 1; PIDS+=("$(cat "$WORK/slurmd.pid")")
# A node that slurmctld still knows as down or drained (daemons of a run just before) is put
# back once; then it has a minute.
for i in $(seq 60); do
    sinfo -h -o %t 2>/dev/null | grep -q idle && break
    [[ $i == 15 ]] && scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true
    sleep 1
done
sinfo -h -o %t | grep -q idle || { echo "FAILED: the Slurm node never became idle" >&2; cat "$WORK/slurmd.log" >&2; exit 1; }

# Waits until job $1 (and its array tasks) has left the queue. A query that fails (slurmctld
# busy: "Socket timed out") is asked again, never taken for an empty queue; a job already
# purged from slurmctld's memory ("Invalid job id") has left.
wait_gone() {
    local out
    for _ in $(seq 600); do
        if out=$(squeue -h -j "$1" 2>&1); then
            [[ -z "$out" ]] && return 0
        elif [[ "$out" == *"Invalid job id"* ]]; then
            return 0
        fi
        sleep 1
    done
    echo "FAILED: job $1 still queued after 10 minutes" >&2; exit 1
}
# What the cluster knows of job $1, and the log $2, for a failure's message.
dump_state() {
    { echo "--- scontrol show job $1"; scontrol -o show job "$1"
      echo "--- sinfo"; sinfo -N -l; sinfo -R
      echo "--- streamppl processes"; ps -eo pid,stat,etime,args | grep '[s]treamppl' || true
      echo "--- $2 (last 20 lines)"; tail -n 20 "$2"
      echo "--- slurmctld.log (last 30 lines)"; tail -n 30 "$WORK/slurmctld.log"
      echo "--- slurmd.log (last 30 lines)"; tail -n 30 "$WORK/slurmd.log"; } >&2 2>&1 || true
}
# Waits until requeued array task $1 has run again and left the queue, with the file $2 that
# only a finished run writes in place (its first run was killed before writing it). A task
# still pending is nudged every 20 s, and each nudge printed: held after a failed launch
# (slurmd refuses a credential no newer than the one it revoked) is released, one waiting for
# its BeginTime is started, a node left drained or down by the killed run is resumed.
wait_rerun_done() {
    local state
    for i in $(seq 600); do
        state=$(squeue -h -j "$1" -o '%t %r' 2>/dev/null || true)
        compgen -G "$2" > /dev/null && [[ -z "$state" ]] && return 0
        if [[ "$state" == PD* ]] && (( i % 20 == 0 )); then
            echo "task $1 still pending after ${i}s ($state); node: $(sinfo -h -o '%t %E')" >&2
            case "$state" in
                *[Hh]eld*) scontrol release "$1" || true ;;
                *BeginTime*) scontrol update JobId="$1" StartTime=now || true ;;
            esac
            sinfo -h -o %t | grep -Eq 'drain|down' && { scontrol update NodeName="$HOST" State=RESUME || true; }
        fi
        sleep 1
    done
    echo "FAILED: task $1 did not finish after its requeue within 10 minutes" >&2
    dump_state "$1" "$3"; exit 1
}
# Every cell's NLLs in $1 equal those in $2, and the grids are the same.
same_sweep() {
    diff "$1/grid.md" "$2/grid.md" >&2 || { echo "FAILED: $1/grid.md differs from $2/grid.md" >&2; exit 1; }
    for run in "$2"/*/run.json; do
        cell=$(basename "$(dirname "$run")")
        line=$("$BIN" compare "$1/$cell" "$2/$cell")
        [[ "$line" == *"mean |dNLL| 0.000e0, max 0.000e0"* ]] || { echo "FAILED: $cell: $line" >&2; exit 1; }
    done
}

SWEEP=(sweep --model "$MODEL" --corpus "$CORPUS" --sinks 0,1,4 --windows 16,48 --max-tokens 160)
cd "$WORK/jobs"
"$BIN" "${SWEEP[@]}" --out "$WORK/single" > /dev/null 2> "$WORK/single.err" || { cat "$WORK/single.err" >&2; exit 1; }

echo "== 1. a 4-shard array and its merge job" >&2
"$BIN" "${SWEEP[@]}" --out "$WORK/sharded" --slurm 4 --slurm-scripts "$REPO/scripts/slurm" --dry-run >&2
submitted=$("$BIN" "${SWEEP[@]}" --out "$WORK/sharded" --slurm 4 --slurm-scripts "$REPO/scripts/slurm")
echo "$submitted" >&2
merge_job=$(sed -n 's/.*merge job \([0-9]*\).*/\1/p' <<< "$submitted")
array_job=$(sed -n 's/.*array job \([0-9]*\).*/\1/p' <<< "$submitted")
wait_gone "$array_job"; wait_gone "$merge_job"
[[ -f "$WORK/sharded/grid.md" ]] || { echo "FAILED: the merge job wrote no grid" >&2; tail -n 5 slurm-* >&2; exit 1; }
computed=$(cat slurm-streamppl-shard-* | grep -c ' computing -> ' || true)
[[ "$computed" == 6 ]] || { echo "FAILED: the shards computed $computed runs, not the 6 cells" >&2; exit 1; }
grep -q ' computing -> ' slurm-streamppl-merge-* && { echo "FAILED: the merge job computed a run" >&2; exit 1; }
same_sweep "$WORK/sharded" "$WORK/single"

echo "== 2. a shard requeued mid-run resumes to the same NLLs" >&2
LONG=(sweep --model "$MODEL" --corpus "$CORPUS" --sinks 4 --windows 60 --max-tokens 2000 --checkpoint-every 0)
"$BIN" "${LONG[@]}" --out "$WORK/long-single" > /dev/null
job=$(sbatch --parsable --requeue --array=0-0 "$REPO/scripts/slurm/shard.sbatch" "$BIN" "${LONG[@]}" --out "$WORK/long")
for _ in $(seq 300); do
    compgen -G "$WORK/long/*/checkpoint/state.json" > /dev/null && break
    sleep 0.2
done
compgen -G "$WORK/long/*/checkpoint/state.json" > /dev/null || { echo "FAILED: no checkpoint before the requeue" >&2; exit 1; }
scontrol requeue "${job}_0"
# Slurm holds a requeued job back two minutes (BeginTime, past the killed run's credential);
# let it start as soon as it is pending, a second or two later so that its new credential is
# newer than the revoked one.
for _ in $(seq 100); do [[ "$(squeue -h -j "${job}_0" -o %t)" == PD ]] && break; sleep 0.2; done
sleep 2
scontrol update JobId="${job}_0" StartTime=now
shard_log=slurm-streamppl-shard-"${job}"_0.out
wait_rerun_done "${job}_0" "$WORK/long/*/run.json" "$shard_log"
grep -q "resum" "$shard_log" || {
    echo "FAILED: the requeued shard did not resume" >&2; dump_state "${job}_0" "$shard_log"; exit 1; }
cell=$(basename "$(dirname "$(ls "$WORK"/long-single/*/run.json)")")
line=$("$BIN" compare "$WORK/long/$cell" "$WORK/long-single/$cell")
[[ "$line" == *"max 0.000e0"* ]] || { echo "FAILED: requeued shard: $line" >&2; exit 1; }

echo "== 3. two processes on one sweep compute each cell once" >&2
"$BIN" "${SWEEP[@]}" --out "$WORK/twin" > "$WORK/twin-a.out" 2> "$WORK/twin-a.err" &
a=$!
"$BIN" "${SWEEP[@]}" --out "$WORK/twin" > "$WORK/twin-b.out" 2> "$WORK/twin-b.err" &
b=$!
wait "$a"; wait "$b"
computed=$(cat "$WORK"/twin-*.err | grep -c ' computing -> ' || true)
[[ "$computed" == 6 ]] || { echo "FAILED: two processes computed $computed runs, not 6" >&2; exit 1; }
diff "$WORK/twin-a.out" "$WORK/twin-b.out" >&2 || { echo "FAILED: the two processes printed different grids" >&2; exit 1; }
same_sweep "$WORK/twin" "$WORK/single"
echo "slurm: all checks passed" >&2
