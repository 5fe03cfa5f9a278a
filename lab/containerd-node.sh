#!/bin/sh
# Start, stop or restart one lab containerd node, tracked by its pid file.
#
# NODE_DIR is a node directory that lab/lab.sh wrote. It contains config.toml,
# and containerd serves NODE_DIR/containerd.sock, records its pid in
# NODE_DIR/containerd.pid and appends its output to NODE_DIR/containerd.log.
#
# `restart` is the lab's restart command for nexus-mirror. The new containerd
# runs in its own session with stdin from /dev/null and its output in the log
# file, so the SSH session that ran `restart` can end without taking it down.
# Like `systemctl restart containerd`, `restart` succeeds once the daemon
# serves its socket, even when the CRI plugin failed to load. It prints a
# warning in that case.
#
# lab/lab.sh sources this file for its functions, with CONTAINERD_NODE_SOURCED
# set so that sourcing runs nothing.

set -eu

# Seconds to wait for a process to exit after SIGTERM, then after SIGKILL.
STOP_TIMEOUT=${LAB_STOP_TIMEOUT:-20}
KILL_TIMEOUT=5
# Seconds to wait for a started containerd to serve its socket.
START_TIMEOUT=${LAB_START_TIMEOUT:-30}
# Log lines printed when a service fails to start.
FAILURE_LOG_LINES=40
# containerd sends registry requests for any host but loopback through this
# HTTP proxy. Nothing listens on the discard port, so such a request fails
# with "proxyconnect ... connection refused" before any DNS lookup. This keeps
# a lab node on loopback when a pull falls back from the mirror to the
# upstream, for example to registry-1.docker.io for docker.io images. Go's
# proxy selection never proxies loopback addresses or localhost.
NODE_BLOCKING_PROXY=http://127.0.0.1:9
NODE_NO_PROXY=localhost,127.0.0.1,::1

lab_error() {
  printf '%s: %s\n' "${0##*/}" "$*" >&2
}

now_seconds() {
  date +%s
}

# Succeed while process $1 exists and is not a zombie.
pid_alive() {
  [ -r "/proc/$1/stat" ] || return 1
  read -r alive_stat 2>/dev/null <"/proc/$1/stat" || return 1
  # The command name in field 2 may contain spaces and parentheses, so the
  # state field is read after the last ')'.
  alive_state=${alive_stat##*) }
  alive_state=${alive_state%% *}
  [ "$alive_state" != Z ] && [ "$alive_state" != X ]
}

# Succeed when the command line of process $1 contains $2. Each lab service
# gets a path under the lab directory on its command line, so a pid that the
# kernel reused for another program does not match.
pid_has_marker() {
  marker_cmdline=$(tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline") || return 1
  case $marker_cmdline in
    *"$2"*) return 0 ;;
  esac
  return 1
}

# Print the pid stored in file $1. Fails when the file is missing or does not
# contain a pid.
read_pid_file() {
  [ -f "$1" ] || return 1
  pid_line=
  read -r pid_line <"$1" || true
  case $pid_line in
    '' | *[!0-9]*) return 1 ;;
  esac
  echo "$pid_line"
}

# Print the pid from pid file $1 when that process runs and its command line
# contains $2.
running_pid() {
  running=$(read_pid_file "$1") || return 1
  if pid_alive "$running" && pid_has_marker "$running" "$2"; then
    echo "$running"
    return 0
  fi
  return 1
}

# Wait up to $2 seconds for process $1 to exit.
wait_pid_gone() {
  gone_deadline=$(($(now_seconds) + $2))
  while pid_alive "$1"; do
    if [ "$(now_seconds)" -ge "$gone_deadline" ]; then
      return 1
    fi
    sleep 0.1
  done
}

# spawn_detached PID_FILE LOG_FILE COMMAND...: run COMMAND in a new session,
# with stdin from /dev/null and its output appended to LOG_FILE, and write its
# pid to PID_FILE.
spawn_detached() {
  spawn_pid_file=$1
  spawn_log_file=$2
  shift 2
  # This shell runs without job control, so the background child is not a
  # process group leader. setsid then calls setsid(2) without forking, and $!
  # is the pid of COMMAND itself.
  nohup setsid "$@" </dev/null >>"$spawn_log_file" 2>&1 &
  echo "$!" >"$spawn_pid_file"
}

# stop_pid_file NAME PID_FILE MARKER: stop the process named by PID_FILE with
# SIGTERM, then SIGKILL after STOP_TIMEOUT seconds, and remove PID_FILE. A pid
# whose command line lacks MARKER belongs to another program and is left alone.
stop_pid_file() {
  stop_name=$1
  stop_file=$2
  stop_marker=$3
  if ! stop_pid=$(read_pid_file "$stop_file") || ! pid_alive "$stop_pid"; then
    rm -f "$stop_file"
    return 0
  fi
  if ! pid_has_marker "$stop_pid" "$stop_marker"; then
    lab_error "$stop_name: pid $stop_pid from $stop_file is not this lab's process" \
      "(its command line lacks $stop_marker); left it running"
    rm -f "$stop_file"
    return 0
  fi
  kill -TERM "$stop_pid" 2>/dev/null || true
  if ! wait_pid_gone "$stop_pid" "$STOP_TIMEOUT"; then
    lab_error "$stop_name: pid $stop_pid still running ${STOP_TIMEOUT}s after SIGTERM; sending SIGKILL"
    kill -KILL "$stop_pid" 2>/dev/null || true
    if ! wait_pid_gone "$stop_pid" "$KILL_TIMEOUT"; then
      lab_error "$stop_name: pid $stop_pid still running after SIGKILL"
      return 1
    fi
  fi
  rm -f "$stop_file"
}

# print_log_since NAME LOG_FILE SKIP_LINES: print the lines that LOG_FILE
# gained after its first SKIP_LINES lines, at most FAILURE_LOG_LINES of them,
# to stderr.
print_log_since() {
  printf -- '---- last lines of %s (%s) ----\n' "$2" "$1" >&2
  if [ -f "$2" ]; then
    tail -n "+$(($3 + 1))" "$2" | tail -n "$FAILURE_LOG_LINES" >&2
  else
    echo "(no log file)" >&2
  fi
  printf -- '---- end of %s ----\n' "$2" >&2
}

count_lines() {
  if [ -f "$1" ]; then
    wc -l <"$1"
  else
    echo 0
  fi
}

# Print the status of the CRI plugin (ok, error, skip) that `ctr plugins ls`
# lists on socket $1, or "unknown" when ctr cannot list plugins.
cri_plugin_status() {
  if ! cri_listing=$(ctr --address "$1" --connect-timeout 2s plugins ls 2>/dev/null); then
    echo unknown
    return 0
  fi
  cri_status=$(printf '%s\n' "$cri_listing" |
    awk '$1 == "io.containerd.grpc.v1" && $2 == "cri" { print $NF }')
  echo "${cri_status:-unknown}"
}

node_files() {
  NODE_CONFIG=$1/config.toml
  NODE_SOCKET=$1/containerd.sock
  NODE_PID_FILE=$1/containerd.pid
  NODE_LOG=$1/containerd.log
}

# Start containerd for node directory $1 and wait until it serves its socket.
node_start() {
  node_files "$1"
  if [ ! -f "$NODE_CONFIG" ]; then
    # Without a config file containerd would use /var/lib/containerd and
    # /run/containerd/containerd.sock.
    lab_error "missing $NODE_CONFIG; create the node with lab/lab.sh start"
    return 1
  fi
  if start_pid=$(running_pid "$NODE_PID_FILE" "$NODE_CONFIG"); then
    lab_error "containerd for $1 is already running with pid $start_pid"
    return 1
  fi

  start_log_lines=$(count_lines "$NODE_LOG")
  spawn_detached "$NODE_PID_FILE" "$NODE_LOG" env \
    HTTP_PROXY="$NODE_BLOCKING_PROXY" HTTPS_PROXY="$NODE_BLOCKING_PROXY" \
    http_proxy="$NODE_BLOCKING_PROXY" https_proxy="$NODE_BLOCKING_PROXY" \
    NO_PROXY="$NODE_NO_PROXY" no_proxy="$NODE_NO_PROXY" \
    containerd --config "$NODE_CONFIG"
  start_pid=$(read_pid_file "$NODE_PID_FILE")

  start_deadline=$(($(now_seconds) + START_TIMEOUT))
  until ctr --address "$NODE_SOCKET" --connect-timeout 1s version >/dev/null 2>&1; do
    if ! pid_alive "$start_pid"; then
      lab_error "containerd for $1 (pid $start_pid) exited during start"
      print_log_since containerd "$NODE_LOG" "$start_log_lines"
      rm -f "$NODE_PID_FILE"
      return 1
    fi
    if [ "$(now_seconds)" -ge "$start_deadline" ]; then
      lab_error "containerd for $1 (pid $start_pid) did not serve $NODE_SOCKET" \
        "within ${START_TIMEOUT}s"
      print_log_since containerd "$NODE_LOG" "$start_log_lines"
      stop_pid_file containerd "$NODE_PID_FILE" "$NODE_CONFIG" || true
      return 1
    fi
    sleep 0.2
  done
}

node_stop() {
  node_files "$1"
  stop_pid_file "containerd for $1" "$NODE_PID_FILE" "$NODE_CONFIG"
}

node_restart() {
  node_stop "$1"
  node_start "$1"
  restart_status=$(cri_plugin_status "$NODE_SOCKET")
  if [ "$restart_status" != ok ]; then
    lab_error "warning: containerd for $1 runs, but its CRI plugin status is" \
      "'$restart_status'; see $NODE_LOG"
  fi
}

node_usage() {
  echo "usage: ${0##*/} start|stop|restart NODE_DIR" >&2
}

node_main() {
  if [ "$#" -ne 2 ]; then
    node_usage
    return 2
  fi
  if [ ! -d "$2" ]; then
    lab_error "node directory not found: $2"
    return 1
  fi
  main_node_dir=$(cd "$2" && pwd)
  case $1 in
    start) node_start "$main_node_dir" ;;
    stop) node_stop "$main_node_dir" ;;
    restart) node_restart "$main_node_dir" ;;
    *)
      node_usage
      return 2
      ;;
  esac
}

if [ -z "${CONTAINERD_NODE_SOURCED:-}" ]; then
  node_main "$@"
fi
