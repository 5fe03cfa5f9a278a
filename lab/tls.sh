#!/bin/sh
# TLS and authentication in front of the lab's mirror registry: nginx as the
# reverse proxy that many Nexus installations sit behind, with a private CA.
#
# `start` needs a lab that lab/lab.sh started in DIR. It writes a CA, a server
# certificate for 127.0.0.1 and a client certificate (openssl), a password
# file for one user and an nginx configuration under DIR/tls, then starts
# nginx on 127.0.0.1 only. Every server block proxies to the mirror registry.
#
# Port layout for the lab's base port P:
#   P+10  TLS only
#   P+11  TLS and HTTP basic authentication
#   P+12  TLS and a required client certificate signed by the lab CA
#   P+13  TLS and a path prefix: /v2/docker-hub/... is the mirror's /v2/...,
#         the shape of Nexus path-based routing (reached with override_path)
#
# `start` writes DIR/tls/tls.env with the ports and file paths. The access log
# DIR/tls/access.log has one line per request: server port, status, user
# name (never the password), client certificate verdict and request line.

set -eu

TLS_SCRIPT_DIR=$(cd "$(dirname "$0")" && pwd)
# shellcheck disable=SC2034
CONTAINERD_NODE_SOURCED=1
# shellcheck source=/dev/null
. "$TLS_SCRIPT_DIR/containerd-node.sh"

TLS_PORT_OFFSET=10
PATH_REPOSITORY=docker-hub
CERT_DAYS=30
# Seconds to wait for nginx to accept connections.
READY_TIMEOUT=${LAB_READY_TIMEOUT:-20}

usage() {
  cat >&2 <<'EOF'
usage: tls.sh start DIR --user NAME < PASSWORD
       tls.sh password DIR --user NAME < PASSWORD
       tls.sh stop DIR

start     starts nginx with TLS in front of the mirror registry of the lab in
          DIR (see lab/lab.sh), on ports P+10 to P+13. The password for the
          basic-authentication server block is read from the first line of
          standard input, so it never appears on a command line.
password  replaces the user and password; nginx reads the file on every
          request, so the change applies at once.
stop      stops nginx.
EOF
}

die() {
  lab_error "$@"
  exit 1
}

# Read DIR/lab.env into LAB_DIR, BASE_PORT and MIRROR_PORT.
load_lab_env() {
  [ -f "$1/lab.env" ] || die "no lab.env in $1: start the lab with lab/lab.sh start $1 first"
  LAB_DIR=$(cd "$1" && pwd)
  BASE_PORT=$(sed -n "s/^BASE_PORT='\([0-9]*\)'\$/\1/p" "$LAB_DIR/lab.env")
  MIRROR_PORT=$(sed -n "s/^MIRROR_PORT='\([0-9]*\)'\$/\1/p" "$LAB_DIR/lab.env")
  if [ -z "$BASE_PORT" ] || [ -z "$MIRROR_PORT" ]; then
    die "$LAB_DIR/lab.env has no BASE_PORT or MIRROR_PORT"
  fi
  TLS_DIR=$LAB_DIR/tls
  TLS_PORT=$((BASE_PORT + TLS_PORT_OFFSET))
  AUTH_PORT=$((TLS_PORT + 1))
  CLIENT_PORT=$((TLS_PORT + 2))
  PATH_PORT=$((TLS_PORT + 3))
}

# parse_user ARGS...: set USER_NAME from --user NAME.
parse_user() {
  USER_NAME=
  while [ "$#" -gt 0 ]; do
    case $1 in
      --user)
        [ "$#" -ge 2 ] || die "--user needs a value"
        USER_NAME=$2
        shift 2
        ;;
      *)
        usage
        die "unknown argument: $1"
        ;;
    esac
  done
  case $USER_NAME in
    '' | *[!A-Za-z0-9._-]*) die "invalid --user '$USER_NAME': use letters, digits, '.', '_' and '-'" ;;
  esac
}

# Write the password file from the first line of stdin. openssl reads the
# password from stdin too, so it never appears in a process list.
write_password_file() {
  IFS= read -r password_line || [ -n "$password_line" ] || die "no password on standard input"
  [ -n "$password_line" ] || die "the password on standard input is empty"
  password_hash=$(printf '%s\n' "$password_line" | openssl passwd -apr1 -stdin) ||
    die "openssl passwd failed"
  password_line=
  printf '%s:%s\n' "$USER_NAME" "$password_hash" >"$TLS_DIR/htpasswd.tmp"
  chmod 644 "$TLS_DIR/htpasswd.tmp"
  mv -f "$TLS_DIR/htpasswd.tmp" "$TLS_DIR/htpasswd"
}

# issue NAME SUBJECT EXTENSIONS: a key and a certificate signed by the lab CA.
issue() {
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$TLS_DIR/$1.key" -out "$TLS_DIR/$1.csr" -subj "$2" 2>/dev/null
  printf '%s\n' "$3" >"$TLS_DIR/$1.ext"
  openssl x509 -req -in "$TLS_DIR/$1.csr" -CA "$TLS_DIR/ca.pem" -CAkey "$TLS_DIR/ca.key" \
    -CAcreateserial -days "$CERT_DAYS" -sha256 -extfile "$TLS_DIR/$1.ext" \
    -out "$TLS_DIR/$1.pem" 2>/dev/null
  rm -f "$TLS_DIR/$1.csr" "$TLS_DIR/$1.ext"
}

# A CA that the nodes trust only where a stack config lists it, a second CA
# that signs nothing the lab serves, a server certificate and a client one.
write_certificates() {
  if [ -f "$TLS_DIR/client.pem" ]; then
    return 0
  fi
  for ca in ca other-ca; do
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days "$CERT_DAYS" \
      -keyout "$TLS_DIR/$ca.key" -out "$TLS_DIR/$ca.pem" -subj "/CN=nexus-mirror lab $ca" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
      2>/dev/null
  done
  issue server "/CN=127.0.0.1" "subjectAltName=IP:127.0.0.1,DNS:localhost
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth"
  issue client "/CN=nexus-mirror-lab-client" "keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"
  chmod 600 "$TLS_DIR"/*.key
}

# server_block PORT EXTRA LOCATIONS: one TLS server block.
server_block() {
  cat <<EOF
  server {
    listen 127.0.0.1:$1 ssl;
$2
$3
  }
EOF
}

proxy_location() {
  cat <<EOF
    location /v2/ {
      proxy_pass http://127.0.0.1:$MIRROR_PORT;
      # The credentials stop here: the registry behind needs none.
      proxy_set_header Authorization "";
    }
    location / { return 404; }
EOF
}

write_nginx_config() {
  mkdir -p "$TLS_DIR/temp"
  {
    cat <<EOF
# Written by lab/tls.sh, which rewrites it on every start.
daemon off;
# One process that runs as the user who started it, so that it reads the
# password file and writes its logs under the lab directory.
master_process off;
pid $TLS_DIR/nginx.own.pid;
error_log $TLS_DIR/error.log info;
events { worker_connections 64; }
http {
  log_format lab '\$server_port \$status \$remote_user "\$ssl_client_verify" "\$request"';
  access_log $TLS_DIR/access.log lab;
  client_body_temp_path $TLS_DIR/temp/body;
  proxy_temp_path $TLS_DIR/temp/proxy;
  fastcgi_temp_path $TLS_DIR/temp/fastcgi;
  uwsgi_temp_path $TLS_DIR/temp/uwsgi;
  scgi_temp_path $TLS_DIR/temp/scgi;
  client_max_body_size 0;
  ssl_certificate $TLS_DIR/server.pem;
  ssl_certificate_key $TLS_DIR/server.key;
EOF
    server_block "$TLS_PORT" "" "$(proxy_location)"
    server_block "$AUTH_PORT" "    auth_basic \"nexus-mirror lab\";
    auth_basic_user_file $TLS_DIR/htpasswd;" "$(proxy_location)"
    server_block "$CLIENT_PORT" "    ssl_client_certificate $TLS_DIR/ca.pem;
    ssl_verify_client on;" "$(proxy_location)"
    server_block "$PATH_PORT" "" "    location /v2/$PATH_REPOSITORY/ {
      proxy_pass http://127.0.0.1:$MIRROR_PORT/v2/;
    }
    location / { return 404; }"
    echo "}"
  } >"$TLS_DIR/nginx.conf"
}

write_tls_env() {
  {
    echo "# Written by lab/tls.sh start: nginx in front of the mirror of $LAB_DIR."
    printf "TLS_PORT='%s'\nAUTH_PORT='%s'\n" "$TLS_PORT" "$AUTH_PORT"
    printf "CLIENT_PORT='%s'\nPATH_PORT='%s'\n" "$CLIENT_PORT" "$PATH_PORT"
    printf "PATH_REPOSITORY='%s'\n" "$PATH_REPOSITORY"
    printf "CA_PEM='%s'\n" "$TLS_DIR/ca.pem"
    printf "OTHER_CA_PEM='%s'\n" "$TLS_DIR/other-ca.pem"
    printf "CLIENT_CERT='%s'\n" "$TLS_DIR/client.pem"
    printf "CLIENT_KEY='%s'\n" "$TLS_DIR/client.key"
    printf "ACCESS_LOG='%s'\n" "$TLS_DIR/access.log"
    printf "ERROR_LOG='%s'\n" "$TLS_DIR/error.log"
  } >"$TLS_DIR/tls.env"
}

wait_nginx_ready() {
  ready_pid=$(read_pid_file "$TLS_DIR/nginx.pid")
  ready_deadline=$(($(now_seconds) + READY_TIMEOUT))
  until curl -sS --max-time 2 -o /dev/null --cacert "$TLS_DIR/ca.pem" \
    "https://127.0.0.1:$TLS_PORT/v2/" 2>/dev/null; do
    if ! pid_alive "$ready_pid"; then
      lab_error "nginx (pid $ready_pid) exited during start"
      return 1
    fi
    if [ "$(now_seconds)" -ge "$ready_deadline" ]; then
      lab_error "nginx (pid $ready_pid) did not answer on 127.0.0.1:$TLS_PORT within ${READY_TIMEOUT}s"
      return 1
    fi
    sleep 0.1
  done
}

cmd_start() {
  [ "$#" -ge 1 ] || {
    usage
    exit 2
  }
  load_lab_env "$1"
  shift
  parse_user "$@"

  command -v nginx >/dev/null 2>&1 || die "nginx is not installed; install it with lab/install.sh (as root)"
  command -v openssl >/dev/null 2>&1 || die "openssl is not installed; install it with lab/install.sh (as root)"
  if running=$(running_pid "$TLS_DIR/nginx.pid" "$TLS_DIR/nginx.conf"); then
    die "nginx already runs for $LAB_DIR (pid $running); run tls.sh stop $LAB_DIR first"
  fi
  for port in "$TLS_PORT" "$AUTH_PORT" "$CLIENT_PORT" "$PATH_PORT"; do
    port_status=0
    curl --silent --max-time 1 "telnet://127.0.0.1:$port" </dev/null >/dev/null 2>&1 || port_status=$?
    [ "$port_status" -eq 7 ] || die "port 127.0.0.1:$port is already in use"
  done

  mkdir -p "$TLS_DIR"
  write_certificates
  write_password_file
  write_nginx_config
  if ! test_output=$(nginx -t -q -c "$TLS_DIR/nginx.conf" -p "$TLS_DIR/" 2>&1); then
    die "invalid $TLS_DIR/nginx.conf: $test_output"
  fi

  log_lines=$(count_lines "$TLS_DIR/error.log")
  spawn_detached "$TLS_DIR/nginx.pid" "$TLS_DIR/nginx.out" nginx -c "$TLS_DIR/nginx.conf" -p "$TLS_DIR/"
  if ! wait_nginx_ready; then
    print_log_since nginx "$TLS_DIR/error.log" "$log_lines"
    stop_pid_file nginx "$TLS_DIR/nginx.pid" "$TLS_DIR/nginx.conf" || true
    exit 1
  fi
  write_tls_env
  echo "nginx started for $LAB_DIR: TLS $TLS_PORT, basic auth $AUTH_PORT, client certificate $CLIENT_PORT, path prefix $PATH_PORT"
}

cmd_password() {
  [ "$#" -ge 1 ] || {
    usage
    exit 2
  }
  load_lab_env "$1"
  shift
  parse_user "$@"
  [ -d "$TLS_DIR" ] || die "no $TLS_DIR: run tls.sh start first"
  write_password_file
}

cmd_stop() {
  [ "$#" -eq 1 ] || {
    usage
    exit 2
  }
  load_lab_env "$1"
  stop_pid_file nginx "$TLS_DIR/nginx.pid" "$TLS_DIR/nginx.conf"
}

case ${1-} in
  start)
    shift
    cmd_start "$@"
    ;;
  password)
    shift
    cmd_password "$@"
    ;;
  stop)
    shift
    cmd_stop "$@"
    ;;
  *)
    usage
    exit 2
    ;;
esac
