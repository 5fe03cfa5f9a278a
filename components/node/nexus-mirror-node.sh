#!/bin/sh
# nexus-mirror node script: puts containerd on this node behind Nexus registry
# proxies with hosts.toml files and the CRI registry setting config_path.
#
# The script defines functions and sets a few initial variables. The only
# command it runs on its own is the patch-config entry point at the end. The
# Pulumi program runs `sh -s -- MODE`
# (behind `sudo -n` for a user other than root) with this file on standard
# input, followed by a generated tail that assigns the NM_* settings, stages
# files with nm_file, registers mirror probes with nm_probe and ends with
# `nm_main "$@" </dev/null`. MODE is one of:
#   config  set config_path in config.toml; restart containerd only on a change
#   config-delete  remove the registry credentials that config mode wrote to
#           config.toml, keep config_path; restart only on a change
#   hosts   write the managed hosts files, remove obsolete ones, probe, verify
#   delete  remove every managed file, restore backups, remove created dirs
#
# Without a tail, one command is available for tests and manual checks:
#   sh nexus-mirror-node.sh patch-config FILE CONTAINERD_VERSION CONFIG_PATH [AUTH_FILE]
# It prints the candidate config.toml that config mode would validate (FILE
# with config_path set, or a minimal file when FILE does not exist) to stdout.
# When config mode would reject FILE, it exits 1 with the usual error line.
#
# stdout carries one JSON report on one line. Progress and errors go to
# stderr, prefixed "nexus-mirror: ". The last stderr line of a failed run is
# "nexus-mirror: node NODE: STEP: CAUSE. FIX". Header values and the contents
# of config.toml and of the managed files are never printed (patch-config,
# whose output is the candidate file, is the one exception).
#
# Settings reach commands only as quoted words, as data in files or through
# the environment of awk. NM_RESTART_COMMAND and NM_LOG_COMMAND are the only
# values run as shell code, with sh -c.

NM_NL='
'
NM_FILE_COUNT=0
NM_PROBE_COUNT=0
NM_STAGE=
NM_WORK=
NM_CANDIDATE=
NM_ATOMIC_TMP=
NM_LOCK_DIR=
NM_EFFECTIVE_JSON=null

# ---------------------------------------------------------------------------
# Output, errors and small helpers

nm_log() {
    printf 'nexus-mirror: %s\n' "$*" >&2
}

# Print $1 on one line: newlines and tabs become spaces, other control
# characters are dropped, so an error line stays the last line of stderr.
nm_oneline() {
    printf '%s' "$1" | LC_ALL=C tr '\n\r\t' '   ' | LC_ALL=C tr -d '\000-\037\177'
}

# Print the error line "nexus-mirror: node NODE: STEP: CAUSE. FIX" and exit 1.
nm_fail() {
    nm_cleanup
    printf 'nexus-mirror: node %s: %s: %s. %s\n' "$(nm_oneline "${NM_NODE:-unknown}")" \
        "$1" "$(nm_oneline "$2")" "$(nm_oneline "$3")" >&2
    exit 1
}

nm_cleanup() {
    if [ -n "$NM_ATOMIC_TMP" ]; then
        rm -f "$NM_ATOMIC_TMP"
        NM_ATOMIC_TMP=
    fi
    if [ -n "$NM_CANDIDATE" ]; then
        rm -f "$NM_CANDIDATE"
        NM_CANDIDATE=
    fi
    if [ -n "$NM_WORK" ] && [ -f "$NM_WORK/temps" ]; then
        while IFS= read -r _cu_tmp; do
            rm -f "$_cu_tmp"
        done <"$NM_WORK/temps"
    fi
    if [ -n "$NM_STAGE" ]; then
        rm -rf "$NM_STAGE"
        NM_STAGE=
        NM_WORK=
    fi
    if [ -n "$NM_LOCK_DIR" ]; then
        rm -rf "$NM_LOCK_DIR"
        NM_LOCK_DIR=
    fi
}

# Create the private scratch directory (mode 0700) that contains staged files,
# reports and command output, with the pid of this shell in its file pid. It
# is removed on exit. A killed run cannot remove it, so the next run does.
nm_stage_init() {
    [ -z "$NM_STAGE" ] || return 0
    nm_sweep_stages
    NM_STAGE=$(mktemp -d "${TMPDIR:-/tmp}/nexus-mirror.XXXXXX") ||
        nm_fail "check settings" "cannot create a temporary directory in ${TMPDIR:-/tmp}" \
            "Make ${TMPDIR:-/tmp} writable for root"
    echo "$$" >"$NM_STAGE/pid"
    NM_WORK=$NM_STAGE/work
    mkdir "$NM_WORK" || nm_fail "check settings" "cannot create $NM_WORK" "Make ${TMPDIR:-/tmp} writable for root"
    trap nm_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    trap 'exit 129' HUP
    # A dropped SSH connection closes stdout and stderr. A write to them then
    # fails instead of killing the shell, so the run goes on to the check or
    # roll-back of its change. Its messages are lost.
    trap 'NM_OUTPUT_LOST=1' PIPE
}

# Remove the scratch directories of runs that were killed: directories owned
# by this user whose pid file names a process that no longer runs.
nm_sweep_stages() {
    _sw_me=$(id -u 2>/dev/null)
    for _sw_dir in "${TMPDIR:-/tmp}"/nexus-mirror.??????; do
        if [ ! -d "$_sw_dir" ] || [ -L "$_sw_dir" ] || [ ! -f "$_sw_dir/pid" ]; then
            continue
        fi
        _sw_owner=$(nm_file_owner "$_sw_dir")
        [ "${_sw_owner%%:*}" = "$_sw_me" ] || continue
        _sw_pid=
        read -r _sw_pid <"$_sw_dir/pid" 2>/dev/null
        case $_sw_pid in
        '' | *[!0-9]*) continue ;;
        esac
        kill -0 "$_sw_pid" 2>/dev/null && continue
        rm -rf "$_sw_dir"
    done
}

# Run a command with a time limit in seconds when `timeout` exists. A
# command that ignores SIGTERM gets SIGKILL 3 s after the limit when this
# timeout accepts -k (GNU coreutils does), which is checked on first use.
nm_with_timeout() {
    _wt_seconds=$1
    shift
    if [ -z "${NM_TIMEOUT_KILL+set}" ]; then
        NM_TIMEOUT_KILL=
        if ! command -v timeout >/dev/null 2>&1; then
            NM_TIMEOUT_KILL=none
        elif timeout -k 1 5 true </dev/null >/dev/null 2>&1; then
            NM_TIMEOUT_KILL=3
        fi
    fi
    case $NM_TIMEOUT_KILL in
    none) "$@" ;;
    '') timeout "$_wt_seconds" "$@" ;;
    *) timeout -k "$NM_TIMEOUT_KILL" "$_wt_seconds" "$@" ;;
    esac
}

nm_epoch() {
    date +%s
}

# Print the current time as Unix seconds with milliseconds when date has %N.
nm_now() {
    _nw=$(date +%s.%N 2>/dev/null)
    case $_nw in
    [0-9]*.[0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9])
        printf '%s\n' "${_nw%??????}"
        ;;
    *)
        date +%s
        ;;
    esac
}

nm_sleep_short() {
    sleep 0.2 2>/dev/null || sleep 1
}

# Print the SHA-256 of file $1 in hex.
nm_sha256() {
    _sh_out=$(sha256sum <"$1") || return 1
    printf '%s\n' "${_sh_out%% *}"
}

# Print the mode of file $1 as four octal digits (0644), read from `ls -ldn`
# because stat(1) is not in POSIX.
nm_file_mode() {
    # shellcheck disable=SC2012
    LC_ALL=C ls -ldn "$1" 2>/dev/null | awk 'NR == 1 {
        p = $1; v = 0
        for (i = 2; i <= 10; i++) {
            c = substr(p, i, 1); v = v * 2
            if (c != "-" && c != "S" && c != "T") v++
        }
        s = 0
        c = substr(p, 4, 1); if (c == "s" || c == "S") s += 4
        c = substr(p, 7, 1); if (c == "s" || c == "S") s += 2
        c = substr(p, 10, 1); if (c == "t" || c == "T") s += 1
        printf "%o%03o\n", s, v
    }'
}

# Print the numeric owner of file $1 as uid:gid.
nm_file_owner() {
    # shellcheck disable=SC2012
    LC_ALL=C ls -ldn "$1" 2>/dev/null | awk 'NR == 1 { print $3 ":" $4 }'
}

nm_is_root() {
    [ "$(id -u 2>/dev/null)" = 0 ]
}

# Replace file $2 atomically with the content of file $1: write a temporary
# file in the directory of $2, set mode $3 and owner $4 (uid:gid, skipped when
# empty or when not running as root), then rename it over $2.
nm_install_file() {
    _in_dir=${2%/*}
    [ -n "$_in_dir" ] || _in_dir=/
    _in_base=${2##*/}
    NM_ATOMIC_TMP=$(mktemp "$_in_dir/.$_in_base.nexus-mirror.XXXXXX") || {
        NM_ATOMIC_TMP=
        return 1
    }
    if cat "$1" >"$NM_ATOMIC_TMP" && chmod "$3" "$NM_ATOMIC_TMP" &&
        { [ -z "$4" ] || ! nm_is_root || chown "$4" "$NM_ATOMIC_TMP"; } &&
        mv -f "$NM_ATOMIC_TMP" "$2"; then
        NM_ATOMIC_TMP=
        return 0
    fi
    rm -f "$NM_ATOMIC_TMP"
    NM_ATOMIC_TMP=
    return 1
}

# Copy file $1 to $2 atomically, keeping its mode and owner.
nm_copy_file() {
    _cp_mode=$(nm_file_mode "$1")
    _cp_owner=$(nm_file_owner "$1")
    [ -n "$_cp_mode" ] || return 1
    nm_install_file "$1" "$2" "$_cp_mode" "$_cp_owner"
}

# Print a JSON string literal for $1. Any byte is handled: quotes,
# backslashes and control characters are escaped, valid UTF-8 is copied, and
# a byte that is not part of valid UTF-8 becomes \u00XX (its Latin-1 value).
nm_json_str() {
    NM_JSON_VALUE=$1 LC_ALL=C awk 'BEGIN {
        for (i = 1; i < 256; i++) ord[sprintf("%c", i)] = i
        s = ENVIRON["NM_JSON_VALUE"]; n = length(s); out = "\""
        for (i = 1; i <= n; i++) {
            c = substr(s, i, 1); o = ord[c]
            if (c == "\"") out = out "\\\""
            else if (c == "\\") out = out "\\\\"
            else if (c == "\n") out = out "\\n"
            else if (c == "\t") out = out "\\t"
            else if (c == "\r") out = out "\\r"
            else if (o < 32 || o == 127) out = out sprintf("\\u%04x", o)
            else if (o < 128) out = out c
            else {
                k = 0
                if (o >= 194 && o <= 223) k = 1
                else if (o >= 224 && o <= 239) k = 2
                else if (o >= 240 && o <= 244) k = 3
                ok = (k > 0 && i + k <= n)
                for (j = 1; ok && j <= k; j++) {
                    b = ord[substr(s, i + j, 1)]; lo = 128; hi = 191
                    if (j == 1) {
                        if (o == 224) lo = 160
                        else if (o == 237) hi = 159
                        else if (o == 240) lo = 144
                        else if (o == 244) hi = 143
                    }
                    if (b < lo || b > hi) ok = 0
                }
                if (ok) { out = out substr(s, i, k + 1); i += k }
                else out = out sprintf("\\u%04x", o)
            }
        }
        printf "%s", out "\""
    }' </dev/null
}

# Print a JSON string for $1, or null when $1 is empty.
nm_json_str_or_null() {
    if [ -n "$1" ]; then
        nm_json_str "$1"
    else
        printf 'null'
    fi
}

# Join the JSON values in file $1 (one per line) into a JSON array.
nm_json_array_file() {
    awk 'BEGIN { printf "[" } NR > 1 { printf "," } { printf "%s", $0 } END { printf "]" }' "$1"
}

# Filter stdin: replace values that follow words such as password,
# identitytoken or authorization with <redacted>, and the values of
# request.header.NAME fields, and cut each line to 400 bytes. Used on
# containerd log and error lines before they are printed. containerd at log
# level debug logs every request header but Authorization as such a field,
# custom headers from hosts.toml included.
nm_redact() {
    LC_ALL=C awk '
    BEGIN {
        nk = split("authorization password passwd secret identitytoken access_token refresh_token registrytoken bearer basic", keys, " ")
        sep = " \t\"'\''=:\\"
        stop = " \t\"'\'',;}]"
    }
    # Return the index just past the value that starts at index i of s. A
    # quoted value ends at its closing quote q and a bare one at a stop
    # character. An authentication scheme (Basic, Bearer) takes the next word.
    function value_end(s, i, q,    j, n, w) {
        n = length(s)
        if (q != "") {
            for (j = i; j <= n; j++) {
                if (substr(s, j, 1) == "\\") { j++; continue }
                if (substr(s, j, 1) == q) return j
            }
            return n + 1
        }
        j = i
        while (j <= n && !index(stop, substr(s, j, 1))) j++
        w = tolower(substr(s, i, j - i))
        if ((w == "basic" || w == "bearer" || w == "token") && substr(s, j, 1) == " ") {
            j++
            while (j <= n && !index(stop, substr(s, j, 1))) j++
        }
        return j
    }
    # Return s up to index i, past the separators there, with the value that
    # follows replaced by <redacted>. The text after the value goes to rest.
    function redact_at(s, i,    c, j, q) {
        q = ""
        while (i <= length(s) && index(sep, c = substr(s, i, 1))) {
            if (c == "\"" || c == "\047") q = c
            i++
        }
        j = value_end(s, i, q)
        rest = substr(s, j)
        return substr(s, 1, i - 1) (j > i ? "<redacted>" : "")
    }
    {
        s = $0
        out = ""
        while (match(tolower(s), /request\.header\.[!#$%&*+.^_`|~0-9a-z-]+/)) {
            out = out redact_at(s, RSTART + RLENGTH)
            s = rest
        }
        s = out s
        for (k = 1; k <= nk; k++) {
            out = ""
            while ((p = index(tolower(s), keys[k])) > 0) {
                out = out redact_at(s, p + length(keys[k]))
                s = rest
            }
            s = out s
        }
        if (length(s) > 400) s = substr(s, 1, 400) "..."
        print s
    }'
}

# ---------------------------------------------------------------------------
# Generated tail: staging of files and probes. Nothing is applied here.

# Reject an empty namespace or file name, one with '/', '.', '..' or control
# characters. $1 is the value, $2 what it names.
nm_check_plain_name() {
    case $1 in
    '' | . | .. | */*)
        nm_fail "write hosts files" "invalid $2 '$1'" "Use a registry host[:port], _default or a plain file name"
        ;;
    esac
    if [ "$(printf '%s' "$1" | LC_ALL=C tr -d '\000-\037\177')" != "$1" ]; then
        nm_fail "write hosts files" "invalid $2: it contains control characters" \
            "Use a registry host[:port], _default or a plain file name"
    fi
}

# Stage one managed file: namespace $1 (directory under NM_CONFIG_PATH), file
# name $2, octal mode $3, content on stdin.
nm_file() {
    nm_stage_init
    nm_check_plain_name "$1" namespace
    nm_check_plain_name "$2" "file name"
    case $3 in
    [0-7][0-7][0-7] | [0-7][0-7][0-7][0-7]) ;;
    *)
        nm_fail "write hosts files" "invalid mode '$3' for $1/$2" "Use an octal mode such as 0644"
        ;;
    esac
    _nf_i=1
    while [ "$_nf_i" -le "$NM_FILE_COUNT" ]; do
        if [ "$(cat "$NM_STAGE/file.$_nf_i.ns")" = "$1" ] && [ "$(cat "$NM_STAGE/file.$_nf_i.name")" = "$2" ]; then
            nm_fail "write hosts files" "the file $1/$2 is staged twice" "Stage each file once"
        fi
        _nf_i=$((_nf_i + 1))
    done
    NM_FILE_COUNT=$((NM_FILE_COUNT + 1))
    _nf_base=$NM_STAGE/file.$NM_FILE_COUNT
    printf '%s' "$1" >"$_nf_base.ns"
    printf '%s' "$2" >"$_nf_base.name"
    printf '%s' "$3" >"$_nf_base.mode"
    cat >"$_nf_base.data"
}

# Register a probe of one mirror: namespace, host URL as in hosts.toml, probe
# URL, skip_verify (true|false), CA file, client certificate, client key
# (each '' when not used).
nm_probe() {
    nm_stage_init
    if [ $# -ne 7 ]; then
        nm_fail "write hosts files" "nm_probe needs 7 arguments, got $#" "Regenerate the node input"
    fi
    NM_PROBE_COUNT=$((NM_PROBE_COUNT + 1))
    _np_n=1
    for _np_arg in "$@"; do
        printf '%s' "$_np_arg" >"$NM_STAGE/probe.$NM_PROBE_COUNT.$_np_n"
        _np_n=$((_np_n + 1))
    done
}

# ---------------------------------------------------------------------------
# Settings, tools and the lock

nm_check_settings() {
    [ -n "${NM_NODE-}" ] || NM_NODE=$(uname -n 2>/dev/null)
    [ -n "$NM_NODE" ] || NM_NODE=unknown
    nm_check_abs_path NM_CONFIG_PATH "${NM_CONFIG_PATH-}"
    case $NM_CONFIG_PATH in
    *:*)
        nm_fail "check settings" "the hosts directory '$NM_CONFIG_PATH' contains ':', which containerd reads as a list separator in config_path" \
            "Set nexus-mirror:containerd.configPath to a directory without ':'"
        ;;
    esac
    nm_check_abs_path NM_CONFIG_FILE "${NM_CONFIG_FILE-}"
    nm_check_abs_path NM_STATE_DIR "${NM_STATE_DIR-}"
    [ "$NM_CONFIG_PATH" != / ] || nm_fail "check settings" "NM_CONFIG_PATH must not be /" "Use a directory such as /etc/containerd/certs.d"
    [ "$NM_STATE_DIR" != / ] || nm_fail "check settings" "NM_STATE_DIR must not be /" "Use a directory such as /var/lib/nexus-mirror"
    case ${NM_MANAGE_CONFIG-} in
    true | false) ;;
    *)
        nm_fail "check settings" "NM_MANAGE_CONFIG must be true or false, got '${NM_MANAGE_CONFIG-}'" "Regenerate the node input"
        ;;
    esac
    case ${NM_RESTART_TIMEOUT-} in
    '' | *[!0-9]* | 0*)
        nm_fail "check settings" "NM_RESTART_TIMEOUT must be a whole number of seconds above 0, got '${NM_RESTART_TIMEOUT-}'" \
            "Set the restart timeout to a number of seconds such as 60"
        ;;
    esac
    [ -n "${NM_ADDRESS-}" ] || nm_fail "check settings" "NM_ADDRESS (the containerd socket) is empty" "Set the containerd address of the node"
    NM_RESTART_COMMAND=${NM_RESTART_COMMAND-}
    NM_LOG_COMMAND=${NM_LOG_COMMAND-}
    NM_BIN_DIR=${NM_BIN_DIR-}
    NM_VERIFY_IMAGE=${NM_VERIFY_IMAGE-}
    NM_CONFIG_PATH=$(nm_strip_slashes "$NM_CONFIG_PATH")
}

# $1 is the setting's name, $2 its value: an absolute path on one line.
nm_check_abs_path() {
    case $2 in
    /*) ;;
    *)
        nm_fail "check settings" "$1 must be an absolute path, got '$2'" "Set it to an absolute path"
        ;;
    esac
    case $2 in
    *"$NM_NL"*)
        nm_fail "check settings" "$1 contains a newline" "Set it to a path on one line"
        ;;
    esac
}

# Print $1 without trailing slashes ("/" stays "/").
nm_strip_slashes() {
    _ss=$1
    while :; do
        case $_ss in
        '' | / | *[!/]) break ;;
        */) _ss=${_ss%/} ;;
        esac
    done
    printf '%s\n' "$_ss"
}

# Put NM_BIN_DIR first on PATH and make sure the usual system directories
# are on it (sudo may reset PATH).
nm_setup_path() {
    if [ -n "$NM_BIN_DIR" ]; then
        PATH=$NM_BIN_DIR:$PATH
    fi
    for _sp_dir in /usr/local/sbin /usr/local/bin /usr/sbin /usr/bin /sbin /bin; do
        case :$PATH: in
        *:"$_sp_dir":*) ;;
        *) PATH=$PATH:$_sp_dir ;;
        esac
    done
    export PATH
}

# Set NM_CONTAINERD, NM_CTR, NM_VERSION (1.6.20) and NM_MAJOR (1). Each stays
# empty when the tool is missing; $1 = required makes a missing tool fatal.
# With NM_BIN_DIR set, both must be in that directory: a containerd found
# elsewhere on PATH may be another installation than the one that runs.
nm_find_containerd() {
    if [ -n "$NM_BIN_DIR" ]; then
        NM_CONTAINERD=$NM_BIN_DIR/containerd
        NM_CTR=$NM_BIN_DIR/ctr
        [ -f "$NM_CONTAINERD" ] && [ -x "$NM_CONTAINERD" ] || NM_CONTAINERD=
        [ -f "$NM_CTR" ] && [ -x "$NM_CTR" ] || NM_CTR=
    else
        NM_CONTAINERD=$(command -v containerd 2>/dev/null) || NM_CONTAINERD=
        NM_CTR=$(command -v ctr 2>/dev/null) || NM_CTR=
    fi
    NM_VERSION=
    NM_MAJOR=
    if [ -n "$NM_CONTAINERD" ]; then
        _fc_raw=$("$NM_CONTAINERD" --version </dev/null 2>/dev/null | awk 'NR == 1 { print $3 }')
        NM_VERSION=$(nm_parse_version "$_fc_raw")
        NM_MAJOR=${NM_VERSION%%.*}
    fi
    [ "${1-}" = required ] || return 0
    if [ -z "$NM_CONTAINERD" ] && [ -n "$NM_BIN_DIR" ]; then
        nm_fail "find containerd" "$NM_BIN_DIR/containerd is not an executable file" \
            "Set nexus-mirror:containerd.binDir to the directory that holds containerd and ctr, or leave it empty to search PATH"
    fi
    if [ -z "$NM_CTR" ] && [ -n "$NM_BIN_DIR" ]; then
        nm_fail "find containerd" "$NM_BIN_DIR/ctr is not an executable file, and ctr is needed to check the CRI plugin after a restart" \
            "Set nexus-mirror:containerd.binDir to the directory that holds containerd and ctr, or leave it empty to search PATH"
    fi
    if [ -z "$NM_CONTAINERD" ]; then
        nm_fail "find containerd" "containerd is not on PATH ($PATH)" \
            "Install containerd or set the directory of its binaries (NM_BIN_DIR) for this node"
    fi
    if [ -z "$NM_VERSION" ]; then
        nm_fail "find containerd" "cannot read a version from '$NM_CONTAINERD --version'" \
            "Check that $NM_CONTAINERD is the containerd daemon binary"
    fi
    if [ -z "$NM_CTR" ]; then
        nm_fail "find containerd" "ctr is not on PATH ($PATH), and it is needed to check the CRI plugin after a restart" \
            "Install ctr (it ships with containerd) or set the directory of the binaries (NM_BIN_DIR) for this node"
    fi
}

# Print the numeric part of a containerd version: v2.0.0-rc.1 -> 2.0.0,
# 1.6.20~ds1 -> 1.6.20. Prints nothing when there is no number.
nm_parse_version() {
    printf '%s\n' "$1" | sed -n 's/^v\{0,1\}\([0-9][0-9]*\(\.[0-9][0-9]*\)*\).*/\1/p'
}

# Take the lock of NM_STATE_DIR so that the config and hosts runs of one node
# never overlap: flock on $NM_STATE_DIR/lock when flock exists, else a lock
# directory $NM_STATE_DIR/lock.d holding the owner's pid.
nm_lock() {
    if ! mkdir -p "$NM_STATE_DIR" 2>/dev/null || ! chmod 0700 "$NM_STATE_DIR"; then
        nm_fail "lock" "cannot create the state directory $NM_STATE_DIR" "Run as root or choose another state directory"
    fi
    # A config run may hold the lock through two restarts and two CRI waits.
    _lk_max=$((NM_RESTART_TIMEOUT * 4 + 60))
    _lk_start=$(nm_epoch)
    _lk_logged=
    if command -v flock >/dev/null 2>&1; then
        exec 9>>"$NM_STATE_DIR/lock" ||
            nm_fail "lock" "cannot open $NM_STATE_DIR/lock" "Run as root or choose another state directory"
        while ! flock -n 9; do
            nm_lock_wait
        done
        return 0
    fi
    while ! mkdir "$NM_STATE_DIR/lock.d" 2>/dev/null; do
        _lk_pid=$(cat "$NM_STATE_DIR/lock.d/pid" 2>/dev/null)
        case $_lk_pid in
        '' | *[!0-9]*) ;;
        *)
            if ! kill -0 "$_lk_pid" 2>/dev/null; then
                nm_log "removing the stale lock $NM_STATE_DIR/lock.d of process $_lk_pid, which no longer runs"
                rm -rf "$NM_STATE_DIR/lock.d"
                continue
            fi
            ;;
        esac
        nm_lock_wait
    done
    NM_LOCK_DIR=$NM_STATE_DIR/lock.d
    echo "$$" >"$NM_LOCK_DIR/pid"
}

nm_lock_wait() {
    if [ $(($(nm_epoch) - _lk_start)) -ge "$_lk_max" ]; then
        nm_fail "lock" "another nexus-mirror run has held the lock in $NM_STATE_DIR for more than $_lk_max s" \
            "Wait for it to finish, or stop it if it hangs, then run again"
    fi
    if [ -z "$_lk_logged" ]; then
        nm_log "waiting for another nexus-mirror run to release the lock in $NM_STATE_DIR"
        _lk_logged=1
    fi
    sleep 1
}

# ---------------------------------------------------------------------------
# config.toml: a line-based TOML scanner shared by the patcher and the reader
# of `containerd config dump`.

# Print the awk functions of the scanner. tl_line(s) classifies one line and
# keeps state across lines: multi-line strings (''' and """) and arrays that
# span lines, so that their contents are never taken for table headers.
# After tl_line, tl_kind is "header", "kv" or "none". A header sets tl_table
# (keys joined with SUBSEP, quotes removed) and tl_hdr_ok. A key/value line
# sets tl_path (table and key joined with SUBSEP) and tl_vpos (index of the
# value). tl_string(s, i) reads a single-line string value into tl_str and
# sets tl_str_end to the index of its closing quote.
nm_awk_toml_lib() {
    cat <<'NM_AWK_EOF'
function tl_reset() { tl_ml = ""; tl_depth = 0; tl_table = ""; tl_hdr_ok = 0 }
function tl_ws(s, i,    c) {
    while (i <= length(s)) {
        c = substr(s, i, 1)
        if (c != " " && c != "\t" && c != "\r") break
        i++
    }
    return i
}
function tl_basic_end(s, i,    n, c) {
    n = length(s)
    while (i <= n) {
        c = substr(s, i, 1)
        if (c == "\\") { i += 2; continue }
        if (c == "\"") return i
        i++
    }
    return 0
}
function tl_literal_end(s, i,    j) {
    j = index(substr(s, i), "'")
    return j ? i + j - 1 : 0
}
function tl_mlb_end(s, i,    n, c, k) {
    n = length(s)
    while (i <= n) {
        c = substr(s, i, 1)
        if (c == "\\") { i += 2; continue }
        if (substr(s, i, 3) == "\"\"\"") {
            i += 3; k = 0
            while (k < 2 && substr(s, i, 1) == "\"") { i++; k++ }
            return i
        }
        i++
    }
    return 0
}
function tl_mll_end(s, i,    j, k) {
    j = index(substr(s, i), "'''")
    if (!j) return 0
    i = i + j + 2; k = 0
    while (k < 2 && substr(s, i, 1) == "'") { i++; k++ }
    return i
}
function tl_unescape(t,    out, i, n, c, d) {
    out = ""; n = length(t)
    for (i = 1; i <= n; i++) {
        c = substr(t, i, 1)
        if (c != "\\") { out = out c; continue }
        d = substr(t, ++i, 1)
        if (d == "n") out = out "\n"
        else if (d == "t") out = out "\t"
        else if (d == "r") out = out "\r"
        else if (d == "b") out = out "\b"
        else if (d == "f") out = out "\f"
        else if (d == "e") out = out "\033"
        else if (d == "\"" || d == "\\") out = out d
        # NOTE: \uXXXX and \UXXXXXXXX are not decoded, so a config_path
        # written with them never equals the expected path.
        else out = out "\\" d
    }
    return out
}
function tl_value(s, i,    n, c, j) {
    n = length(s)
    while (i <= n) {
        c = substr(s, i, 1)
        if (c == "#") return
        if (c == "\"") {
            if (substr(s, i, 3) == "\"\"\"") {
                j = tl_mlb_end(s, i + 3)
                if (!j) { tl_ml = "b"; return }
                i = j; continue
            }
            j = tl_basic_end(s, i + 1)
            if (!j) return
            i = j + 1; continue
        }
        if (c == "'") {
            if (substr(s, i, 3) == "'''") {
                j = tl_mll_end(s, i + 3)
                if (!j) { tl_ml = "l"; return }
                i = j; continue
            }
            j = tl_literal_end(s, i + 1)
            if (!j) return
            i = j + 1; continue
        }
        if (c == "[" || c == "{") tl_depth++
        else if ((c == "]" || c == "}") && tl_depth > 0) tl_depth--
        i++
    }
}
function tl_keys(s, i,    n, c, j, part, path, count) {
    n = length(s); path = ""; count = 0
    while (1) {
        i = tl_ws(s, i); c = substr(s, i, 1)
        if (c == "\"") {
            j = tl_basic_end(s, i + 1)
            if (!j) return 0
            part = tl_unescape(substr(s, i + 1, j - i - 1)); i = j + 1
        } else if (c == "'") {
            j = tl_literal_end(s, i + 1)
            if (!j) return 0
            part = substr(s, i + 1, j - i - 1); i = j + 1
        } else {
            j = i
            while (j <= n && substr(s, j, 1) ~ /^[A-Za-z0-9_-]$/) j++
            if (j == i) return 0
            part = substr(s, i, j - i); i = j
        }
        path = count ? path SUBSEP part : part
        count++
        i = tl_ws(s, i)
        if (substr(s, i, 1) != ".") break
        i++
    }
    tl_key = path
    return i
}
function tl_line(s,    i, j, c, arr, close_) {
    tl_kind = "none"
    if (tl_ml == "b" || tl_ml == "l") {
        i = (tl_ml == "b") ? tl_mlb_end(s, 1) : tl_mll_end(s, 1)
        if (!i) return
        tl_ml = ""
        tl_value(s, i)
        return
    }
    if (tl_depth > 0) { tl_value(s, 1); return }
    i = tl_ws(s, 1)
    if (i > length(s)) return
    c = substr(s, i, 1)
    if (c == "#") return
    if (c == "[") {
        tl_kind = "header"
        arr = (substr(s, i + 1, 1) == "[")
        close_ = arr ? "]]" : "]"
        j = tl_keys(s, i + 1 + arr)
        if (j) {
            j = tl_ws(s, j)
            if (substr(s, j, 1 + arr) != close_) j = 0
            else {
                j = tl_ws(s, j + 1 + arr)
                if (j <= length(s) && substr(s, j, 1) != "#") j = 0
            }
        }
        tl_hdr_ok = (j != 0)
        tl_table = tl_hdr_ok ? tl_key : "\001invalid header"
        return
    }
    j = tl_keys(s, i)
    if (j) j = tl_ws(s, j)
    if (!j || substr(s, j, 1) != "=") { tl_value(s, i); return }
    tl_kind = "kv"
    tl_path = (tl_table == "") ? tl_key : tl_table SUBSEP tl_key
    tl_vpos = tl_ws(s, j + 1)
    tl_value(s, tl_vpos)
}
function tl_string(s, i,    c, j) {
    if (substr(s, i, 3) == "\"\"\"" || substr(s, i, 3) == "'''") return 0
    c = substr(s, i, 1)
    if (c == "\"") {
        j = tl_basic_end(s, i + 1)
        if (!j) return 0
        tl_str = tl_unescape(substr(s, i + 1, j - i - 1)); tl_str_end = j
        return 1
    }
    if (c == "'") {
        j = tl_literal_end(s, i + 1)
        if (!j) return 0
        tl_str = substr(s, i + 1, j - i - 1); tl_str_end = j
        return 1
    }
    return 0
}
function tl_strip_slashes(p) {
    while (length(p) > 1 && substr(p, length(p)) == "/") p = substr(p, 1, length(p) - 1)
    return p
}
NM_AWK_EOF
}

# Print the awk program that patches config.toml. Input: the current file on
# stdin (empty when it does not exist). Environment: NM_P_EXISTS (1|0),
# NM_P_MAJOR (containerd major version), NM_P_CVER (full version, for
# messages), NM_P_PATH (expected config_path), NM_P_META and NM_P_ERR (files).
# Output: the candidate on stdout and "key<TAB>value" lines (version,
# section, action) in NM_P_META. A rejection writes its cause and fix as two
# lines to NM_P_ERR and exits 3.
nm_awk_patch_prog() {
    cat <<'NM_AWK_EOF'
function section_of(v) {
    if (v == 1) return "plugins" SUBSEP "cri" SUBSEP "registry"
    if (v == 2) return "plugins" SUBSEP "io.containerd.grpc.v1.cri" SUBSEP "registry"
    return "plugins" SUBSEP "io.containerd.cri.v1.images" SUBSEP "registry"
}
function header_of(v) {
    if (v == 1) return "[plugins.cri.registry]"
    if (v == 2) return "[plugins.\"io.containerd.grpc.v1.cri\".registry]"
    return "[plugins.\"io.containerd.cri.v1.images\".registry]"
}
function toml_quote(v,    out, i, c) {
    out = "\""
    for (i = 1; i <= length(v); i++) {
        c = substr(v, i, 1)
        if (c == "\\" || c == "\"") out = out "\\" c
        else out = out c
    }
    return out "\""
}
function reject(cause, fix) {
    print cause > errf
    print fix > errf
    close(errf)
    exit 3
}
function meta(key, value) {
    print key "\t" value > metaf
}
BEGIN {
    exists = (ENVIRON["NM_P_EXISTS"] == "1")
    major = ENVIRON["NM_P_MAJOR"] + 0
    cver = ENVIRON["NM_P_CVER"]
    expected_path = ENVIRON["NM_P_PATH"]
    metaf = ENVIRON["NM_P_META"]
    errf = ENVIRON["NM_P_ERR"]
    config_path_line = "  config_path = " toml_quote(expected_path)
    auth_load(ENVIRON["NM_P_AUTH"])
}
{ L[++nl] = $0 }
END {
    if (!exists) {
        ver = (major >= 2) ? 3 : 2
        meta("version", ver); meta("section", header_of(ver)); meta("action", "created")
        meta("auth", auth_n)
        print "version = " ver
        print ""
        print header_of(ver)
        print config_path_line
        auth_emit()
        exit 0
    }

    # Pass 1: the schema version (top-level `version = N` before any table).
    tl_reset(); ver = ""; items = 0
    for (k = 1; k <= nl; k++) {
        tl_line(L[k])
        if (tl_kind != "none") items++
        if (tl_kind == "kv" && tl_path == "version" && ver == "") {
            rest = substr(L[k], tl_vpos)
            if (!match(rest, /^[0-9]+[ \t\r]*(#.*)?$/))
                reject("the top-level version on line " k " of config.toml is not a whole number", \
                    "Set version = 2 (containerd 1.x) or version = 3 (containerd 2.x)")
            ver = rest + 0
        }
    }
    if (tl_ml != "")
        reject("config.toml is not valid TOML: a multi-line string is never closed", \
            "Close the string in config.toml and run again")
    # A file with only comments and blank lines gets the same version as a
    # missing file, so that containerd 2.x can read it.
    empty = (items == 0)
    if (empty) ver = (major >= 2) ? 3 : 2
    else if (ver == "") ver = 1
    meta("version", ver)

    if (major < 2 && ver == 3)
        reject("config.toml has version = 3, which containerd " cver " cannot read (version 3 needs containerd 2.0 or later)", \
            "Set version = 2 and use [plugins.\"io.containerd.grpc.v1.cri\"] tables, or upgrade containerd")
    if (major >= 2 && ver == 1)
        reject("config.toml is a version 1 file (it has no version line), which nexus-mirror edits only for containerd 1.x, and this node runs containerd " cver, \
            "Convert it with `containerd config migrate` (prints a version 3 file) and run again")
    if (ver < 1 || ver > 3)
        reject("config.toml has version = " ver ", which containerd " cver " does not support", \
            "Set version = 2 (containerd 1.x) or version = 3 (containerd 2.x)")
    sect = section_of(ver)
    meta("section", header_of(ver))

    # Pass 2: find config_path (also as a dotted key) and the section header.
    tl_reset(); found = 0; hdr = 0; replaced = 0
    for (k = 1; k <= nl; k++) {
        tl_line(L[k])
        if (tl_kind == "header" && tl_hdr_ok && tl_table == sect && !hdr) hdr = k
        if (tl_kind != "kv" || tl_path != sect SUBSEP "config_path") continue
        found++
        if (!tl_string(L[k], tl_vpos))
            reject("config_path on line " k " of config.toml is not a single-line string", \
                "Write it as config_path = " toml_quote(expected_path) " or remove the line")
        if (tl_strip_slashes(tl_str) == tl_strip_slashes(expected_path)) continue
        if (tl_str == "") {
            R[k] = substr(L[k], 1, tl_vpos - 1) toml_quote(expected_path) substr(L[k], tl_str_end + 1)
            replaced++
            continue
        }
        if (index(tl_str, ":"))
            reject("config.toml sets config_path = " toml_quote(tl_str) " on line " k ", a list of several directories, but nexus-mirror writes to the single directory " toml_quote(expected_path), \
                "Set nexus-mirror:containerd.configPath to one directory and make config_path name only that directory, or remove the config_path line")
        reject("config.toml already sets config_path = " toml_quote(tl_str) " on line " k ", which differs from the hosts directory " toml_quote(expected_path) " that nexus-mirror writes to", \
            "Set nexus-mirror:containerd.configPath to " toml_quote(tl_str) " or remove the config_path line from config.toml")
    }
    if (found && !replaced) action = "kept"
    else if (found) action = "replaced"
    else if (hdr) action = "inserted"
    else action = "appended"
    meta("action", action)
    # Managed credential tables: lines to drop go into D, conflicts reject.
    auth_scan()

    last = 0
    for (k = 1; k <= nl; k++) {
        if (k in D) continue
        print ((k in R) ? R[k] : L[k])
        last = k
        if (k == hdr && !found) print config_path_line (L[k] ~ /\r$/ ? "\r" : "")
    }
    if (!found && !hdr) {
        if (last > 0 && L[last] !~ /^[ \t\r]*$/) print ""
        if (empty) { print "version = " ver; print "" }
        print header_of(ver)
        print config_path_line
    }
    auth_emit()
}
NM_AWK_EOF
}

# Print the awk program that reads `containerd config dump` output (stdin)
# and prints facts about the CRI registry, one "key<TAB>value" per line:
# config_path, mirror (host of a registry.mirrors entry) and tls (host of a
# registry.configs entry with a tls table). NM_P_MAJOR picks the section:
# 1.x prints version 2 names, 2.x prints version 3 names.
nm_awk_dump_prog() {
    cat <<'NM_AWK_EOF'
function clean(v) {
    gsub(/[\t\r\n]/, " ", v)
    return v
}
BEGIN {
    major = ENVIRON["NM_P_MAJOR"] + 0
    if (major >= 2) reg = "plugins" SUBSEP "io.containerd.cri.v1.images" SUBSEP "registry"
    else reg = "plugins" SUBSEP "io.containerd.grpc.v1.cri" SUBSEP "registry"
    mirrors = reg SUBSEP "mirrors" SUBSEP
    configs = reg SUBSEP "configs" SUBSEP
    tl_reset()
}
{
    tl_line($0)
    if (tl_kind == "header" && tl_hdr_ok) p = tl_table
    else if (tl_kind == "kv") p = tl_path
    else next
    if (tl_kind == "kv" && p == reg SUBSEP "config_path") {
        if (tl_string($0, tl_vpos)) print "config_path\t" clean(tl_str)
        else print "config_path_unreadable\t"
    }
    if (substr(p, 1, length(mirrors)) == mirrors) {
        h = substr(p, length(mirrors) + 1); i = index(h, SUBSEP)
        if (i) h = substr(h, 1, i - 1)
        print "mirror\t" clean(h)
    }
    if (substr(p, 1, length(configs)) == configs) {
        h = substr(p, length(configs) + 1); i = index(h, SUBSEP)
        if (i) {
            t = substr(h, i + 1); h = substr(h, 1, i - 1); j = index(t, SUBSEP)
            if (j) t = substr(t, 1, j - 1)
            if (t == "tls") print "tls\t" clean(h)
            else if (t == "auth") print "auth\t" clean(h)
        }
    }
}
NM_AWK_EOF
}

# Patch config.toml $1 for containerd major version $2 (full version $3) so
# that it sets config_path = $4, and write the candidate to $5. Sets
# NM_PATCH_VERSION, NM_PATCH_SECTION and NM_PATCH_ACTION (created, kept,
# replaced, inserted or appended). Returns 1 with NM_REJECT_CAUSE and
# NM_REJECT_FIX set when the file cannot be patched, 2 when it cannot be read.
nm_patch_config() {
    NM_PATCH_VERSION=
    NM_PATCH_SECTION=
    NM_PATCH_ACTION=
    NM_REJECT_CAUSE=
    NM_REJECT_FIX=
    _pc_meta=$NM_WORK/patch.meta
    _pc_err=$NM_WORK/patch.err
    : >"$_pc_meta"
    : >"$_pc_err"
    _pc_prog="$(nm_awk_toml_lib)
$(nm_awk_auth_lib)
$(nm_awk_patch_prog)"
    # The staged credentials (nm_config_auth) reach awk as a file name.
    _pc_auth=
    [ ! -f "$NM_STAGE/config-auth.tsv" ] || _pc_auth=$NM_STAGE/config-auth.tsv
    if [ -e "$1" ]; then
        [ -f "$1" ] && [ -r "$1" ] || return 2
        NM_P_EXISTS=1 NM_P_MAJOR=$2 NM_P_CVER=$3 NM_P_PATH=$4 NM_P_META=$_pc_meta NM_P_ERR=$_pc_err \
            NM_P_AUTH=$_pc_auth NM_P_MARKER=$NM_AUTH_MARKER LC_ALL=C awk "$_pc_prog" <"$1" >"$5"
    else
        NM_P_EXISTS=0 NM_P_MAJOR=$2 NM_P_CVER=$3 NM_P_PATH=$4 NM_P_META=$_pc_meta NM_P_ERR=$_pc_err \
            NM_P_AUTH=$_pc_auth NM_P_MARKER=$NM_AUTH_MARKER LC_ALL=C awk "$_pc_prog" </dev/null >"$5"
    fi
    _pc_rc=$?
    NM_PATCH_VERSION=$(awk -F '\t' '$1 == "version" { print $2 }' "$_pc_meta")
    NM_PATCH_SECTION=$(awk -F '\t' '$1 == "section" { print $2 }' "$_pc_meta")
    NM_PATCH_ACTION=$(awk -F '\t' '$1 == "action" { print $2 }' "$_pc_meta")
    case $_pc_rc in
    0) return 0 ;;
    3)
        NM_REJECT_CAUSE=$(sed -n 1p "$_pc_err")
        NM_REJECT_FIX=$(sed -n 2p "$_pc_err")
        return 1
        ;;
    *) return 2 ;;
    esac
}

# Run `containerd -c $1 config dump` and read its registry facts. Sets
# NM_DUMP_OK (true|false), NM_DUMP_ERROR (last error lines, redacted, with
# the file name $1 replaced by the label $2 when given),
# NM_DUMP_CONFIG_PATH, NM_DUMP_MIRRORS and NM_DUMP_TLS (space-separated
# hosts). The dump itself may hold credentials and stays in the scratch
# directory.
nm_read_dump() {
    NM_DUMP_OK=false
    NM_DUMP_ERROR=
    NM_DUMP_CONFIG_PATH=
    NM_DUMP_MIRRORS=
    NM_DUMP_TLS=
    NM_DUMP_AUTH=
    _rd_out=$NM_WORK/dump.toml
    _rd_err=$NM_WORK/dump.err
    if ! nm_with_timeout 60 "$NM_CONTAINERD" -c "$1" config dump </dev/null >"$_rd_out" 2>"$_rd_err" 9>&-; then
        # The cause is the "containerd: ..." line, a "panic: ..." line (go-toml
        # 1.x panics on some invalid files) or an error-level log line.
        NM_DUMP_ERROR=$(NM_R_FROM=$1 NM_R_TO=${2:-$1} awk '
            {
                out = ""; s = $0; from = ENVIRON["NM_R_FROM"]
                while ((i = index(s, from)) > 0) { out = out substr(s, 1, i - 1) ENVIRON["NM_R_TO"]; s = substr(s, i + length(from)) }
                s = out s
                if (s != "") last = s
                if (cause == "" && (s ~ /^(containerd|panic): / || s ~ /level=(error|fatal)/)) cause = s
            }
            END { print (cause != "" ? cause : last) }' "$_rd_err" | nm_redact)
        [ -n "$NM_DUMP_ERROR" ] || NM_DUMP_ERROR="containerd config dump failed with no message"
        rm -f "$_rd_out"
        return 0
    fi
    _rd_facts=$NM_WORK/dump.facts
    NM_P_MAJOR=$NM_MAJOR LC_ALL=C awk "$(nm_awk_toml_lib)
$(nm_awk_dump_prog)" <"$_rd_out" >"$_rd_facts"
    rm -f "$_rd_out"
    NM_DUMP_OK=true
    NM_DUMP_CONFIG_PATH=$(awk -F '\t' '$1 == "config_path" { v = $2 } END { print v }' "$_rd_facts")
    NM_DUMP_MIRRORS=$(awk -F '\t' '$1 == "mirror" && !seen[$2]++ { printf "%s%s", sep, $2; sep = " " }' "$_rd_facts")
    NM_DUMP_TLS=$(awk -F '\t' '$1 == "tls" && !seen[$2]++ { printf "%s%s", sep, $2; sep = " " }' "$_rd_facts")
    NM_DUMP_AUTH=$(awk -F '\t' '$1 == "auth" && !seen[$2]++ { printf "%s%s", sep, $2; sep = " " }' "$_rd_facts")
}

# Read the config_path containerd would use with NM_CONFIG_FILE into
# NM_EFFECTIVE_PATH and its JSON form into NM_EFFECTIVE_JSON: null when the
# file is missing or invalid or containerd is not installed, "" when the file
# sets no config_path.
nm_effective_config_path() {
    NM_EFFECTIVE_PATH=
    NM_EFFECTIVE_JSON=null
    [ -n "$NM_CONTAINERD" ] && [ -n "$NM_MAJOR" ] && [ -f "$NM_CONFIG_FILE" ] || return 0
    nm_read_dump "$NM_CONFIG_FILE"
    [ "$NM_DUMP_OK" = true ] || return 0
    NM_EFFECTIVE_PATH=$NM_DUMP_CONFIG_PATH
    NM_EFFECTIVE_JSON=$(nm_json_str "$NM_EFFECTIVE_PATH")
}

# ---------------------------------------------------------------------------
# Credentials: registry.configs auth tables in config.toml (config mode), and
# the probe headers and ctr hosts files of hosts mode
#
# Passwords arrive in here-documents of the generated tail, and the script
# keeps them in files of its private scratch directory. They never reach a
# command line or the environment: awk reads them from those files, curl from
# its config file, and ctr and containerd from hosts.toml and config.toml.

# Marker comment before every auth table nexus-mirror writes to config.toml.
NM_AUTH_MARKER='# Managed by nexus-mirror: credentials for '

# Stage one registry.configs auth table for config mode: host $1 (host[:port]
# as containerd contacts it), user name $2, password on the first line of
# stdin.
nm_config_auth() {
    nm_stage_init
    if [ $# -ne 2 ] || [ -z "$1" ] || [ -z "$2" ]; then
        nm_fail "check settings" "nm_config_auth needs a host and a user name" "Regenerate the node input"
    fi
    IFS= read -r _ca_password || [ -n "$_ca_password" ] ||
        nm_fail "check settings" "nm_config_auth for $1 got no password" "Regenerate the node input"
    for _ca_value in "$1" "$2" "$_ca_password"; do
        if [ "$(printf '%s' "$_ca_value" | LC_ALL=C tr -d '\000-\037\177')" != "$_ca_value" ]; then
            nm_fail "check settings" "the credentials for $(nm_oneline "$1") contain a control character" \
                "Set the user name and password without one"
        fi
    done
    printf '%s\t%s\t%s\n' "$1" "$2" "$_ca_password" >>"$NM_STAGE/config-auth.tsv"
    _ca_password=
}

# Print the hosts of the staged auth tables, separated by spaces.
nm_config_auth_hosts() {
    [ -f "$NM_STAGE/config-auth.tsv" ] || return 0
    awk -F '\t' '{ printf "%s%s", sep, $1; sep = " " }' "$NM_STAGE/config-auth.tsv"
}

# Print the awk functions that keep the auth tables of config.toml in line
# with the staged ones (NM_P_AUTH names the file, empty for none). The
# patcher calls auth_load() in BEGIN and auth_scan() once the section `sect`
# is set. It skips the lines in D when it prints, and calls auth_emit() last.
# A managed table is the marker line, its own header and the lines up to the
# next header or marker. Each run drops every managed table and appends the
# staged ones at the end of the file, so a second run changes nothing.
nm_awk_auth_lib() {
    cat <<'NM_AWK_EOF'
function auth_load(file,    line, f) {
    auth_n = 0
    auth_marker = ENVIRON["NM_P_MARKER"]
    if (file == "") return
    while ((getline line < file) > 0) {
        if (split(line, f, "\t") != 3) continue
        auth_n++
        auth_host[auth_n] = f[1]; auth_user[auth_n] = f[2]; auth_pass[auth_n] = f[3]
        auth_wanted[f[1]] = 1
    }
    close(file)
}
# Succeed for the table of an auth block: <any registry section>.configs.<host>.auth.
function auth_own_table(t,    n, parts) {
    n = split(t, parts, SUBSEP)
    return n >= 4 && parts[n] == "auth" && parts[n - 2] == "configs" && parts[n - 3] == "registry"
}
function auth_scan(    k, inblock, own, prefix, p, h, i, rest) {
    tl_reset(); inblock = 0; auth_dropped = 0
    prefix = sect SUBSEP "configs" SUBSEP
    for (k = 1; k <= nl; k++) {
        if (tl_ml == "" && tl_depth == 0 && index(L[k], auth_marker) == 1) {
            inblock = 1; own = 0; D[k] = 1; auth_dropped++
            # The blank line that auth_emit writes before each table goes too.
            if (k > 1 && L[k - 1] ~ /^[ \t\r]*$/) D[k - 1] = 1
            tl_line(L[k])
            continue
        }
        tl_line(L[k])
        if (inblock) {
            if (tl_kind != "header") { D[k] = 1; continue }
            if (!own && tl_hdr_ok && auth_own_table(tl_table)) { own = 1; D[k] = 1; continue }
            inblock = 0
        }
        if (tl_kind == "header" && tl_hdr_ok) p = tl_table
        else if (tl_kind == "kv") p = tl_path
        else continue
        if (substr(p, 1, length(prefix)) != prefix) continue
        h = substr(p, length(prefix) + 1); i = index(h, SUBSEP)
        rest = i ? substr(h, i + 1) : ""
        if (i) h = substr(h, 1, i - 1)
        if (!(h in auth_wanted)) continue
        if (rest == "auth" || substr(rest, 1, 5) == "auth" SUBSEP || (rest == "" && tl_kind == "kv"))
            reject("config.toml already sets registry.configs." toml_quote(h) ".auth on line " k ", and nexus-mirror writes the credentials for " h " there", \
                "Remove those credentials from config.toml, or use auth: header for this mirror")
    }
    if (tl_ml != "") return
    meta("auth", auth_n)
}
function auth_emit(    i, base) {
    base = substr(header_of(ver), 1, length(header_of(ver)) - 1)
    for (i = 1; i <= auth_n; i++) {
        print ""
        print auth_marker auth_host[i] " (rewritten on every apply)"
        print base ".configs." toml_quote(auth_host[i]) ".auth]"
        print "  username = " toml_quote(auth_user[i])
        print "  password = " toml_quote(auth_pass[i])
    }
}
NM_AWK_EOF
}

# Fail unless the `containerd config dump` just read (NM_DUMP_AUTH) has an
# auth table for every staged host.
nm_check_candidate_auth() {
    for _cc_host in $(nm_config_auth_hosts); do
        case " $NM_DUMP_AUTH " in
        *" $_cc_host "*) ;;
        *)
            nm_fail "check config.toml" "with the credentials for $_cc_host written to $NM_PATCH_SECTION, containerd still reads no registry.configs auth for that host" \
                "Check how config.toml sets registry.configs (an inline table cannot be extended), then run again. config.toml was not changed"
            ;;
        esac
    done
}

# Print the mode for the new config.toml: 0600 when it contains staged
# credentials, else $1. Its backups keep its mode, so a backup that contains
# a password is 0600 too.
nm_config_file_mode() {
    if [ -s "$NM_STAGE/config-auth.tsv" ]; then
        echo 0600
    else
        echo "$1"
    fi
}

# Make config.toml $1 mode 0600 when it contains staged credentials and is
# readable by others. A change of mode alone needs no restart.
nm_protect_config_file() {
    [ -s "$NM_STAGE/config-auth.tsv" ] || return 0
    [ "$(nm_file_mode "$1")" != 0600 ] || return 0
    chmod 0600 "$1" || nm_fail "write config.toml" "cannot make $1 mode 0600, and it holds registry credentials" \
        "Run: chmod 0600 $1"
    nm_log "made $1 mode 0600 because it holds registry credentials"
}

# Print the part of the config message about credentials: the hosts of the
# staged auth tables, or their removal in config-delete mode.
nm_config_auth_note() {
    if [ -n "${NM_CONFIG_DELETE-}" ]; then
        printf ', removed the registry credentials nexus-mirror wrote'
    elif [ -s "$NM_STAGE/config-auth.tsv" ]; then
        printf ' with registry credentials for %s' "$(nm_config_auth_hosts)"
        if [ "${NM_MAJOR:-1}" -ge 2 ]; then
            printf ' (containerd %s reads them but marks registry.configs as deprecated; auth: header avoids it)' "$NM_VERSION"
        fi
    fi
}

# config-delete mode: remove the auth tables that nexus-mirror wrote and keep
# config_path, with the validation, backup, restart and roll-back of config
# mode. Nothing is restarted when config.toml has no such table.
nm_mode_config_delete() {
    rm -f "$NM_STAGE/config-auth.tsv"
    NM_CONFIG_DELETE=1
    if [ "$NM_MANAGE_CONFIG" = false ] || [ ! -f "$NM_CONFIG_FILE" ] ||
        ! grep -q "^$NM_AUTH_MARKER" "$NM_CONFIG_FILE" 2>/dev/null; then
        nm_find_containerd
        NM_PATCH_VERSION=
        nm_effective_config_path
        _cd_msg="config.toml holds no credentials written by nexus-mirror; nothing changed"
        nm_log "$_cd_msg"
        nm_config_json false false "$(nm_cri_status)" "" "" "$_cd_msg"
        return 0
    fi
    nm_mode_config
}

# Stage the curl config for the probe registered last: an Authorization
# header line on stdin, so that the probe checks the credentials.
nm_probe_auth() {
    nm_stage_init
    [ "$NM_PROBE_COUNT" -gt 0 ] ||
        nm_fail "write hosts files" "nm_probe_auth comes before any nm_probe" "Regenerate the node input"
    cat >"$NM_STAGE/probe.$NM_PROBE_COUNT.auth"
}

# Print the credentials verdict of probe $1 with HTTP status $2: accepted,
# rejected (401 or 403 although credentials were sent) or null (none sent, or
# no HTTP status).
nm_probe_credentials() {
    if [ ! -f "$NM_STAGE/probe.$1.auth" ] || [ -z "$2" ]; then
        printf 'null'
        return 0
    fi
    case $2 in
    401 | 403) printf '"rejected"' ;;
    *) printf '"accepted"' ;;
    esac
}

# Stage the hosts.toml that ctr reads for namespace $1 in the test pull
# (stdin). The generated tail sends these only when some credentials use
# auth: config, which ctr cannot read from config.toml.
nm_verify_file() {
    nm_stage_init
    nm_check_plain_name "$1" namespace
    mkdir -p "$NM_STAGE/verify/$1" ||
        nm_fail "write hosts files" "cannot create $NM_STAGE/verify/$1" "Make ${TMPDIR:-/tmp} writable for root"
    cat >"$NM_STAGE/verify/$1/hosts.toml"
}

# Print the note for a failed test pull about mirrors that returned 401 or
# 403 ("denied" lines of the ctr facts file $1), or nothing.
nm_verify_denied_note() {
    _vd_hosts=$(awk -F '\t' '$1 == "denied" { printf "%s%s", sep, $2; sep = ", " }' "$1")
    [ -z "$_vd_hosts" ] ||
        printf '; %s: the mirror requires credentials, and they were missing or rejected' "$_vd_hosts"
}

# Print the hosts directory for ctr's test pull: the staged one of
# nm_verify_file when there is one, else NM_CONFIG_PATH.
nm_verify_hosts_dir() {
    if [ -d "$NM_STAGE/verify" ]; then
        printf '%s\n' "$NM_STAGE/verify"
    else
        printf '%s\n' "$NM_CONFIG_PATH"
    fi
}

# ---------------------------------------------------------------------------
# containerd: CRI plugin status, restart and log

# Print the CRI plugin status from `ctr plugins ls`: ok, error, skip or
# missing (no such plugin). On containerd 2.x the io.containerd.cri.v1 images
# plugin must be ok too. Prints nothing when containerd cannot be reached.
nm_cri_status() {
    [ -n "$NM_CTR" ] || return 0
    _cs_sock=${NM_ADDRESS#unix://}
    case $_cs_sock in
    /*) [ -S "$_cs_sock" ] || return 0 ;;
    esac
    _cs_out=$NM_WORK/plugins.out
    nm_with_timeout 15 "$NM_CTR" --address "$NM_ADDRESS" --connect-timeout 2s plugins ls \
        </dev/null >"$_cs_out" 2>/dev/null 9>&- || return 0
    awk -v major="${NM_MAJOR:-1}" '
        $1 == "io.containerd.grpc.v1" && $2 == "cri" { cri = $NF }
        $1 == "io.containerd.cri.v1" && $2 == "images" { images = $NF }
        END {
            if (cri == "") cri = "missing"
            if (major >= 2) {
                if (images == "") images = "missing"
                if (cri == "ok" && images != "ok") cri = images
            }
            print cri
        }' "$_cs_out"
}

# Print the error messages that `ctr plugins ls -d` shows for the CRI
# plugins, redacted, on one line.
nm_cri_error() {
    [ -n "$NM_CTR" ] || return 0
    nm_with_timeout 15 "$NM_CTR" --address "$NM_ADDRESS" --connect-timeout 2s plugins ls -d \
        </dev/null 2>/dev/null 9>&- | awk '
        $1 == "Type:" { type = $2 }
        $1 == "ID:" { id = $2 }
        $1 == "Message:" && ((type == "io.containerd.grpc.v1" && id == "cri") || (type == "io.containerd.cri.v1" && id == "images")) {
            sub(/^[ \t]*Message:[ \t]*/, ""); printf "%s%s", sep, $0; sep = "; "
        }' | nm_redact
}

# Wait until the CRI plugin reports ok, for at most NM_RESTART_TIMEOUT
# seconds. Sets NM_CRI_STATUS (empty when containerd was never reached).
# containerd serves its socket only after every plugin has loaded, so a
# status other than ok that repeats three times is final. With $1 =
# restarted, the plugin counts as ok only once a new containerd serves the
# socket (nm_socket_renewed change); NM_CRI_STALE=1 records that none did.
nm_wait_cri() {
    _wc_deadline=$(($(nm_epoch) + NM_RESTART_TIMEOUT))
    _wc_bad=0
    NM_CRI_STATUS=
    NM_CRI_STALE=
    while :; do
        NM_CRI_STATUS=$(nm_cri_status)
        case $NM_CRI_STATUS in
        ok)
            if [ "${1-}" != restarted ] || nm_socket_renewed change; then
                NM_CRI_STALE=
                return 0
            fi
            NM_CRI_STALE=1
            ;;
        '') ;;
        *)
            _wc_bad=$((_wc_bad + 1))
            [ "$_wc_bad" -lt 3 ] || return 1
            ;;
        esac
        [ "$(nm_epoch)" -lt "$_wc_deadline" ] || return 1
        nm_sleep_short
    done
}

# Record containerd's socket before a restart in the mark file named $1
# (its inode number, and the file's own mtime as the time of the mark).
nm_mark_socket() {
    NM_SOCKET_FILE=${NM_ADDRESS#unix://}
    # shellcheck disable=SC2012
    ls -di "$NM_SOCKET_FILE" 2>/dev/null | awk '{ print $1 }' >"$NM_WORK/socket.$1"
}

# Succeed when containerd's socket was created after mark $1: a starting
# containerd removes the old socket and binds a new one, which has a new
# inode number or a later mtime. An address that is not a path passes.
nm_socket_renewed() {
    _sr_file=${NM_ADDRESS#unix://}
    case $_sr_file in
    /*) ;;
    *) return 0 ;;
    esac
    [ -S "$_sr_file" ] || return 1
    # shellcheck disable=SC2012
    _sr_inode=$(ls -di "$_sr_file" 2>/dev/null | awk '{ print $1 }')
    [ "$_sr_inode" = "$(cat "$NM_WORK/socket.$1" 2>/dev/null)" ] || return 0
    [ -n "$(find "$_sr_file" -prune -newer "$NM_WORK/socket.$1" 2>/dev/null)" ]
}

# Run NM_RESTART_COMMAND with a time limit of NM_RESTART_TIMEOUT seconds and
# set NM_RESTART_CAUSE when it fails. Its stdin is /dev/null and the lock
# descriptor is closed, so that a daemon it starts does not keep the lock.
# Its output goes to a file and then to stderr: a process it leaves running
# with its output open cannot hold the SSH session open.
nm_restart() {
    nm_log "restarting containerd"
    NM_RESTART_CAUSE=
    _rs_out=$NM_WORK/restart.out
    nm_with_timeout "$NM_RESTART_TIMEOUT" sh -c "$NM_RESTART_COMMAND" </dev/null >"$_rs_out" 2>&1 9>&-
    _rs_rc=$?
    tail -n 20 "$_rs_out" | nm_redact | while IFS= read -r _rs_line; do
        nm_log "restart command: $_rs_line"
    done
    rm -f "$_rs_out"
    case $_rs_rc in
    0) return 0 ;;
    124 | 137)
        NM_RESTART_CAUSE="the restart command did not finish within $NM_RESTART_TIMEOUT s and was stopped"
        ;;
    *)
        NM_RESTART_CAUSE="the restart command failed with exit status $_rs_rc"
        ;;
    esac
    return 1
}

# Print recent containerd error lines from NM_LOG_COMMAND to stderr,
# redacted, at most 10: level=error and level=fatal lines, and failed loads
# of the CRI plugins, which containerd 1.6 logs at level=warning. Sets
# NM_LOG_CAUSE to the last fatal line or failed plugin load, the lines that
# explain a failed start.
nm_show_containerd_errors() {
    NM_LOG_CAUSE=
    [ -n "$NM_LOG_COMMAND" ] || return 0
    _se_log=$NM_WORK/containerd.log
    nm_with_timeout 30 sh -c "$NM_LOG_COMMAND" </dev/null >"$_se_log" 2>/dev/null 9>&-
    _se_lines=$NM_WORK/containerd.errors
    grep -e 'level=error' -e 'level=fatal' -e '"level":"error"' -e '"level":"fatal"' \
        -e 'failed to load plugin io.containerd.grpc.v1.cri' -e 'failed to load plugin io.containerd.cri.v1' \
        "$_se_log" 2>/dev/null | tail -n 10 | nm_redact >"$_se_lines"
    rm -f "$_se_log"
    while IFS= read -r _se_line; do
        nm_log "containerd log: $_se_line"
        case $_se_line in
        *level=fatal* | *'"level":"fatal"'* | *'failed to load plugin'*) NM_LOG_CAUSE=$_se_line ;;
        esac
    done <"$_se_lines"
}

# ---------------------------------------------------------------------------
# config mode

nm_mode_config() {
    nm_lock
    if [ "$NM_MANAGE_CONFIG" = false ]; then
        nm_config_report_only
        return 0
    fi
    nm_find_containerd required
    _cf_file=$NM_CONFIG_FILE
    _cf_dir=${_cf_file%/*}
    [ -n "$_cf_dir" ] || _cf_dir=/
    _cf_had_file=false
    # Renaming the new file over a symbolic link would replace the link and
    # leave the file it points to unchanged.
    if [ -L "$_cf_file" ]; then
        nm_fail "read config.toml" "$_cf_file is a symbolic link" \
            "Set the node's config.toml path to the file the link points to"
    fi
    if [ -e "$_cf_file" ]; then
        if [ ! -f "$_cf_file" ] || [ ! -r "$_cf_file" ]; then
            nm_fail "read config.toml" "$_cf_file is not a readable regular file" "Make $_cf_file a regular file readable by root"
        fi
        _cf_had_file=true
    elif [ ! -d "$_cf_dir" ]; then
        # Create the directory of a missing config.toml (0755, owner root).
        (umask 022 && mkdir -p "$_cf_dir") ||
            nm_fail "write config.toml" "cannot create the directory $_cf_dir" "Create $_cf_dir as root"
    fi

    # The candidate lives next to config.toml so that relative imports in it
    # resolve as they will for the real file. Candidates left by a killed run
    # are removed first.
    nm_sweep_temps "$_cf_dir" config.toml
    [ "${_cf_file##*/}" = config.toml ] || nm_sweep_temps "$_cf_dir" "${_cf_file##*/}"
    NM_CANDIDATE=$(mktemp "$_cf_dir/.config.toml.nexus-mirror.XXXXXX" 2>"$NM_WORK/mktemp.err") || {
        NM_CANDIDATE=
        nm_fail "write config.toml" "cannot create a temporary file in $_cf_dir: $(nm_last_error "$NM_WORK/mktemp.err")" \
            "Make $_cf_dir writable for root. config.toml was not changed"
    }
    nm_patch_config "$_cf_file" "$NM_MAJOR" "$NM_VERSION" "$NM_CONFIG_PATH" "$NM_CANDIDATE"
    case $? in
    0) ;;
    1) nm_fail "check config.toml" "$NM_REJECT_CAUSE" "$NM_REJECT_FIX. config.toml was not changed" ;;
    *) nm_fail "read config.toml" "cannot read $_cf_file" "Make $_cf_file a regular file readable by root" ;;
    esac
    _cf_section=$NM_PATCH_SECTION
    nm_log "config.toml version $NM_PATCH_VERSION, section $_cf_section: $NM_PATCH_ACTION config_path"
    nm_check_candidate "$NM_CANDIDATE"

    # A pending restart is one that an earlier run, killed or cut off after
    # it replaced config.toml, did not finish: containerd may still run the
    # previous file, or not run at all.
    _cf_pending=$NM_STATE_DIR/restart-pending
    _cf_changed=true
    if [ "$_cf_had_file" = true ] && cmp -s "$_cf_file" "$NM_CANDIDATE"; then
        rm -f "$NM_CANDIDATE"
        NM_CANDIDATE=
        _cf_changed=false
        if [ -e "$_cf_pending" ]; then
            # The earlier run saved the previous file before it wrote the marker.
            _cf_had_file=true
            grep -qx 'previous=none' "$_cf_pending" 2>/dev/null && _cf_had_file=false
            nm_log "config.toml already sets config_path, but the restart after an earlier change did not finish; restarting containerd"
        fi
    fi
    if [ "$_cf_changed" = true ] || [ -e "$_cf_pending" ]; then
        [ -n "$NM_RESTART_COMMAND" ] ||
            nm_fail "write config.toml" "config.toml must change but the restart command is empty" \
                "Set the containerd restart command for this node. config.toml was not changed"
    else
        nm_protect_config_file "$_cf_file"
        _cf_status=$(nm_cri_status)
        _cf_msg="config.toml already sets config_path = \"$NM_CONFIG_PATH\" in $_cf_section$(nm_config_auth_note); nothing changed"
        if [ "$_cf_status" != ok ]; then
            _cf_msg="$_cf_msg. Warning: the CRI plugin status is ${_cf_status:-unknown (containerd not reachable at $NM_ADDRESS)}"
        fi
        nm_log "$_cf_msg"
        nm_config_json false false "$_cf_status" "" "" "$_cf_msg"
        return 0
    fi

    if [ "$_cf_changed" = true ]; then
        # Without a pending restart, containerd must be healthy before the
        # change, so that a failure after the restart is known to be caused
        # by the change and the roll-back has a working state to return to.
        _cf_was_pending=false
        [ ! -e "$_cf_pending" ] || _cf_was_pending=true
        [ "$_cf_was_pending" = true ] || nm_check_running
        nm_backup_config "$_cf_file" "$_cf_had_file"
        if [ "$_cf_had_file" = true ]; then
            _cf_mode=$(nm_file_mode "$_cf_file")
            _cf_owner=$(nm_file_owner "$_cf_file")
            _cf_previous='file'
        else
            _cf_mode=0644
            _cf_owner=0:0
            _cf_previous=none
        fi
        _cf_mode=$(nm_config_file_mode "$_cf_mode")
        printf 'previous=%s\n' "$_cf_previous" >"$_cf_pending" ||
            nm_fail "write config.toml" "cannot write $_cf_pending" "Make $NM_STATE_DIR writable for root. config.toml was not changed"
        if ! chmod "$_cf_mode" "$NM_CANDIDATE" || { nm_is_root && ! chown "$_cf_owner" "$NM_CANDIDATE"; } ||
            ! mv -f "$NM_CANDIDATE" "$_cf_file" 2>"$NM_WORK/mv.err"; then
            [ "$_cf_was_pending" = true ] || rm -f "$_cf_pending"
            nm_fail "write config.toml" "cannot replace $_cf_file: $(nm_last_error "$NM_WORK/mv.err")" \
                "Check that $_cf_file and $_cf_dir are writable for root (not on a read-only mount). config.toml was not changed"
        fi
        NM_CANDIDATE=
        nm_log "wrote $_cf_file (backup of the previous file: $NM_STATE_DIR/config.toml.bak)"
    fi

    _cf_started=$(nm_now)
    _cf_step=
    nm_mark_socket change
    if ! nm_restart; then
        _cf_step="restart containerd"
        _cf_cause=$NM_RESTART_CAUSE
    elif ! nm_wait_cri restarted; then
        _cf_step="wait for CRI"
        if [ -z "$NM_CRI_STATUS" ]; then
            _cf_cause="containerd did not respond on $NM_ADDRESS within $NM_RESTART_TIMEOUT s after the restart"
        elif [ -n "$NM_CRI_STALE" ]; then
            _cf_cause="the restart command succeeded, but containerd was not restarted: its socket ${NM_ADDRESS#unix://} was not created again within $NM_RESTART_TIMEOUT s"
        else
            _cf_cause="the CRI plugin reports '$NM_CRI_STATUS' after the restart"
        fi
    fi
    _cf_finished=$(nm_now)
    if [ -n "$_cf_step" ]; then
        nm_rollback_config "$_cf_file" "$_cf_had_file" "$_cf_step" "$_cf_cause"
    fi
    rm -f "$_cf_pending"
    if [ "$_cf_changed" = true ]; then
        _cf_msg="set config_path = \"$NM_CONFIG_PATH\" in $_cf_section of $_cf_file$(nm_config_auth_note) and restarted containerd; the CRI plugin is ok"
    else
        _cf_msg="config.toml already sets config_path = \"$NM_CONFIG_PATH\" in $_cf_section; finished the restart of an earlier run that did not complete; the CRI plugin is ok"
    fi
    nm_log "$_cf_msg"
    nm_config_json "$_cf_changed" true ok "$_cf_started" "$_cf_finished" "$_cf_msg"
}

# Fail unless containerd responds on NM_ADDRESS and its CRI plugin is ok.
nm_check_running() {
    _cr_status=$(nm_cri_status)
    [ "$_cr_status" != ok ] || return 0
    if [ -z "$_cr_status" ]; then
        nm_fail "check containerd" "containerd does not respond on $NM_ADDRESS, so a restart with the new config.toml could not be checked against a working state" \
            "Start containerd, or set nexus-mirror:containerd.address to the socket it serves, and run again. config.toml was not changed"
    fi
    _cr_error=$(nm_cri_error)
    nm_fail "check containerd" "the CRI plugin reports '$_cr_status' before any change${_cr_error:+ (containerd: $_cr_error)}" \
        "Fix containerd until \`ctr plugins ls\` lists the CRI plugin as ok, then run again. config.toml was not changed"
}

# Print the last line of file $1 (an error output), redacted, on one line.
nm_last_error() {
    _le=$(tail -n 1 "$1" 2>/dev/null | nm_redact)
    printf '%s\n' "${_le:-no error message}"
}

# Remove temporary files that a killed run left in directory $1 next to
# file name $2: .NAME.nexus-mirror.XXXXXX from mktemp.
nm_sweep_temps() {
    for _st_file in "$1/.$2.nexus-mirror."??????; do
        if [ -f "$_st_file" ] && [ ! -L "$_st_file" ]; then
            rm -f "$_st_file" && nm_log "removed $_st_file, left by an earlier run"
        fi
    done
}

# Validate candidate $1 with `containerd config dump`. It is rejected (exit 1,
# config.toml untouched) unless containerd loads it, its effective
# config_path is NM_CONFIG_PATH and it has no registry setting that makes the
# CRI plugin fail beside config_path.
nm_check_candidate() {
    nm_read_dump "$1" "$NM_CONFIG_FILE (with config_path set)"
    if [ "$NM_DUMP_OK" != true ]; then
        nm_log "containerd config dump: $NM_DUMP_ERROR"
        nm_fail "check config.toml" "containerd cannot load config.toml with config_path set: $NM_DUMP_ERROR" \
            "Fix config.toml so that \`containerd -c $NM_CONFIG_FILE config dump\` succeeds, then run again. config.toml was not changed"
    fi
    if [ "$(nm_strip_slashes "$NM_DUMP_CONFIG_PATH")" != "$NM_CONFIG_PATH" ]; then
        nm_fail "check config.toml" "with config_path set in $NM_PATCH_SECTION, containerd still reads config_path = \"$NM_DUMP_CONFIG_PATH\": the file sets the registry in a form nexus-mirror cannot edit (an inline table, or an imported file that overrides it)" \
            "Set config_path = \"$NM_CONFIG_PATH\" in $NM_PATCH_SECTION of $NM_CONFIG_FILE by hand and run again. config.toml was not changed"
    fi
    if [ -n "$NM_DUMP_MIRRORS" ]; then
        nm_fail "check config.toml" "config.toml sets deprecated registry.mirrors for $NM_DUMP_MIRRORS, which conflicts with config_path (the CRI plugin fails to load when both are set)" \
            "Move these mirrors to nexus-mirror:registries and delete the registry.mirrors tables from config.toml. config.toml was not changed"
    fi
    if [ -n "$NM_DUMP_TLS" ] && [ "$NM_MAJOR" -lt 2 ]; then
        nm_fail "check config.toml" "config.toml sets registry.configs.<host>.tls for $NM_DUMP_TLS, which containerd $NM_VERSION rejects together with config_path (the CRI plugin fails to load)" \
            "Use ca, skipVerify and client per registry in nexus-mirror:registries and delete the registry.configs.<host>.tls tables from config.toml. config.toml was not changed"
    fi
    nm_check_candidate_auth
    NM_EFFECTIVE_PATH=$NM_DUMP_CONFIG_PATH
    NM_EFFECTIVE_JSON=$(nm_json_str "$NM_EFFECTIVE_PATH")
}

# Save config.toml before it is replaced: config.toml.orig keeps the first
# original (config.toml.orig-absent records that there was none) and
# config.toml.bak the latest previous file.
nm_backup_config() {
    _bc_orig=$NM_STATE_DIR/config.toml.orig
    _bc_bak=$NM_STATE_DIR/config.toml.bak
    nm_sweep_temps "$NM_STATE_DIR" config.toml.orig
    nm_sweep_temps "$NM_STATE_DIR" config.toml.bak
    if [ "$2" = true ]; then
        if [ ! -e "$_bc_orig" ] && [ ! -e "$_bc_orig-absent" ]; then
            nm_copy_file "$1" "$_bc_orig" ||
                nm_fail "write config.toml" "cannot back up $1 to $_bc_orig" "Make $NM_STATE_DIR writable for root. config.toml was not changed"
        fi
        nm_copy_file "$1" "$_bc_bak" ||
            nm_fail "write config.toml" "cannot back up $1 to $_bc_bak" "Make $NM_STATE_DIR writable for root. config.toml was not changed"
    else
        if [ ! -e "$_bc_orig" ] && [ ! -e "$_bc_orig-absent" ]; then
            : >"$_bc_orig-absent"
        fi
        rm -f "$_bc_bak"
    fi
}

# Put back the previous config.toml (or remove the created one), restart and
# wait for CRI again, then exit 1 naming step $3 and cause $4. The pending
# restart marker is removed once containerd is known to run the restored file.
nm_rollback_config() {
    nm_show_containerd_errors
    _rb_cri=$(nm_cri_error)
    _rb_detail=
    if [ -n "$_rb_cri" ]; then
        _rb_detail=" (containerd: $_rb_cri)"
    elif [ -n "$NM_LOG_CAUSE" ]; then
        _rb_detail=" (containerd log: $NM_LOG_CAUSE)"
    fi
    nm_log "rolling back $1"
    if [ "$2" = true ]; then
        nm_copy_file "$NM_STATE_DIR/config.toml.bak" "$1" ||
            nm_fail "roll back config.toml" "$4$_rb_detail, and restoring $1 from $NM_STATE_DIR/config.toml.bak failed" \
                "Copy $NM_STATE_DIR/config.toml.bak to $1 by hand and restart containerd"
        _rb_what="$1 was restored from $NM_STATE_DIR/config.toml.bak"
    else
        rm -f "$1" ||
            nm_fail "roll back config.toml" "$4$_rb_detail, and removing the new $1 failed" "Remove $1 by hand and restart containerd"
        _rb_what="the new $1 was removed"
    fi
    nm_mark_socket rollback
    if ! nm_restart; then
        # containerd runs the restored file when it restarted after the
        # restore, or never restarted at all.
        if [ "$(nm_cri_status)" = ok ]; then
            if nm_socket_renewed rollback; then
                rm -f "$NM_STATE_DIR/restart-pending"
                nm_fail "$3" "$4$_rb_detail; $_rb_what. The restart command failed again ($NM_RESTART_CAUSE), but containerd restarted with the restored file and the CRI plugin is ok" \
                    "Fix the restart command for this node and run again"
            fi
            if ! nm_socket_renewed change; then
                rm -f "$NM_STATE_DIR/restart-pending"
                nm_fail "$3" "$4$_rb_detail; $_rb_what, and containerd, which was not restarted, still runs the previous configuration with the CRI plugin ok" \
                    "Fix the restart command for this node and run again"
            fi
        fi
        nm_fail "roll back config.toml" "$4$_rb_detail; $_rb_what but the restart command failed again: $NM_RESTART_CAUSE" \
            "Check containerd on the node (see the containerd log lines above) and restart it by hand"
    fi
    if ! nm_wait_cri; then
        nm_fail "roll back config.toml" "$4$_rb_detail; $_rb_what but the CRI plugin still reports '${NM_CRI_STATUS:-no response}', so containerd fails with the previous file too (changed after containerd last started, or broken for another reason)" \
            "Check containerd on the node (see the containerd log lines above) and restart it by hand"
    fi
    rm -f "$NM_STATE_DIR/restart-pending"
    nm_fail "$3" "$4$_rb_detail; $_rb_what, and after the restart command ran again the CRI plugin is ok" \
        "Fix the cause shown in the containerd log lines above and run again"
}

# Print the config report. $1 configChanged, $2 restarted, $3 criPlugin,
# $4 and $5 restart timestamps (empty = null), $6 message.
nm_config_json() {
    printf '{"mode":"config","node":%s,"containerdVersion":%s,"configFile":%s,"configVersion":%s,"configPath":%s,"configChanged":%s,"restarted":%s,"criPlugin":%s,"restartStartedAt":%s,"restartFinishedAt":%s,"message":%s}\n' \
        "$(nm_json_str "$NM_NODE")" "$(nm_json_str_or_null "$NM_VERSION")" "$(nm_json_str "$NM_CONFIG_FILE")" \
        "${NM_PATCH_VERSION:-null}" "$NM_EFFECTIVE_JSON" "$1" "$2" \
        "$(nm_json_str_or_null "$3")" "${4:-null}" "${5:-null}" "$(nm_json_str "$6")"
}

# Report containerd's config_path without changing config.toml (config mode
# with NM_MANAGE_CONFIG=false).
nm_config_report_only() {
    nm_find_containerd
    NM_PATCH_VERSION=
    if [ -n "$NM_CONTAINERD" ] && [ -n "$NM_VERSION" ] && [ -f "$NM_CONFIG_FILE" ]; then
        nm_patch_config "$NM_CONFIG_FILE" "$NM_MAJOR" "$NM_VERSION" "$NM_CONFIG_PATH" "$NM_WORK/candidate.toml"
    fi
    nm_effective_config_path
    _ro_status=$(nm_cri_status)
    _ro_msg="config.toml is not managed for this node and was not changed"
    if [ -z "$NM_CONTAINERD" ]; then
        _ro_msg="$_ro_msg; containerd is not on PATH"
    elif [ "$NM_EFFECTIVE_JSON" = null ]; then
        _ro_msg="$_ro_msg. Warning: containerd cannot load $NM_CONFIG_FILE (missing or invalid), so its config_path is unknown"
    elif [ "$(nm_strip_slashes "$NM_EFFECTIVE_PATH")" != "$NM_CONFIG_PATH" ]; then
        _ro_msg="$_ro_msg. Warning: containerd's config_path is \"$NM_EFFECTIVE_PATH\", not \"$NM_CONFIG_PATH\", so the CRI plugin does not read the hosts files nexus-mirror writes"
    fi
    nm_log "$_ro_msg"
    nm_config_json false false "$_ro_status" "" "" "$_ro_msg"
}

# ---------------------------------------------------------------------------
# hosts and delete modes: managed files
#
# The manifest $NM_STATE_DIR/managed has one line per file nexus-mirror wrote,
# "<sha256> <absolute path>", and one per directory it created,
# "dir <absolute path>". A path may appear with several hashes while a run is
# under way. A file found in place of a managed one is saved once to
# $NM_STATE_DIR/backup/<namespace>/<name> and restored when the file is no
# longer managed. Steps run in an order that leaves the node usable when a run
# is killed: backups, then a manifest that also lists the files about to be
# written, then the files, then removals and restores, then the final manifest.

# Succeed when manifest $1 lists file $2 (with hash $3 when given).
nm_manifest_has() {
    NM_M_PATH=$2 NM_M_SHA=${3-} awk '
        BEGIN { p = ENVIRON["NM_M_PATH"]; s = ENVIRON["NM_M_SHA"]; missing = 1 }
        {
            i = index($0, " "); h = substr($0, 1, i - 1); q = substr($0, i + 1)
            if (h != "dir" && q == p && (s == "" || s == h)) { missing = 0; exit }
        }
        END { exit missing }' "$1"
}

# Append {"path","sha256","action"} to the files list and count the change.
nm_record_file() {
    printf '{"path":%s,"sha256":%s,"action":"%s"}\n' "$(nm_json_str "$1")" "$(nm_json_str_or_null "$2")" "$3" \
        >>"$NM_WORK/files.json"
    case $3 in
    written) NM_COUNT_WRITTEN=$((NM_COUNT_WRITTEN + 1)) ;;
    removed) NM_COUNT_REMOVED=$((NM_COUNT_REMOVED + 1)) ;;
    restored) NM_COUNT_RESTORED=$((NM_COUNT_RESTORED + 1)) ;;
    kept-modified) NM_COUNT_KEPT=$((NM_COUNT_KEPT + 1)) ;;
    unchanged) NM_COUNT_UNCHANGED=$((NM_COUNT_UNCHANGED + 1)) ;;
    esac
}

# Succeed when a staged file with namespace $1 and name $2 owns the backup
# slot of that name: its backup was saved in this run, or it was already
# managed before the run.
nm_slot_owned_by_staged() {
    _so_i=1
    while [ "$_so_i" -le "$NM_FILE_COUNT" ]; do
        _so_f=$NM_STAGE/file.$_so_i
        if [ "$(cat "$_so_f.ns")" = "$1" ] && [ "$(cat "$_so_f.name")" = "$2" ]; then
            [ -e "$_so_f.saved" ] && return 0
            nm_manifest_has "$NM_WORK/manifest.old" "$(cat "$_so_f.target")" && return 0
        fi
        _so_i=$((_so_i + 1))
    done
    return 1
}

# Stop managing file $1: remove it when its hash is one nexus-mirror wrote,
# keep it when it was changed since, then restore its backup if it has one.
nm_release_file() {
    _rl_path=$1
    _rl_dir=${_rl_path%/*}
    _rl_name=${_rl_path##*/}
    _rl_ns=${_rl_dir##*/}
    _rl_slot=$NM_STATE_DIR/backup/$_rl_ns/$_rl_name
    if [ -L "$_rl_path" ] || { [ -e "$_rl_path" ] && [ ! -f "$_rl_path" ]; }; then
        nm_log "kept $_rl_path: it was replaced by something that is not a regular file"
        nm_record_file "$_rl_path" "" kept-modified
        return 0
    fi
    if [ -f "$_rl_path" ]; then
        _rl_sha=$(nm_sha256 "$_rl_path") || nm_fail "$NM_FILES_STEP" "cannot read $_rl_path" "Check the file and run again"
        if nm_manifest_has "$NM_WORK/manifest.old" "$_rl_path" "$_rl_sha"; then
            rm -f "$_rl_path" || nm_fail "$NM_FILES_STEP" "cannot remove $_rl_path" "Remove it by hand and run again"
            nm_record_file "$_rl_path" "$_rl_sha" removed
        else
            _rl_note=
            [ ! -e "$_rl_slot" ] || _rl_note="; the file it replaced is saved as $_rl_slot"
            nm_log "kept $_rl_path: it was changed after nexus-mirror wrote it$_rl_note"
            nm_record_file "$_rl_path" "$_rl_sha" kept-modified
            return 0
        fi
    fi
    [ -f "$_rl_slot" ] || return 0
    if nm_slot_owned_by_staged "$_rl_ns" "$_rl_name"; then
        return 0
    fi
    if [ ! -d "$_rl_dir" ]; then
        (umask 022 && mkdir -p "$_rl_dir") || nm_fail "$NM_FILES_STEP" "cannot create $_rl_dir to restore $_rl_path" "Create it by hand and run again"
    fi
    nm_copy_file "$_rl_slot" "$_rl_path" ||
        nm_fail "$NM_FILES_STEP" "cannot restore $_rl_path from $_rl_slot" "Copy the backup by hand and run again"
    rm -f "$_rl_slot"
    rmdir "$NM_STATE_DIR/backup/$_rl_ns" 2>/dev/null
    nm_record_file "$_rl_path" "$(nm_sha256 "$_rl_path")" restored
}

# Copy file $1 to a new temporary file next to file $2, with mode $3 and
# owner $4 (uid:gid, skipped when not running as root). Sets NM_STAGED_TMP to
# its path, or NM_WRITE_ERROR on failure. nm_cleanup removes it unless it
# was renamed.
nm_stage_write() {
    _sg_dir=${2%/*}
    _sg_err=$NM_WORK/write.err
    _sg_tmp=$(mktemp "$_sg_dir/.${2##*/}.nexus-mirror.XXXXXX" 2>"$_sg_err") || {
        NM_WRITE_ERROR=$(nm_last_error "$_sg_err")
        return 1
    }
    printf '%s\n' "$_sg_tmp" >>"$NM_WORK/temps"
    if cat "$1" >"$_sg_tmp" 2>"$_sg_err" && chmod "$3" "$_sg_tmp" 2>"$_sg_err" &&
        { [ -z "$4" ] || ! nm_is_root || chown "$4" "$_sg_tmp" 2>"$_sg_err"; }; then
        NM_STAGED_TMP=$_sg_tmp
        return 0
    fi
    NM_WRITE_ERROR=$(nm_last_error "$_sg_err")
    return 1
}

# Write manifest $1 to $NM_STATE_DIR/managed atomically (mode 0600).
nm_install_manifest() {
    nm_install_file "$1" "$NM_STATE_DIR/managed" 0600 "" ||
        nm_fail "$NM_FILES_STEP" "cannot write the manifest $NM_STATE_DIR/managed" "Make $NM_STATE_DIR writable for root"
}

# Bring the hosts files in line with the staged ones. $1 is apply (hosts
# mode) or delete (delete mode, where no file is kept).
nm_sync_files() {
    _sy_manifest=$NM_STATE_DIR/managed
    _sy_old=$NM_WORK/manifest.old
    _sy_staged_paths=$NM_WORK/staged.paths
    _sy_newdirs=$NM_WORK/dirs.new
    NM_COUNT_WRITTEN=0
    NM_COUNT_REMOVED=0
    NM_COUNT_RESTORED=0
    NM_COUNT_KEPT=0
    NM_COUNT_UNCHANGED=0
    NM_DIRS_CHANGED=0
    : >"$NM_WORK/files.json"
    : >"$_sy_staged_paths"
    : >"$_sy_newdirs"
    if [ -f "$_sy_manifest" ]; then
        cp "$_sy_manifest" "$_sy_old" || nm_fail "$NM_FILES_STEP" "cannot read $_sy_manifest" "Check $NM_STATE_DIR"
    else
        : >"$_sy_old"
    fi
    # Temporary files that a killed run left next to the files it managed.
    nm_sweep_temps "$NM_STATE_DIR" managed
    while IFS=' ' read -r _sy_h _sy_line; do
        [ "$_sy_h" = dir ] || nm_sweep_temps "${_sy_line%/*}" "${_sy_line##*/}"
    done <"$_sy_old"
    [ "$1" = apply ] || NM_FILE_COUNT=0

    # Plan: target paths, hashes, files to take over, directories to create.
    _sy_i=1
    while [ "$_sy_i" -le "$NM_FILE_COUNT" ]; do
        _sy_f=$NM_STAGE/file.$_sy_i
        _sy_ns=$(cat "$_sy_f.ns")
        _sy_target=$NM_CONFIG_PATH/$_sy_ns/$(cat "$_sy_f.name")
        printf '%s' "$_sy_target" >"$_sy_f.target"
        printf '%s\n' "$_sy_target" >>"$_sy_staged_paths"
        nm_sweep_temps "${_sy_target%/*}" "${_sy_target##*/}"
        nm_sha256 "$_sy_f.data" >"$_sy_f.sha"
        if [ -L "$_sy_target" ] || { [ -e "$_sy_target" ] && [ ! -f "$_sy_target" ]; }; then
            nm_fail "$NM_FILES_STEP" "$_sy_target exists and is not a regular file" "Move it out of the way and run again"
        fi
        if [ -e "$_sy_target" ] && ! nm_manifest_has "$_sy_old" "$_sy_target"; then
            : >"$_sy_f.takeover"
        fi
        _sy_d=$NM_CONFIG_PATH/$_sy_ns
        _sy_missing=
        while [ -n "$_sy_d" ] && [ ! -d "$_sy_d" ]; do
            if [ -e "$_sy_d" ] || [ -L "$_sy_d" ]; then
                nm_fail "$NM_FILES_STEP" "$_sy_d exists and is not a directory" "Move it out of the way and run again"
            fi
            _sy_missing="$_sy_d$NM_NL$_sy_missing"
            _sy_d=${_sy_d%/*}
        done
        printf '%s' "$_sy_missing" | while IFS= read -r _sy_line; do
            [ -n "$_sy_line" ] || continue
            grep -qxF "dir $_sy_line" "$_sy_newdirs" || printf 'dir %s\n' "$_sy_line" >>"$_sy_newdirs"
        done
        _sy_i=$((_sy_i + 1))
    done

    # The interim manifest lists old entries, directories about to be created
    # and the files about to be written, so a killed run leaves no file that
    # the next run takes for someone else's.
    # It is skipped when the old manifest already lists every one of them.
    _sy_entries=$NM_WORK/manifest.entries
    cp "$_sy_newdirs" "$_sy_entries"
    _sy_i=1
    while [ "$_sy_i" -le "$NM_FILE_COUNT" ]; do
        printf '%s %s\n' "$(cat "$NM_STAGE/file.$_sy_i.sha")" "$(cat "$NM_STAGE/file.$_sy_i.target")" >>"$_sy_entries"
        _sy_i=$((_sy_i + 1))
    done
    if NM_OLD=$_sy_old awk '
        BEGIN { while ((getline line < ENVIRON["NM_OLD"]) > 0) listed[line] = 1 }
        !($0 in listed) { missing = 1; exit }
        END { exit !missing }' "$_sy_entries"; then
        cat "$_sy_old" "$_sy_entries" >"$NM_WORK/manifest.interim"
        nm_install_manifest "$NM_WORK/manifest.interim"
    fi

    # Back up files found in place of staged ones. A backup slot still used
    # by a managed file of an earlier hosts directory is freed first.
    : >"$NM_WORK/released"
    _sy_i=1
    while [ "$_sy_i" -le "$NM_FILE_COUNT" ]; do
        _sy_f=$NM_STAGE/file.$_sy_i
        if [ -e "$_sy_f.takeover" ]; then
            _sy_ns=$(cat "$_sy_f.ns")
            _sy_name=$(cat "$_sy_f.name")
            _sy_target=$(cat "$_sy_f.target")
            _sy_slot=$NM_STATE_DIR/backup/$_sy_ns/$_sy_name
            if [ -e "$_sy_slot" ]; then
                NM_R_NS=$_sy_ns NM_R_NAME=$_sy_name NM_R_TARGET=$_sy_target awk '
                    BEGIN { suffix = "/" ENVIRON["NM_R_NS"] "/" ENVIRON["NM_R_NAME"] }
                    {
                        i = index($0, " "); h = substr($0, 1, i - 1); q = substr($0, i + 1)
                        if (h != "dir" && q != ENVIRON["NM_R_TARGET"] && substr(q, length(q) - length(suffix) + 1) == suffix && !seen[q]++) print q
                    }' "$_sy_old" >"$NM_WORK/owners"
                while IFS= read -r _sy_owner; do
                    nm_release_file "$_sy_owner"
                    printf '%s\n' "$_sy_owner" >>"$NM_WORK/released"
                done <"$NM_WORK/owners"
            fi
            nm_sweep_temps "${_sy_slot%/*}" "$_sy_name"
            if [ -e "$_sy_slot" ]; then
                nm_log "keeping the existing backup $_sy_slot; $_sy_target is not backed up again"
            else
                if ! (umask 077 && mkdir -p "$NM_STATE_DIR/backup/$_sy_ns") ||
                    ! nm_copy_file "$_sy_target" "$_sy_slot"; then
                    nm_fail "$NM_FILES_STEP" "cannot back up $_sy_target to $_sy_slot" "Make $NM_STATE_DIR writable for root"
                fi
                : >"$_sy_f.saved"
                nm_log "saved $_sy_target as $_sy_slot; it is restored when nexus-mirror stops managing the file"
            fi
        fi
        _sy_i=$((_sy_i + 1))
    done

    # Create directories and write the staged files.
    while IFS= read -r _sy_line; do
        _sy_d=${_sy_line#dir }
        if [ ! -d "$_sy_d" ]; then
            (umask 022 && mkdir "$_sy_d") 2>"$NM_WORK/mkdir.err" ||
                nm_fail "$NM_FILES_STEP" "cannot create the directory $_sy_d: $(nm_last_error "$NM_WORK/mkdir.err")" \
                    "Check that ${_sy_d%/*} is writable for root and run again. No hosts file was changed"
            NM_DIRS_CHANGED=1
        fi
    done <"$_sy_newdirs"
    # Every changed file is first written to a temporary file next to it.
    # Only when all of them are written are they renamed into place, so a
    # full disk or a read-only directory leaves every old file as it was.
    _sy_final=$NM_WORK/manifest.final
    : >"$_sy_final"
    _sy_i=1
    while [ "$_sy_i" -le "$NM_FILE_COUNT" ]; do
        _sy_f=$NM_STAGE/file.$_sy_i
        _sy_target=$(cat "$_sy_f.target")
        _sy_sha=$(cat "$_sy_f.sha")
        _sy_mode=$(cat "$_sy_f.mode")
        if [ -f "$_sy_target" ] && cmp -s "$_sy_f.data" "$_sy_target" &&
            [ "$(nm_file_mode "$_sy_target")" = "$(printf '%04o' "0$_sy_mode")" ] &&
            { ! nm_is_root || [ "$(nm_file_owner "$_sy_target")" = 0:0 ]; }; then
            nm_record_file "$_sy_target" "$_sy_sha" unchanged
        else
            nm_stage_write "$_sy_f.data" "$_sy_target" "$_sy_mode" 0:0 ||
                nm_fail "$NM_FILES_STEP" "cannot write $_sy_target: $NM_WRITE_ERROR" \
                    "Check that ${_sy_target%/*} is writable for root and has free space. No hosts file was changed"
            printf '%s' "$NM_STAGED_TMP" >"$_sy_f.tmp"
            nm_record_file "$_sy_target" "$_sy_sha" written
        fi
        printf '%s %s\n' "$_sy_sha" "$_sy_target" >>"$_sy_final"
        _sy_i=$((_sy_i + 1))
    done
    # hosts.toml files go last, after the certificate files they name.
    for _sy_pass in files hosts; do
        _sy_i=1
        while [ "$_sy_i" -le "$NM_FILE_COUNT" ]; do
            _sy_f=$NM_STAGE/file.$_sy_i
            _sy_i=$((_sy_i + 1))
            [ -f "$_sy_f.tmp" ] || continue
            _sy_name=$(cat "$_sy_f.name")
            if [ "$_sy_name" = hosts.toml ]; then
                [ "$_sy_pass" = hosts ] || continue
            else
                [ "$_sy_pass" = files ] || continue
            fi
            _sy_tmp=$(cat "$_sy_f.tmp")
            _sy_target=$(cat "$_sy_f.target")
            mv -f "$_sy_tmp" "$_sy_target" 2>"$NM_WORK/mv.err" ||
                nm_fail "$NM_FILES_STEP" "cannot rename $_sy_tmp to $_sy_target: $(nm_last_error "$NM_WORK/mv.err")" \
                    "Check ${_sy_target%/*} and run again"
        done
    done

    # Release managed files that are no longer staged.
    NM_W=$_sy_staged_paths NM_D=$NM_WORK/released awk '
        BEGIN {
            while ((getline line < ENVIRON["NM_W"]) > 0) skip[line] = 1
            while ((getline line < ENVIRON["NM_D"]) > 0) skip[line] = 1
        }
        {
            i = index($0, " "); h = substr($0, 1, i - 1); q = substr($0, i + 1)
            if (h != "dir" && !(q in skip) && !seen[q]++) print q
        }' "$_sy_old" >"$NM_WORK/obsolete"
    while IFS= read -r _sy_line; do
        nm_release_file "$_sy_line"
    done <"$NM_WORK/obsolete"

    # Remove created directories that no staged file needs once they are
    # empty, deepest first. A directory that is not empty stays listed.
    cat "$_sy_old" "$_sy_newdirs" | awk '
        index($0, "dir ") == 1 && !seen[$0]++ { d = substr($0, 5); print length(d) "\t" d }' |
        sort -rn | cut -f 2- >"$NM_WORK/dirs.all"
    : >"$NM_WORK/dirs.keep"
    while IFS= read -r _sy_d; do
        if NM_D="$_sy_d/" awk 'BEGIN { d = ENVIRON["NM_D"]; n = length(d) }
            substr($0, 1, n) == d { found = 1; exit } END { exit !found }' "$_sy_staged_paths"; then
            printf 'dir %s\n' "$_sy_d" >>"$NM_WORK/dirs.keep"
        elif [ -d "$_sy_d" ]; then
            if rmdir "$_sy_d" 2>/dev/null; then
                NM_DIRS_CHANGED=1
                nm_log "removed the empty directory $_sy_d"
            else
                printf 'dir %s\n' "$_sy_d" >>"$NM_WORK/dirs.keep"
            fi
        fi
    done <"$NM_WORK/dirs.all"

    if [ "$1" = delete ]; then
        if [ -e "$_sy_manifest" ]; then
            rm -f "$_sy_manifest" || nm_fail "$NM_FILES_STEP" "cannot remove $_sy_manifest" "Remove it by hand"
        fi
        if [ -s "$NM_WORK/dirs.keep" ]; then
            nm_log "kept directories that are not empty: $(sed 's/^dir //' "$NM_WORK/dirs.keep" | tr '\n' ' ')"
        fi
    else
        # Top-down order, as they were created.
        sort "$NM_WORK/dirs.keep" >"$_sy_final.dirs"
        cat "$_sy_final.dirs" "$_sy_final" >"$_sy_final.all"
        if ! cmp -s "$_sy_final.all" "$_sy_manifest"; then
            nm_install_manifest "$_sy_final.all"
        fi
    fi
    rmdir "$NM_STATE_DIR/backup" 2>/dev/null

    NM_FILES_CHANGED=false
    if [ $((NM_COUNT_WRITTEN + NM_COUNT_REMOVED + NM_COUNT_RESTORED + NM_COUNT_KEPT + NM_DIRS_CHANGED)) -gt 0 ]; then
        NM_FILES_CHANGED=true
    fi
}

# Print the summary of the file changes for the report message.
nm_files_summary() {
    if [ "$NM_FILES_CHANGED" = false ]; then
        printf 'nothing changed: all %s managed files are up to date' "$NM_COUNT_UNCHANGED"
        return 0
    fi
    printf '%s written, %s unchanged, %s removed, %s restored, %s kept because they were changed by hand' \
        "$NM_COUNT_WRITTEN" "$NM_COUNT_UNCHANGED" "$NM_COUNT_REMOVED" "$NM_COUNT_RESTORED" "$NM_COUNT_KEPT"
}

# ---------------------------------------------------------------------------
# hosts mode: probes and the test pull

# Print host[:port] of URL $1.
nm_url_authority() {
    _ua=${1#*://}
    _ua=${_ua%%/*}
    _ua=${_ua##*@}
    printf '%s\n' "$_ua"
}

# Probe every registered mirror with curl and write one JSON object per
# line to $NM_WORK/mirrors.json. A status of 200 or 401 counts as up, unless
# the response is an HTML page (a proxy's error or login page), which no
# registry API returns. The error field gives the reason a mirror is not up.
nm_run_probes() {
    : >"$NM_WORK/mirrors.json"
    NM_PROBES_DOWN=0
    NM_PROBES_REJECTED=0
    _pr_i=1
    while [ "$_pr_i" -le "$NM_PROBE_COUNT" ]; do
        _pr_base=$NM_STAGE/probe.$_pr_i
        _pr_ns=$(cat "$_pr_base.1")
        _pr_host=$(cat "$_pr_base.2")
        _pr_url=$(cat "$_pr_base.3")
        _pr_skip=$(cat "$_pr_base.4")
        _pr_ca=$(cat "$_pr_base.5")
        _pr_cert=$(cat "$_pr_base.6")
        _pr_key=$(cat "$_pr_base.7")
        _pr_status=
        _pr_type=
        _pr_error=
        if command -v curl >/dev/null 2>&1; then
            set -- -q -sS -o /dev/null -w '%{http_code} %{content_type}' --connect-timeout 5 --max-time 10
            [ -z "$_pr_ca" ] || set -- "$@" --cacert "$_pr_ca"
            [ "$_pr_skip" != true ] || set -- "$@" -k
            [ -z "$_pr_cert" ] || set -- "$@" --cert "$_pr_cert"
            [ -z "$_pr_key" ] || set -- "$@" --key "$_pr_key"
            [ ! -f "$_pr_base.auth" ] || set -- "$@" -K "$_pr_base.auth"
            _pr_answer=$(curl "$@" "$_pr_url" </dev/null 2>"$NM_WORK/curl.err")
            _pr_code=${_pr_answer%% *}
            case $_pr_code in
            [1-9][0-9][0-9])
                _pr_status=$_pr_code
                _pr_type=${_pr_answer#"$_pr_code"}
                ;;
            *)
                _pr_error="request failed: $(nm_redact <"$NM_WORK/curl.err" | tail -n 1)"
                nm_log "probe of $_pr_url ($_pr_ns) failed: $_pr_error"
                ;;
            esac
        else
            _pr_error="not probed: curl is not installed"
            nm_log "curl is not installed; mirror $_pr_host ($_pr_ns) is not probed"
        fi
        _pr_up=false
        case $_pr_status:$(printf '%s' "$_pr_type" | LC_ALL=C tr '[:upper:]' '[:lower:]') in
        200:*text/html* | 401:*text/html*)
            _pr_error="HTTP $_pr_status with an HTML page, not the registry API"
            nm_log "probe of $_pr_url ($_pr_ns) answered $_pr_error"
            ;;
        200:* | 401:*) _pr_up=true ;;
        :*) ;;
        *) _pr_error="HTTP $_pr_status from GET /v2/" ;;
        esac
        [ "$_pr_up" = true ] || NM_PROBES_DOWN=$((NM_PROBES_DOWN + 1))
        _pr_credentials=$(nm_probe_credentials "$_pr_i" "$_pr_status")
        [ "$_pr_credentials" != '"rejected"' ] || NM_PROBES_REJECTED=$((NM_PROBES_REJECTED + 1))
        printf '{"namespace":%s,"url":%s,"status":%s,"up":%s,"credentials":%s,"error":%s}\n' "$(nm_json_str "$_pr_ns")" \
            "$(nm_json_str "$_pr_host")" "${_pr_status:-null}" "$_pr_up" "$_pr_credentials" \
            "$(nm_json_str_or_null "$_pr_error")" >>"$NM_WORK/mirrors.json"
        _pr_i=$((_pr_i + 1))
    done
}

# Pull NM_VERIFY_IMAGE with ctr through the hosts directory and print the
# verification JSON. Only host, url and status fields are read from ctr's
# debug output, because its other fields may carry header values.
nm_verify_image() {
    _vi_hosts=
    _vi_i=1
    while [ "$_vi_i" -le "$NM_PROBE_COUNT" ]; do
        _vi_hosts="$_vi_hosts $(nm_url_authority "$(cat "$NM_STAGE/probe.$_vi_i.2")")"
        _vi_i=$((_vi_i + 1))
    done
    _vi_served=
    _vi_tried=$NM_WORK/verify.tried
    : >"$_vi_tried"
    _vi_error=
    if [ -z "$NM_CTR" ]; then
        _vi_error="ctr is not on PATH"
    else
        set -- --address "$NM_ADDRESS" --connect-timeout 5s -n nexus-mirror-verify --debug images pull
        # containerd 2.x pulls in the daemon's transfer service, whose requests
        # ctr cannot log, so --local makes ctr pull by itself.
        [ "${NM_MAJOR:-1}" -lt 2 ] || set -- "$@" --local
        set -- "$@" --hosts-dir "$(nm_verify_hosts_dir)" "$NM_VERIFY_IMAGE"
        nm_log "pulling $NM_VERIFY_IMAGE with ctr through $NM_CONFIG_PATH"
        # NOTE: 300 s is a fixed limit for the test pull of a small image.
        nm_with_timeout 300 "$NM_CTR" "$@" </dev/null >/dev/null 2>"$NM_WORK/verify.log" 9>&-
        _vi_rc=$?
        awk '
            function field(line, key,    i, rest, j) {
                i = index(line, " " key "=")
                if (!i) return ""
                rest = substr(line, i + length(key) + 2)
                if (substr(rest, 1, 1) == "\"") {
                    rest = substr(rest, 2); j = index(rest, "\"")
                    return j ? substr(rest, 1, j - 1) : rest
                }
                j = index(rest, " ")
                return j ? substr(rest, 1, j - 1) : rest
            }
            / msg=resolving / { h = field($0, "host"); if (h != "" && !seen[h]++) print "tried\t" h }
            / msg=resolved / { h = field($0, "host"); if (h != "" && served == "") { served = h; print "served\t" h } }
            / msg="fetch response received" / {
                u = field($0, "url"); st = field($0, "response.status"); h = field($0, "host")
                if (served == "" && h != "" && index(u, "/manifests/") && st ~ /^2[0-9][0-9]/) { served = h; print "served\t" h }
                if (h != "" && st ~ /^40[13]/ && !denied[h]++) print "denied\t" h " answered " st
            }
            /^ctr: / { last = $0 }
            END { if (last != "") print "error\t" last }' "$NM_WORK/verify.log" >"$NM_WORK/verify.facts"
        rm -f "$NM_WORK/verify.log"
        awk -F '\t' '$1 == "tried" { print $2 }' "$NM_WORK/verify.facts" >"$_vi_tried"
        _vi_served=$(awk -F '\t' '$1 == "served" { print $2; exit }' "$NM_WORK/verify.facts")
        if [ "$_vi_rc" -ne 0 ]; then
            _vi_error=$(awk -F '\t' '$1 == "error" { print $2 }' "$NM_WORK/verify.facts" | nm_redact)
            [ -n "$_vi_error" ] || _vi_error="ctr images pull failed with exit status $_vi_rc"
            _vi_error=$_vi_error$(nm_verify_denied_note "$NM_WORK/verify.facts")
        elif [ -z "$_vi_served" ]; then
            _vi_error="the pull succeeded but ctr's debug output names no host that served the manifest"
        elif [ -n "$_vi_hosts" ]; then
            case " $_vi_hosts " in
            *" $_vi_served "*) ;;
            *) _vi_error="the image was served by $_vi_served, which is not a configured mirror" ;;
            esac
        fi
        nm_with_timeout 60 "$NM_CTR" --address "$NM_ADDRESS" --connect-timeout 5s -n nexus-mirror-verify \
            images rm "$NM_VERIFY_IMAGE" </dev/null >/dev/null 2>&1 9>&-
    fi
    _vi_ok=false
    [ -n "$_vi_error" ] || _vi_ok=true
    [ -z "$_vi_error" ] || nm_log "verification of $NM_VERIFY_IMAGE failed: $_vi_error"
    while IFS= read -r _vi_h; do
        nm_json_str "$_vi_h"
        echo
    done <"$_vi_tried" >"$NM_WORK/verify.tried.json"
    printf '{"image":%s,"servedBy":%s,"hostsTried":%s,"ok":%s,"error":%s}' "$(nm_json_str "$NM_VERIFY_IMAGE")" \
        "$(nm_json_str_or_null "$_vi_served")" "$(nm_json_array_file "$NM_WORK/verify.tried.json")" \
        "$_vi_ok" "$(nm_json_str_or_null "$_vi_error")"
}

# Reject a host_port_ directory beside a host:port namespace: containerd looks
# that form up first, so it would hide the managed host:port directory.
nm_check_shadowed() {
    _cs_i=1
    while [ "$_cs_i" -le "$NM_FILE_COUNT" ]; do
        _cs_ns=$(cat "$NM_STAGE/file.$_cs_i.ns")
        case $_cs_ns in
        *:*)
            _cs_dir=$NM_CONFIG_PATH/${_cs_ns%:*}_${_cs_ns##*:}_
            if [ -e "$_cs_dir" ]; then
                nm_fail "check hosts directories" \
                    "$_cs_dir exists, and containerd reads it before $NM_CONFIG_PATH/$_cs_ns, so the mirrors for $_cs_ns would never be used" \
                    "Move its settings into nexus-mirror:registries and remove $_cs_dir"
            fi
            ;;
        esac
        _cs_i=$((_cs_i + 1))
    done
}

nm_mode_hosts() {
    NM_FILES_STEP="write hosts files"
    nm_lock
    nm_find_containerd
    nm_check_shadowed
    nm_sync_files apply
    nm_effective_config_path
    _ho_status=$(nm_cri_status)
    nm_run_probes
    _ho_verification=null
    if [ -n "$NM_VERIFY_IMAGE" ]; then
        _ho_verification=$(nm_verify_image)
    fi
    _ho_msg=$(nm_files_summary)
    if [ -z "$NM_CONTAINERD" ]; then
        _ho_msg="$_ho_msg. Warning: containerd is not on PATH"
    elif [ "$NM_EFFECTIVE_JSON" = null ]; then
        _ho_msg="$_ho_msg. Warning: containerd cannot load $NM_CONFIG_FILE (missing or invalid), so its config_path is unknown"
    elif [ "$(nm_strip_slashes "$NM_EFFECTIVE_PATH")" != "$NM_CONFIG_PATH" ]; then
        _ho_msg="$_ho_msg. Warning: containerd's config_path is \"$NM_EFFECTIVE_PATH\", not \"$NM_CONFIG_PATH\", so the CRI plugin does not read these files"
    fi
    if [ -n "$NM_CONTAINERD" ] && [ -z "$_ho_status" ]; then
        _ho_msg="$_ho_msg. Warning: containerd does not respond on $NM_ADDRESS; it reads these files once it runs"
    fi
    if [ "$NM_PROBES_DOWN" -gt 0 ]; then
        _ho_msg="$_ho_msg. Warning: $NM_PROBES_DOWN of $NM_PROBE_COUNT mirrors are down: they did not answer GET /v2/ with HTTP 200 or 401 from a registry (see mirrors[].error)"
    fi
    if [ "$NM_PROBES_REJECTED" -gt 0 ]; then
        _ho_msg="$_ho_msg. Warning: $NM_PROBES_REJECTED of $NM_PROBE_COUNT mirrors rejected the configured credentials (HTTP 401 or 403)"
    fi
    nm_log "$_ho_msg"
    printf '{"mode":"hosts","node":%s,"containerdVersion":%s,"configPath":%s,"criPlugin":%s,"changed":%s,"files":%s,"mirrors":%s,"verification":%s,"message":%s}\n' \
        "$(nm_json_str "$NM_NODE")" "$(nm_json_str_or_null "$NM_VERSION")" "$NM_EFFECTIVE_JSON" \
        "$(nm_json_str_or_null "$_ho_status")" "$NM_FILES_CHANGED" "$(nm_json_array_file "$NM_WORK/files.json")" \
        "$(nm_json_array_file "$NM_WORK/mirrors.json")" "$_ho_verification" "$(nm_json_str "$_ho_msg")"
}

nm_mode_delete() {
    NM_FILES_STEP="remove hosts files"
    nm_lock
    nm_sync_files delete
    _de_msg="nothing to remove: no file is managed"
    if [ "$NM_FILES_CHANGED" = true ]; then
        _de_msg=$(printf '%s removed, %s restored, %s kept because they were changed by hand' \
            "$NM_COUNT_REMOVED" "$NM_COUNT_RESTORED" "$NM_COUNT_KEPT")
    fi
    nm_log "$_de_msg"
    printf '{"mode":"delete","node":%s,"changed":%s,"files":%s,"message":%s}\n' \
        "$(nm_json_str "$NM_NODE")" "$NM_FILES_CHANGED" "$(nm_json_array_file "$NM_WORK/files.json")" \
        "$(nm_json_str "$_de_msg")"
}

# ---------------------------------------------------------------------------
# Entry points

# Run MODE (config, hosts or delete) with the settings of the generated tail.
nm_main() {
    umask 077
    nm_stage_init
    case ${1-} in
    config | config-delete | hosts | delete) ;;
    *)
        nm_fail "check settings" "unknown mode '${1-}'" "Run the script as sh -s -- config|config-delete|hosts|delete"
        ;;
    esac
    nm_check_settings
    nm_setup_path
    case $1 in
    config) nm_mode_config ;;
    config-delete) nm_mode_config_delete ;;
    hosts) nm_mode_hosts ;;
    delete) nm_mode_delete ;;
    esac
}

# patch-config FILE CONTAINERD_VERSION CONFIG_PATH [AUTH_FILE]: print the
# candidate. AUTH_FILE lines (HOST<TAB>USER<TAB>PASSWORD) stand in for
# nm_config_auth calls.
nm_cli_patch_config() {
    NM_NODE=${NM_NODE:-$(uname -n 2>/dev/null)}
    if [ $# -ne 4 ] && [ $# -ne 5 ]; then
        nm_fail "check settings" "patch-config needs FILE CONTAINERD_VERSION CONFIG_PATH [AUTH_FILE]" \
            "Run: sh nexus-mirror-node.sh patch-config /etc/containerd/config.toml 1.6.20 /etc/containerd/certs.d"
    fi
    umask 077
    nm_stage_init
    nm_check_abs_path CONFIG_PATH "$4"
    if [ $# -eq 5 ]; then
        cp "$5" "$NM_STAGE/config-auth.tsv" ||
            nm_fail "check settings" "cannot read the credentials file $5" "Give a file of HOST<TAB>USER<TAB>PASSWORD lines"
    fi
    _cl_version=$(nm_parse_version "$3")
    [ -n "$_cl_version" ] || nm_fail "check settings" "invalid containerd version '$3'" "Give a version such as 1.6.20 or 2.0.0"
    nm_patch_config "$2" "${_cl_version%%.*}" "$_cl_version" "$(nm_strip_slashes "$4")" "$NM_WORK/candidate.toml"
    case $? in
    0) ;;
    1) nm_fail "check config.toml" "$NM_REJECT_CAUSE" "$NM_REJECT_FIX" ;;
    *) nm_fail "read config.toml" "cannot read $2" "Make $2 a regular file readable by this user" ;;
    esac
    nm_log "config.toml version $NM_PATCH_VERSION, section $NM_PATCH_SECTION: $NM_PATCH_ACTION config_path"
    cat "$NM_WORK/candidate.toml"
}

# Standalone use without a generated tail. The node modes never match here.
if [ "${1-}" = patch-config ]; then
    nm_cli_patch_config "$@"
    exit $?
fi
