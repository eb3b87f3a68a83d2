#!/usr/bin/env bash
# Stand up a one-node SLURM on this machine for the tests: Debian's slurmctld, slurmd and munge, installed if
# missing, started in the background (no systemd needed) with their PIDs kept in $STATE/pids for down.sh.
# Idempotent: if our daemons are already up it says so and exits 0. Needs root. Prints the stand-up time.
# Usage: tests/slurm/up.sh   (state in $DERMCOMPRESS_SLURM_DIR, default /var/tmp/dermcompress-slurm)
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
STATE=${DERMCOMPRESS_SLURM_DIR:-/var/tmp/dermcompress-slurm}
# The job step clears SLURM_* variables (SLURM_CONF too) before its srun, so clients must find the
# configuration at the compiled-in path.
ETC_CONF=/etc/slurm/slurm.conf
start=$(date +%s%N)

die() { echo "slurm up: $*" >&2; exit 1; }
alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

[ "$(id -u)" = 0 ] || die "needs root (to install packages and run slurmd)"

if [ -f "$STATE/pids" ]; then
    up=1
    while read -r name pid; do alive "$pid" || up=0; done < "$STATE/pids"
    if [ "$up" = 1 ] && sinfo -h >/dev/null 2>&1; then
        echo "slurm up: already running (PIDs in $STATE/pids)"
        exit 0
    fi
    "$HERE/down.sh"  # half up: start over
fi

if [ -e "$ETC_CONF" ] && [ "$(readlink "$ETC_CONF")" != "$STATE/slurm.conf" ]; then
    die "$ETC_CONF exists and is not ours: this machine has its own SLURM; not touching it"
fi

missing=()
for cmd in slurmctld slurmd sbatch munged; do command -v "$cmd" >/dev/null || missing+=("$cmd"); done
if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
    echo "slurm up: installing slurmctld slurmd slurm-client munge (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    packages=(slurmctld slurmd slurm-client munge)
    # A fresh machine has no package lists yet; update only when the first attempt fails.
    apt-get install -y -q --no-install-recommends "${packages[@]}" >/dev/null \
        || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${packages[@]}" >/dev/null; } \
        || die "apt-get could not install ${packages[*]}"
fi

rm -rf "$STATE"
mkdir -p "$STATE/ctld" "$STATE/spool"
host=$(hostname -s)
# What slurmd detects here, minus 1 GiB for the system: "CPUs=2 ... RealMemory=24105".
read -r cpus mem < <(slurmd -C | awk '{for (i = 1; i <= NF; i++) {split($i, kv, "="); v[kv[1]] = kv[2]}}
    /^NodeName/ {print v["CPUs"], v["RealMemory"] - 1024; exit}')
for name in slurm.conf gres.conf; do
    sed -e "s|@HOST@|$host|g" -e "s|@STATE@|$STATE|g" -e "s|@CPUS@|$cpus|g" -e "s|@MEM@|$mem|g" \
        "$HERE/$name.in" > "$STATE/$name"
done
mkdir -p "$(dirname "$ETC_CONF")"
ln -sfn "$STATE/slurm.conf" "$ETC_CONF"

# munge: Debian's package made the key; the daemon runs as its own user with a socket under /run/munge.
[ -s /etc/munge/munge.key ] || die "/etc/munge/munge.key is missing (reinstall munge)"
install -d -o munge -g munge -m 0755 /run/munge
setpriv --reuid=munge --regid=munge --init-groups munged --foreground > "$STATE/munged.out" 2>&1 &
echo "munged $!" > "$STATE/pids"
for _ in $(seq 50); do munge -n </dev/null >/dev/null 2>&1 && break; sleep 0.1; done
munge -n </dev/null >/dev/null 2>&1 || die "munged did not start: $(cat "$STATE/munged.out")"

# -D: stay in the foreground (we background them); -c: forget any previous state; absolute -f paths.
slurmctld -D -c -f "$STATE/slurm.conf" > "$STATE/slurmctld.out" 2>&1 &
echo "slurmctld $!" >> "$STATE/pids"
slurmd -D -f "$STATE/slurm.conf" > "$STATE/slurmd.out" 2>&1 &
echo "slurmd $!" >> "$STATE/pids"

for _ in $(seq 300); do
    state=$(sinfo -h -n "$host" -o %T 2>/dev/null | head -1 || true)
    [ "$state" = idle ] && break
    sleep 0.2
done
if [ "$state" != idle ]; then
    tail -n 20 "$STATE"/*.log "$STATE"/*.out >&2 || true
    die "node $host is '${state:-unreachable}', not idle, after 60 s"
fi
ms=$((($(date +%s%N) - start) / 1000000))
printf 'slurm up: node %s idle (%s CPUs, %s MB, gpu:h100:2 fake) after %d.%03d s\n' \
    "$host" "$cpus" "$mem" $((ms / 1000)) $((ms % 1000))
