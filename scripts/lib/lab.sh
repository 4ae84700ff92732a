# shellcheck shell=bash
# A throwaway salt-master (and minions) on loopback, run as the current user,
# for scripts/demo and scripts/bench-bus. Source it; it does not change shell
# options of the caller, and its functions are safe under `set -euo pipefail`.
#
#   lab_up DIR NMINIONS     config + start master, wait for its event bus, start minions
#   lab_down DIR            stop everything listed in DIR/pids
#   lab_cleanup_on_exit DIR stop the lab (and lab_track_pid'd processes) on exit/Ctrl-C
#   lab_track_pid PID       a process of the caller to stop (TERM) on exit as well
#   lab_cleanup             do now what the exit trap would do
#
# lab_up is lab_write_config + lab_start_master + lab_wait_bus (+ lab_wait_req +
# lab_start_minions when NMINIONS > 0);
# the pieces can be called one by one (e.g. to connect a watcher before the minions
# start). After lab_write_config (or lab_load DIR) these are set:
#   LAB_DIR LAB_MASTER_CONF (config dir, for -c) LAB_MASTER_CONFIG (the file)
#   LAB_SOCK_DIR LAB_PUB_PORT LAB_RET_PORT LAB_NMINIONS
#   lab_minion_conf K -> config dir of demo-minion-K (for salt-call -c)
# They are also written to DIR/lab.env.
#
# Layout (short names: unix socket paths are limited to ~107 bytes):
#   DIR/master/master         master config      DIR/m/{pki,cache,s}   master state
#   DIR/m/master.log          master log file    DIR/logs/*.out        console output
#   DIR/minion-K/minion       minion config      DIR/minion-K/{pki,cache,s,minion.log}
#   DIR/pids                  "name pid" per started daemon (each is its own
#                             process group leader, started with setsid)
# When DIR is a long path, the configs name it through a short symlink
# /tmp/slab.XXXXXX instead, so the socket paths fit.
# LAB_WORKER_THREADS sets the master's worker_threads (default 2 here, Salt's 5).

LAB_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
LAB_VENV="${SALT_VENV:-$LAB_ROOT/.salt/venv}"
LAB_BIN="$LAB_VENV/bin"
# The Salt release the lab runs, for reports ("3008.5").
lab_salt_version() { "$LAB_BIN/salt-master" --version | awk '{print $2}'; }
LAB_MINION_PREFIX="${LAB_MINION_PREFIX:-demo-minion-}"
LAB_EXTRA_PIDS=()
LAB_TRAP_DIRS=()

_lab_log() { echo "lab: $*" >&2; }

# Two distinct free TCP ports on 127.0.0.1 (bound together, so they differ).
_lab_free_ports() {
    python3 - <<'EOF'
import socket
ss = [socket.socket() for _ in range(2)]
for s in ss:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in ss))
EOF
}

# Absolute path of DIR (which may not exist yet).
_lab_abs() {
    case "$1" in
        /*) printf '%s\n' "$1" ;;
        *) printf '%s/%s\n' "$PWD" "$1" ;;
    esac
}

lab_minion_conf() { printf '%s/minion-%s\n' "$LAB_DIR" "$1"; }

# Reads DIR/lab.env written by lab_write_config.
lab_load() {
    local dir
    dir="$(_lab_abs "$1")"
    # shellcheck disable=SC1091
    source "$dir/lab.env"
}

# lab_write_config DIR NMINIONS: fresh configs for a master and N minions.
lab_write_config() {
    local dir n user ports sock k p
    dir="$(_lab_abs "$1")"
    n="${2:-0}"
    user="$(id -un)"
    mkdir -p "$dir/master" "$dir/m/pki" "$dir/m/cache" "$dir/srv" "$dir/logs"
    ports="$(_lab_free_ports)"
    LAB_DIR="$dir"
    LAB_PUB_PORT="${ports% *}"
    LAB_RET_PORT="${ports#* }"
    LAB_NMINIONS="$n"
    LAB_MASTER_CONF="$dir/master"
    LAB_MASTER_CONFIG="$dir/master/master"
    # Paths inside the configs go through $p: DIR itself, or, when DIR is so
    # long that the sockets would not fit in a unix socket path (~107 bytes),
    # a short symlink to it under /tmp (removed again by lab_down).
    p="$dir"
    # (longest: <p>/minion-K/s/minion_event_<10 hex>_pub.ipc, <p> + 45 bytes)
    if [ $((${#dir} + 45)) -gt 104 ]; then
        p="$(mktemp -u /tmp/slab.XXXXXX)"
        ln -s "$dir" "$p"
        echo "$p" >"$dir/tmp-link"
    fi
    # Salt moves sock_dir to <cachedir>/.salt-unix when it is more than 10
    # characters longer than cachedir; "$p/m/s" is shorter than "$p/m/cache".
    sock="$p/m/s"
    mkdir -p "$sock"
    LAB_SOCK_DIR="$sock"
    cat >"$LAB_MASTER_CONFIG" <<EOF
# Throwaway lab master written by scripts/lib/lab.sh
root_dir: $p/m
pki_dir: $p/m/pki
cachedir: $p/m/cache
sock_dir: $sock
pidfile: $p/m/master.pid
log_file: $p/m/master.log
log_level: warning
log_level_logfile: info
user: $user
interface: 127.0.0.1
publish_port: $LAB_PUB_PORT
ret_port: $LAB_RET_PORT
file_roots:
  base:
    - $p/srv
auto_accept: False
# Fewer request workers than the default 5: the lab master starts seconds
# sooner on a small machine, and a handful of minions need no more.
worker_threads: ${LAB_WORKER_THREADS:-2}
EOF
    for ((k = 1; k <= n; k++)); do
        local md="$p/minion-$k"
        mkdir -p "$dir/minion-$k/pki" "$dir/minion-$k/cache" "$dir/minion-$k/s"
        cat >"$dir/minion-$k/minion" <<EOF
# Throwaway lab minion written by scripts/lib/lab.sh
id: $LAB_MINION_PREFIX$k
root_dir: $md
pki_dir: $md/pki
cachedir: $md/cache
sock_dir: $md/s
pidfile: $md/minion.pid
log_file: $md/minion.log
log_level: warning
log_level_logfile: info
user: $user
master: 127.0.0.1
master_port: $LAB_RET_PORT
publish_port: $LAB_PUB_PORT
acceptance_wait_time: 1
file_roots:
  base:
    - $p/srv
EOF
    done
    cat >"$dir/lab.env" <<EOF
LAB_DIR='$dir'
LAB_MASTER_CONF='$LAB_MASTER_CONF'
LAB_MASTER_CONFIG='$LAB_MASTER_CONFIG'
LAB_SOCK_DIR='$LAB_SOCK_DIR'
LAB_PUB_PORT='$LAB_PUB_PORT'
LAB_RET_PORT='$LAB_RET_PORT'
LAB_NMINIONS='$LAB_NMINIONS'
EOF
    : >>"$dir/pids"
}

# _lab_spawn DIR NAME CMD...: starts CMD in its own session (setsid), output to
# DIR/logs/NAME.out, stdin from /dev/null, and records "NAME PID" in DIR/pids.
# The PID is written by the child itself, so it is right whether or not setsid
# had to fork (it does when the caller has job control on). Started from a
# subshell, so the daemon is not a child of the caller: a bare `wait` in the
# calling script does not wait for it.
_lab_spawn() {
    local dir="$1" name="$2"
    shift 2
    local pidf="$dir/logs/$name.pid" i
    rm -f "$pidf"
    (
        # shellcheck disable=SC2016 # $$ and $@ are for the inner sh
        setsid sh -c 'echo $$ >"$0.tmp" && mv "$0.tmp" "$0" && exec "$@"' "$pidf" "$@" \
            </dev/null >"$dir/logs/$name.out" 2>&1 &
    )
    for ((i = 0; i < 500; i++)); do
        [ -s "$pidf" ] && break
        sleep 0.01
    done
    if [ ! -s "$pidf" ]; then
        _lab_log "could not start $name"
        return 1
    fi
    echo "$name $(cat "$pidf")" >>"$dir/pids"
    rm -f "$pidf"
}

# lab_start_master DIR
lab_start_master() {
    local dir
    dir="$(_lab_abs "$1")"
    _lab_spawn "$dir" master "$LAB_BIN/salt-master" -c "$dir/master" --log-level warning
}

# lab_start_minions DIR: starts every minion configured by lab_write_config.
lab_start_minions() {
    local dir k n
    dir="$(_lab_abs "$1")"
    n="$(sed -n "s/^LAB_NMINIONS='\(.*\)'/\1/p" "$dir/lab.env")"
    for ((k = 1; k <= n; k++)); do
        _lab_spawn "$dir" "minion-$k" "$LAB_BIN/salt-minion" -c "$dir/minion-$k" --log-level warning
    done
}

# _lab_pid DIR NAME: the recorded PID of NAME.
_lab_pid() { awk -v n="$2" '$1 == n { p = $2 } END { print p }' "$1/pids"; }

# lab_wait_bus DIR [TIMEOUT]: waits until master_event_pub.ipc accepts a
# connection (a stale socket file from an earlier master refuses), or fails
# early with the master's output if the master died.
lab_wait_bus() {
    local dir timeout sock mpid
    dir="$(_lab_abs "$1")"
    timeout="${2:-60}"
    sock="$(sed -n "s/^LAB_SOCK_DIR='\(.*\)'/\1/p" "$dir/lab.env")"
    mpid="$(_lab_pid "$dir" master)"
    if ! python3 - "$sock/master_event_pub.ipc" "$timeout" "$mpid" <<'EOF'; then
import os, socket, sys, time
path, timeout, pid = sys.argv[1], float(sys.argv[2]), int(sys.argv[3] or 0)
end = time.time() + timeout
while True:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        s.close()
        sys.exit(0)
    except OSError:
        s.close()
    if pid and not os.path.exists(f"/proc/{pid}"):
        print(f"lab: the master (pid {pid}) exited", file=sys.stderr)
        sys.exit(1)
    if time.time() > end:
        print(f"lab: {path} did not accept a connection within {timeout:g} s", file=sys.stderr)
        sys.exit(1)
    time.sleep(0.05)
EOF
        _lab_log "master output ($dir/logs/master.out, $dir/m/master.log):"
        tail -n 20 "$dir/logs/master.out" "$dir/m/master.log" >&2 2>/dev/null || true
        return 1
    fi
}

# lab_wait_req DIR [TIMEOUT]: waits until the master's ReqServer answers a
# clear `cmd: ping` on ret_port (about 2 s after the event bus is up). Minions
# started before that lose several seconds in their first auth attempt.
lab_wait_req() {
    local dir timeout port mpid
    dir="$(_lab_abs "$1")"
    timeout="${2:-60}"
    port="$(sed -n "s/^LAB_RET_PORT='\(.*\)'/\1/p" "$dir/lab.env")"
    mpid="$(_lab_pid "$dir" master)"
    "$LAB_BIN/python" - "$port" "$timeout" "$mpid" <<'EOF'
import os, sys, time
import msgpack, zmq
port, timeout, pid = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3] or 0)
end = time.time() + timeout
ctx = zmq.Context()
while True:
    s = ctx.socket(zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"tcp://127.0.0.1:{port}")
    s.send(msgpack.packb({"enc": "clear", "load": {"cmd": "ping"}}))
    ok = s.poll(500)
    s.close()
    if ok:
        sys.exit(0)
    if pid and not os.path.exists(f"/proc/{pid}"):
        print(f"lab: the master (pid {pid}) exited", file=sys.stderr)
        sys.exit(1)
    if time.time() > end:
        print(f"lab: the master's ReqServer (port {port}) did not answer within {timeout:g} s",
              file=sys.stderr)
        sys.exit(1)
EOF
}

# lab_up DIR NMINIONS: returns once the master's event bus (and, with minions,
# its ReqServer) is up and the minions are started. They are not accepted yet
# (auto_accept is off).
lab_up() {
    local dir
    dir="$(_lab_abs "$1")"
    lab_write_config "$dir" "${2:-0}" || return 1
    lab_start_master "$dir" || return 1
    lab_wait_bus "$dir" || return 1
    if [ "${2:-0}" -gt 0 ]; then
        lab_wait_req "$dir" || return 1
        lab_start_minions "$dir" || return 1
    fi
}

# True when PID is alive and was started for the lab in DIR (its command line
# names DIR), so a PID recycled since an earlier run is never signalled.
_lab_owned() {
    local pid="$1" dir="$2" cmd
    cmd="$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline")" || return 1
    [[ "$cmd" == *"$dir/"* ]]
}

# True when process group PGID still has members.
_lab_group_alive() { pgrep -g "$1" >/dev/null 2>&1; }

# lab_down DIR: TERM each recorded daemon, wait up to 10 s for its whole
# process group to go (Salt's helpers, e.g. a grains `man` call, included),
# then KILL what is left of the group. A recorded PID is only acted on when
# that process (the group leader) is alive and its command line names DIR.
lab_down() {
    local dir name pid left i pids=()
    dir="$(_lab_abs "$1")"
    [ -f "$dir/pids" ] || return 0
    while read -r name pid; do
        [ -n "$pid" ] || continue
        if _lab_owned "$pid" "$dir"; then
            pids+=("$pid")
            kill -TERM "$pid" 2>/dev/null || true
        fi
    done <"$dir/pids"
    if [ "${#pids[@]}" -gt 0 ]; then
        for ((i = 0; i < 100; i++)); do
            left=""
            for pid in "${pids[@]}"; do
                _lab_group_alive "$pid" && left+=" $pid"
            done
            [ -z "$left" ] && break
            sleep 0.1
        done
        for pid in $left; do
            _lab_log "process group $pid still running after 10 s; killing it"
            kill -KILL -- "-$pid" 2>/dev/null || true
        done
    fi
    : >"$dir/pids"
    if [ -f "$dir/tmp-link" ]; then
        rm -f "$(cat "$dir/tmp-link")" "$dir/tmp-link"
    fi
}

# lab_track_pid PID: stop this process (TERM, then KILL after 5 s) on exit.
lab_track_pid() { LAB_EXTRA_PIDS+=("$1"); }

# lab_record DIR NAME PID: lists a helper process (not a group leader) in
# DIR/pids too, so that lab_down of a later run stops it if this script was
# killed without its trap running.
lab_record() { echo "$2 $3" >>"$(_lab_abs "$1")/pids"; }

# lab_untrack_pid PID: forget it (e.g. after `wait`ing for it).
lab_untrack_pid() {
    local p keep=()
    for p in "${LAB_EXTRA_PIDS[@]}"; do
        [ "$p" = "$1" ] || keep+=("$p")
    done
    LAB_EXTRA_PIDS=("${keep[@]}")
}

_lab_stop_extra() {
    local pid i
    for pid in "${LAB_EXTRA_PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${LAB_EXTRA_PIDS[@]}"; do
        for ((i = 0; i < 50; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    LAB_EXTRA_PIDS=()
}

# lab_cleanup: stop the lab_track_pid'd processes, then the labs registered
# with lab_cleanup_on_exit. Safe to call more than once.
lab_cleanup() {
    local d
    _lab_stop_extra
    for d in "${LAB_TRAP_DIRS[@]}"; do
        lab_down "$d"
    done
}

_lab_on_exit() {
    local rc=$?
    # A second Ctrl-C must not interrupt the clean-up.
    trap - EXIT
    trap '' INT TERM
    set +e
    lab_cleanup
    exit "$rc"
}

# lab_cleanup_on_exit DIR: on exit, Ctrl-C or TERM, stop tracked processes and
# the lab in DIR. Call it before lab_up so a failure half-way cleans up too.
lab_cleanup_on_exit() {
    LAB_TRAP_DIRS+=("$(_lab_abs "$1")")
    trap _lab_on_exit EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}
