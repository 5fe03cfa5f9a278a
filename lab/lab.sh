#!/bin/sh
# Loopback lab for nexus-mirror: an upstream registry, a pull-through mirror
# registry in place of Nexus, an sshd that accepts root logins by key, and
# containerd nodes. Every service listens on 127.0.0.1 only and keeps its
# configuration, data, log and pid file under the lab directory.
#
# Port layout for base port P (default 15000):
#   P        upstream registry (docker-registry)
#   P+1      mirror registry (docker-registry with proxy.remoteurl = upstream)
#   P+22     sshd
#   P+30+i   CRI streaming server of node i (node-a is i = 0)
#
# `start` writes DIR/lab.env, which lists the ports, paths and commands.
# containerd nodes reach loopback hosts only: containerd-node.sh points their
# HTTP(S)_PROXY at a closed loopback port, so a pull that falls back from the
# mirror to registry-1.docker.io fails at once instead of leaving the machine.

set -eu

LAB_SCRIPT_DIR=$(cd "$(dirname "$0")" && pwd)
NODE_SCRIPT=$LAB_SCRIPT_DIR/containerd-node.sh
# containerd-node.sh reads CONTAINERD_NODE_SOURCED and then defines its
# functions without running its command line.
# shellcheck disable=SC2034
CONTAINERD_NODE_SOURCED=1
# shellcheck source=/dev/null
. "$NODE_SCRIPT"

DEFAULT_BASE_PORT=15000
MIRROR_PORT_OFFSET=1
SSH_PORT_OFFSET=22
STREAM_PORT_OFFSET=30
MAX_NODES=26
# Seconds to wait for a registry or sshd to accept requests.
READY_TIMEOUT=${LAB_READY_TIMEOUT:-20}
# Linux limits unix socket paths to 107 bytes. The longest path the lab
# creates is DIR/node-x/containerd.sock.ttrpc.
MAX_SOCKET_PATH=107
NODE_LETTERS=abcdefghijklmnopqrstuvwxyz
# Services in start order, and in the reverse order for stop_all.
SERVICES="upstream mirror sshd"
SERVICES_STOP_ORDER="sshd mirror upstream"

usage() {
  cat >&2 <<'EOF'
usage: lab.sh start DIR [--nodes N] [--base-port P]
       lab.sh stop DIR
       lab.sh status DIR

start   starts the lab with state under DIR (created when missing) and writes
        DIR/lab.env. --nodes sets the number of containerd nodes (1 to 26,
        default 1). --base-port sets the first TCP port P (default 15000); the
        lab uses P, P+1, P+22 and P+30 up to P+30+N-1, all on 127.0.0.1.
        Each start rewrites the config files and keeps the SSH keys, the
        registry storage and the containerd roots.
stop    stops every process recorded by a pid file under DIR.
status  prints each service with its pid and whether it runs; exits 1 when
        any of them does not run.
EOF
}

die() {
  lab_error "$@"
  exit 1
}

# Print $1 as a single-quoted shell word.
shell_quote() {
  printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"
}

# Succeed when something accepts TCP connections on 127.0.0.1:$1.
port_in_use() {
  # curl exits with 7 when the connection is refused.
  port_status=0
  curl --silent --max-time 1 "telnet://127.0.0.1:$1" </dev/null >/dev/null 2>&1 || port_status=$?
  [ "$port_status" -ne 7 ]
}

# Print the name of node $1 (0 is node-a).
node_name() {
  echo "node-$(printf '%s' "$NODE_LETTERS" | cut -c "$(($1 + 1))")"
}

stream_port() {
  echo "$((BASE_PORT + STREAM_PORT_OFFSET + $1))"
}

require_tools() {
  missing_tools=
  for tool in docker-registry containerd ctr /usr/sbin/sshd ssh ssh-keygen curl setsid; do
    command -v "$tool" >/dev/null 2>&1 || missing_tools="$missing_tools $tool"
  done
  if [ -n "$missing_tools" ]; then
    die "missing programs:$missing_tools; install them with lab/install.sh (as root)"
  fi
}

# Validate directory $1 and store its absolute path in LAB_DIR.
set_lab_dir() {
  # Paths go unquoted into sshd_config, TOML and YAML files and into the
  # restart command that nexus-mirror runs with sh -c.
  case $1 in
    '' | *[!A-Za-z0-9._/+-]*)
      die "invalid lab directory '$1': use only letters, digits and . _ / + -"
      ;;
  esac
  mkdir -p "$1"
  LAB_DIR=$(cd "$1" && pwd)
}

service_pid_file() {
  echo "$LAB_DIR/$1.pid"
}

# The config file path is on each service's command line and identifies it.
service_marker() {
  case $1 in
    upstream) echo "$LAB_DIR/upstream/config.yml" ;;
    mirror) echo "$LAB_DIR/mirror/config.yml" ;;
    sshd) echo "$LAB_DIR/sshd_config" ;;
  esac
}

service_log() {
  echo "$LAB_DIR/$1.log"
}

# write_registry_config NAME PORT [REMOTE_URL]: a REMOTE_URL makes the
# registry a pull-through cache of that registry.
write_registry_config() {
  mkdir -p "$LAB_DIR/$1/storage"
  {
    cat <<EOF
# Written by lab/lab.sh, which rewrites it on every start.
version: 0.1
log:
  level: info
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: $LAB_DIR/$1/storage
  delete:
    enabled: true
  cache:
    blobdescriptor: inmemory
http:
  addr: 127.0.0.1:$2
  secret: nexus-mirror-lab-$1
  headers:
    X-Content-Type-Options: [nosniff]
EOF
    if [ -n "${3:-}" ]; then
      cat <<EOF
proxy:
  remoteurl: $3
EOF
    fi
  } >"$LAB_DIR/$1/config.yml"
}

write_ssh_files() {
  host_key=$LAB_DIR/ssh_host_ed25519_key
  client_key=$LAB_DIR/id_ed25519
  if [ ! -f "$host_key" ]; then
    ssh-keygen -q -t ed25519 -N '' -C "nexus-mirror-lab-host" -f "$host_key"
  fi
  if [ ! -f "$client_key" ]; then
    ssh-keygen -q -t ed25519 -N '' -C "nexus-mirror-lab-client" -f "$client_key"
  fi
  cp "$client_key.pub" "$LAB_DIR/authorized_keys"
  chmod 600 "$LAB_DIR/authorized_keys"

  read -r host_key_type host_key_data _ <"$host_key.pub"
  {
    echo "127.0.0.1 $host_key_type $host_key_data"
    echo "[127.0.0.1]:$SSH_PORT $host_key_type $host_key_data"
  } >"$LAB_DIR/known_hosts"

  cat >"$LAB_DIR/sshd_config" <<EOF
# Written by lab/lab.sh, which rewrites it on every start.
ListenAddress 127.0.0.1:$SSH_PORT
HostKey $host_key
PidFile none
AuthorizedKeysFile $LAB_DIR/authorized_keys
PermitRootLogin prohibit-password
# Tests that need a user other than root create one named nm-lab-* (and
# remove it afterwards). It logs in with the same key, which sshd reads as
# root because such a user cannot read files in the lab directory.
AllowUsers root nm-lab-*
AuthorizedKeysCommand /bin/cat $LAB_DIR/authorized_keys
AuthorizedKeysCommandUser root
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
# The lab directory may sit under a world-writable directory such as /tmp,
# which StrictModes would reject for the authorized_keys path.
StrictModes no
AllowTcpForwarding no
X11Forwarding no
PrintMotd no
LogLevel VERBOSE
Subsystem sftp internal-sftp
# Sessions get the same blocking proxy as the lab's containerd, so a client
# on the node (ctr, curl) that falls back to a registry on the internet fails
# on loopback instead of looking the name up.
SetEnv HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 http_proxy=http://127.0.0.1:9 https_proxy=http://127.0.0.1:9 NO_PROXY=localhost,127.0.0.1,::1 no_proxy=localhost,127.0.0.1,::1
EOF
}

# write_node_config NODE_DIR STREAM_PORT
write_node_config() {
  mkdir -p "$1/root" "$1/state" "$1/opt" "$1/cni/bin" "$1/cni/net.d"
  # Each path a default would place under /var/lib, /run, /opt or /etc is set
  # to the node directory. registry.config_path stays unset because
  # nexus-mirror's first apply sets it.
  cat >"$1/config.toml" <<EOF
# Lab containerd node, written by lab/lab.sh.
version = 2
root = "$1/root"
state = "$1/state"
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = "$1/containerd.sock"

[ttrpc]
  address = "$1/containerd.sock.ttrpc"

[debug]
  address = "$1/debug.sock"
  level = "info"

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    stream_server_address = "127.0.0.1"
    stream_server_port = "$2"

    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "$1/cni/bin"
      conf_dir = "$1/cni/net.d"

  [plugins."io.containerd.internal.v1.opt"]
    path = "$1/opt"
EOF
}

# wait_http_ready NAME URL: wait until a GET of URL returns a 2xx status,
# while service NAME runs.
wait_http_ready() {
  ready_pid=$(read_pid_file "$(service_pid_file "$1")")
  ready_deadline=$(($(now_seconds) + READY_TIMEOUT))
  until curl -fsS --max-time 2 -o /dev/null "$2" 2>/dev/null; do
    if ! pid_alive "$ready_pid"; then
      lab_error "$1 (pid $ready_pid) exited during start"
      return 1
    fi
    if [ "$(now_seconds)" -ge "$ready_deadline" ]; then
      lab_error "$1 (pid $ready_pid) did not return a 2xx status for $2 within ${READY_TIMEOUT}s"
      return 1
    fi
    sleep 0.1
  done
}

# Wait until a root login over SSH runs a command.
wait_ssh_ready() {
  ready_pid=$(read_pid_file "$(service_pid_file sshd)")
  ready_deadline=$(($(now_seconds) + READY_TIMEOUT))
  until ssh_output=$(ssh -F /dev/null -i "$LAB_DIR/id_ed25519" -p "$SSH_PORT" \
    -o BatchMode=yes -o IdentitiesOnly=yes -o StrictHostKeyChecking=yes \
    -o "UserKnownHostsFile=$LAB_DIR/known_hosts" -o GlobalKnownHostsFile=/dev/null \
    -o ConnectTimeout=5 root@127.0.0.1 true 2>&1 </dev/null); do
    if ! pid_alive "$ready_pid"; then
      lab_error "sshd (pid $ready_pid) exited during start"
      return 1
    fi
    if [ "$(now_seconds)" -ge "$ready_deadline" ]; then
      lab_error "root login over SSH to 127.0.0.1:$SSH_PORT failed for ${READY_TIMEOUT}s: $ssh_output"
      return 1
    fi
    sleep 0.2
  done
}

# start_service NAME COMMAND...: START_LOG_LINES keeps the length of the log
# before the start, so that fail_service prints only this start's lines.
start_service() {
  service_name=$1
  shift
  START_LOG_LINES=$(count_lines "$(service_log "$service_name")")
  spawn_detached "$(service_pid_file "$service_name")" "$(service_log "$service_name")" "$@"
}

fail_service() {
  print_log_since "$1" "$(service_log "$1")" "${START_LOG_LINES:-0}"
  exit 1
}

env_line() {
  printf '%s=%s\n' "$1" "$(shell_quote "$2")"
}

write_lab_env() {
  env_file=$LAB_DIR/lab.env
  {
    echo "# Written by lab/lab.sh start: settings of the lab in $LAB_DIR."
    echo "# Shell syntax: one KEY='value' a line, so it can be sourced."
    env_line LAB_DIR "$LAB_DIR"
    env_line LAB_SCRIPT "$LAB_SCRIPT_DIR/lab.sh"
    env_line NODE_SCRIPT "$NODE_SCRIPT"
    env_line BASE_PORT "$BASE_PORT"
    env_line UPSTREAM_PORT "$UPSTREAM_PORT"
    env_line UPSTREAM_URL "http://127.0.0.1:$UPSTREAM_PORT"
    env_line UPSTREAM_LOG "$(service_log upstream)"
    env_line MIRROR_PORT "$MIRROR_PORT"
    env_line MIRROR_URL "http://127.0.0.1:$MIRROR_PORT"
    env_line MIRROR_LOG "$(service_log mirror)"
    env_line SSH_HOST 127.0.0.1
    env_line SSH_PORT "$SSH_PORT"
    env_line SSH_USER root
    env_line SSH_KEY "$LAB_DIR/id_ed25519"
    env_line SSH_KNOWN_HOSTS "$LAB_DIR/known_hosts"
    env_line SSH_LOG "$(service_log sshd)"
    env_index=0
    env_node_names=
    while [ "$env_index" -lt "$NODE_COUNT" ]; do
      env_name=$(node_name "$env_index")
      env_node_names="${env_node_names:+$env_node_names }$env_name"
      env_prefix=NODE_$(printf '%s' "${env_name#node-}" | tr '[:lower:]' '[:upper:]')
      env_node_dir=$LAB_DIR/$env_name
      env_line "${env_prefix}_DIR" "$env_node_dir"
      env_line "${env_prefix}_SOCKET" "$env_node_dir/containerd.sock"
      env_line "${env_prefix}_CONFIG" "$env_node_dir/config.toml"
      env_line "${env_prefix}_CERTS_DIR" "$env_node_dir/certs.d"
      env_line "${env_prefix}_LOG" "$env_node_dir/containerd.log"
      env_line "${env_prefix}_PID_FILE" "$env_node_dir/containerd.pid"
      env_line "${env_prefix}_STREAM_PORT" "$(stream_port "$env_index")"
      env_line "${env_prefix}_RESTART_COMMAND" "sh $NODE_SCRIPT restart $env_node_dir"
      env_line "${env_prefix}_LOG_COMMAND" "tail -n 200 $env_node_dir/containerd.log"
      env_index=$((env_index + 1))
    done
    env_line NODE_COUNT "$NODE_COUNT"
    env_line NODES "$env_node_names"
  } >"$env_file.tmp"
  mv "$env_file.tmp" "$env_file"
}

# Stop every process recorded under LAB_DIR, the nodes first and then the
# services in reverse start order.
stop_all() {
  stop_all_status=0
  for stop_node_dir in "$LAB_DIR"/node-?; do
    [ -f "$stop_node_dir/config.toml" ] || continue
    node_stop "$stop_node_dir" || stop_all_status=1
  done
  # nginx of lab/tls.sh proxies to the mirror, so it stops before it.
  if [ -f "$LAB_DIR/tls/nginx.conf" ]; then
    stop_pid_file nginx "$LAB_DIR/tls/nginx.pid" "$LAB_DIR/tls/nginx.conf" || stop_all_status=1
  fi
  for stop_service in $SERVICES_STOP_ORDER; do
    stop_pid_file "$stop_service" "$(service_pid_file "$stop_service")" \
      "$(service_marker "$stop_service")" || stop_all_status=1
  done
  return "$stop_all_status"
}

# Succeed when $1 is a decimal number without leading zeros, which shell
# arithmetic would read as octal.
is_decimal() {
  case $1 in
    '' | *[!0-9]* | 0?*) return 1 ;;
  esac
  return 0
}

parse_start_args() {
  NODE_COUNT=1
  BASE_PORT=$DEFAULT_BASE_PORT
  while [ "$#" -gt 0 ]; do
    case $1 in
      --nodes)
        [ "$#" -ge 2 ] || die "--nodes needs a value"
        NODE_COUNT=$2
        shift 2
        ;;
      --base-port)
        [ "$#" -ge 2 ] || die "--base-port needs a value"
        BASE_PORT=$2
        shift 2
        ;;
      *)
        usage
        die "unknown argument: $1"
        ;;
    esac
  done

  if ! is_decimal "$NODE_COUNT" || [ "$NODE_COUNT" -lt 1 ] || [ "$NODE_COUNT" -gt "$MAX_NODES" ]; then
    die "invalid --nodes '$NODE_COUNT': expected a number from 1 to $MAX_NODES"
  fi
  max_base_port=$((65535 - STREAM_PORT_OFFSET - MAX_NODES))
  if ! is_decimal "$BASE_PORT" || [ "$BASE_PORT" -lt 1024 ] || [ "$BASE_PORT" -gt "$max_base_port" ]; then
    die "invalid --base-port '$BASE_PORT': expected a number from 1024 to $max_base_port"
  fi
  UPSTREAM_PORT=$BASE_PORT
  MIRROR_PORT=$((BASE_PORT + MIRROR_PORT_OFFSET))
  SSH_PORT=$((BASE_PORT + SSH_PORT_OFFSET))
}

check_start_preconditions() {
  for check_service in $SERVICES; do
    if check_pid=$(running_pid "$(service_pid_file "$check_service")" "$(service_marker "$check_service")"); then
      die "a lab already runs in $LAB_DIR ($check_service has pid $check_pid); run lab.sh stop $LAB_DIR first"
    fi
  done
  for check_node_dir in "$LAB_DIR"/node-?; do
    [ -f "$check_node_dir/config.toml" ] || continue
    if check_pid=$(running_pid "$check_node_dir/containerd.pid" "$check_node_dir/config.toml"); then
      die "a lab already runs in $LAB_DIR (containerd for $check_node_dir has pid $check_pid);" \
        "run lab.sh stop $LAB_DIR first"
    fi
  done

  check_socket="$LAB_DIR/$(node_name 0)/containerd.sock.ttrpc"
  if [ "${#check_socket}" -gt "$MAX_SOCKET_PATH" ]; then
    die "lab directory path too long: $check_socket has ${#check_socket} bytes," \
      "unix sockets allow $MAX_SOCKET_PATH; use a shorter DIR"
  fi

  check_ports="$UPSTREAM_PORT $MIRROR_PORT $SSH_PORT"
  check_index=0
  while [ "$check_index" -lt "$NODE_COUNT" ]; do
    check_ports="$check_ports $(stream_port "$check_index")"
    check_index=$((check_index + 1))
  done
  for check_port in $check_ports; do
    if port_in_use "$check_port"; then
      die "port 127.0.0.1:$check_port is already in use; choose another --base-port"
    fi
  done
}

start_registries() {
  write_registry_config upstream "$UPSTREAM_PORT"
  write_registry_config mirror "$MIRROR_PORT" "http://127.0.0.1:$UPSTREAM_PORT"

  start_service upstream docker-registry serve "$(service_marker upstream)"
  wait_http_ready upstream "http://127.0.0.1:$UPSTREAM_PORT/v2/" || fail_service upstream

  start_service mirror docker-registry serve "$(service_marker mirror)"
  wait_http_ready mirror "http://127.0.0.1:$MIRROR_PORT/v2/" || fail_service mirror
}

start_sshd() {
  write_ssh_files
  # sshd needs its privilege separation directory, which Debian's service
  # unit creates at boot.
  mkdir -p /run/sshd
  if ! sshd_test_output=$(/usr/sbin/sshd -t -f "$LAB_DIR/sshd_config" 2>&1); then
    die "invalid $LAB_DIR/sshd_config: $sshd_test_output"
  fi
  start_service sshd /usr/sbin/sshd -D -e -f "$LAB_DIR/sshd_config"
  wait_ssh_ready || fail_service sshd
}

start_nodes() {
  start_index=0
  while [ "$start_index" -lt "$NODE_COUNT" ]; do
    start_node_dir=$LAB_DIR/$(node_name "$start_index")
    write_node_config "$start_node_dir" "$(stream_port "$start_index")"
    node_log_lines=$(count_lines "$start_node_dir/containerd.log")
    node_start "$start_node_dir" || exit 1
    node_status=$(cri_plugin_status "$start_node_dir/containerd.sock")
    if [ "$node_status" != ok ]; then
      lab_error "CRI plugin of containerd for $start_node_dir has status '$node_status', expected ok"
      print_log_since containerd "$start_node_dir/containerd.log" "$node_log_lines"
      exit 1
    fi
    start_index=$((start_index + 1))
  done
}

print_start_summary() {
  summary_index=0
  summary_nodes=
  while [ "$summary_index" -lt "$NODE_COUNT" ]; do
    summary_nodes="$summary_nodes $(node_name "$summary_index")"
    summary_index=$((summary_index + 1))
  done
  cat <<EOF
lab started in $LAB_DIR
  upstream registry  http://127.0.0.1:$UPSTREAM_PORT
  mirror registry    http://127.0.0.1:$MIRROR_PORT (log $(service_log mirror))
  sshd               root@127.0.0.1 port $SSH_PORT, key $LAB_DIR/id_ed25519
  containerd nodes  $summary_nodes
settings: $LAB_DIR/lab.env
EOF
}

# EXIT trap of start: on a failure, stop what this start already started.
stop_after_failed_start() {
  if [ "$1" -ne 0 ]; then
    stop_all || true
  fi
  exit "$1"
}

cmd_start() {
  if [ "$#" -lt 1 ]; then
    usage
    exit 2
  fi
  start_dir=$1
  shift
  parse_start_args "$@"
  if [ "$(id -u)" -ne 0 ]; then
    die "start must run as root: sshd accepts root logins and containerd mounts snapshots"
  fi
  require_tools
  set_lab_dir "$start_dir"
  check_start_preconditions

  trap 'stop_after_failed_start "$?"' EXIT

  start_registries
  start_sshd
  start_nodes
  write_lab_env
  trap - EXIT
  print_start_summary
}

# Store the absolute path of existing lab directory $1 in LAB_DIR.
use_lab_dir() {
  [ -d "$1" ] || die "lab directory not found: $1"
  LAB_DIR=$(cd "$1" && pwd)
}

cmd_stop() {
  if [ "$#" -ne 1 ]; then
    usage
    exit 2
  fi
  use_lab_dir "$1"
  if stop_all; then
    echo "lab in $LAB_DIR stopped"
  else
    die "some processes of the lab in $LAB_DIR did not stop; see the messages above"
  fi
}

# Print the node directories of the last start, from the NODES line of
# lab.env. Without lab.env, print every node directory with a config.toml.
lab_node_dirs() {
  if [ -f "$LAB_DIR/lab.env" ]; then
    listed_nodes=$(sed -n "s/^NODES='\(.*\)'\$/\1/p" "$LAB_DIR/lab.env")
    for listed_node in $listed_nodes; do
      echo "$LAB_DIR/$listed_node"
    done
    return 0
  fi
  for listed_node_dir in "$LAB_DIR"/node-?; do
    [ -f "$listed_node_dir/config.toml" ] && echo "$listed_node_dir"
  done
  return 0
}

cmd_status() {
  if [ "$#" -ne 1 ]; then
    usage
    exit 2
  fi
  use_lab_dir "$1"
  status_result=0
  for status_service in $SERVICES; do
    if status_pid=$(running_pid "$(service_pid_file "$status_service")" "$(service_marker "$status_service")"); then
      echo "$status_service: running, pid $status_pid"
    else
      echo "$status_service: not running"
      status_result=1
    fi
  done
  for status_node_dir in $(lab_node_dirs); do
    if status_pid=$(running_pid "$status_node_dir/containerd.pid" "$status_node_dir/config.toml"); then
      status_cri=$(cri_plugin_status "$status_node_dir/containerd.sock")
      echo "${status_node_dir##*/}: running, pid $status_pid, CRI plugin $status_cri"
    else
      echo "${status_node_dir##*/}: not running"
      status_result=1
    fi
  done
  return "$status_result"
}

main() {
  if [ "$#" -lt 1 ]; then
    usage
    exit 2
  fi
  main_command=$1
  shift
  case $main_command in
    start) cmd_start "$@" ;;
    stop) cmd_stop "$@" ;;
    status) cmd_status "$@" ;;
    -h | --help | help) usage ;;
    *)
      usage
      exit 2
      ;;
  esac
}

main "$@"
