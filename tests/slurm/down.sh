#!/usr/bin/env bash
# Stop what tests/slurm/up.sh started, by the PIDs it kept, and remove its state and /etc/slurm link.
set -uo pipefail
STATE=${DERMCOMPRESS_SLURM_DIR:-/var/tmp/dermcompress-slurm}
ETC_CONF=/etc/slurm/slurm.conf

if [ -f "$STATE/pids" ]; then
    scancel --full --signal=KILL --user=root >/dev/null 2>&1 || true  # our test jobs, if any are left
    # Reverse order: slurmd, slurmctld, then munged, which they authenticate through.
    tac "$STATE/pids" | while read -r name pid; do
        kill -TERM "$pid" 2>/dev/null || continue
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null && echo "slurm down: $name ($pid) needed SIGKILL" >&2
    done
fi
[ "$(readlink "$ETC_CONF" 2>/dev/null)" = "$STATE/slurm.conf" ] && rm -f "$ETC_CONF"
rm -rf "$STATE"
echo "slurm down: stopped"
