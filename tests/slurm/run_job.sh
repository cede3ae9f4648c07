#!/usr/bin/env bash
# Submit configs/slurm/attribute.sbatch to a real single-host Slurm and wait for it.
#
#   tests/slurm/run_job.sh WORKDIR [cad arguments...]
#
# Needs Debian's slurm-wlm and munge (apt-get install -y --no-install-recommends slurm-wlm munge) and root.
# Starts munged, slurmctld and slurmd for this host from a slurm.conf written under WORKDIR (nothing under /etc
# is changed), submits the sbatch with 2 tasks on 1 node (`sbatch --wait`), prints the job's output and stops
# the daemons, whatever happens. The run directory is WORKDIR/run. Exit code: the job's.
set -euo pipefail
workdir=$(realpath -m "$1"); shift
repo=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$workdir"/{state,spool,log}
host=$(hostname -s)
cpus=$(getconf _NPROCESSORS_ONLN)  # not nproc: it follows OMP_NUM_THREADS
export SLURM_CONF="$workdir/slurm.conf"
sed -e "s|@HOST@|$host|g" -e "s|@CPUS@|$cpus|g" -e "s|@WORKDIR@|$workdir|g" \
    "$repo/tests/slurm/slurm.conf.in" > "$SLURM_CONF"

pids=()
stop() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [[ -n "${munge_dir:-}" ]]; then
    if [[ -f "$munge_dir/munged.pid" ]]; then kill "$(cat "$munge_dir/munged.pid")" 2>/dev/null || true; fi
    cp "$munge_dir/munged.log" "$workdir/log/" 2>/dev/null || true
    rm -rf "$munge_dir"
  fi
}
trap stop EXIT

# munge: its own key and socket, run as the munge user (every folder above its socket must be open to it)
munge_dir=$(mktemp -d /tmp/cad-munge.XXXXXX)
mkdir -p "$munge_dir/key"
dd if=/dev/urandom of="$munge_dir/key/munge.key" bs=1 count=128 status=none
chown -R munge:munge "$munge_dir"; chmod 755 "$munge_dir"; chmod 700 "$munge_dir/key"; chmod 400 "$munge_dir/key/munge.key"
runuser -u munge -- /usr/sbin/munged --key-file="$munge_dir/key/munge.key" \
  --socket="$munge_dir/munge.socket" --pid-file="$munge_dir/munged.pid" \
  --log-file="$munge_dir/munged.log" --seed-file="$munge_dir/key/munged.seed"
for _ in $(seq 50); do [[ -S "$munge_dir/munge.socket" ]] && break; sleep 0.1; done
sed -i "s|@MUNGE_SOCKET@|$munge_dir/munge.socket|" "$SLURM_CONF"

/usr/sbin/slurmctld -D -i -f "$SLURM_CONF" > "$workdir/log/slurmctld.out" 2>&1 & pids+=($!)
/usr/sbin/slurmd -D -f "$SLURM_CONF" > "$workdir/log/slurmd.out" 2>&1 & pids+=($!)
for _ in $(seq 100); do
  sinfo -h -o %T 2>/dev/null | grep -q idle && break
  sleep 0.2
done
sinfo

cd "$repo"
# Slurm holds a requeued job back for a while before it may start again; CI does not wait that out
( while sleep 2; do
    for job in $(squeue -h -t PD -o '%i %r' 2>/dev/null | awk '$2 == "BeginTime" {print $1}'); do
      scontrol update JobId="$job" StartTime=now 2>/dev/null || true
    done
  done ) & pids+=($!)
status=0
sbatch --wait --nodes=1 --ntasks-per-node=2 --output="$workdir/job-%j.out" \
  --export=ALL,CAD_RUN_ROOT="$workdir/run",OMP_NUM_THREADS=1 \
  configs/slurm/attribute.sbatch "$@" || status=$?
cat "$workdir"/job-*.out
exit "$status"
