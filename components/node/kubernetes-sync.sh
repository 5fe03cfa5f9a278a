#!/bin/sh
# nexus-mirror Kubernetes sync step: runs nexus-mirror-node.sh inside a pod of
# the nexus-mirror DaemonSet. It builds the same standard input that SSH
# delivery sends (the node script, the NM_* settings, the staged files and
# probes, then `nm_main "$@" </dev/null`) from the mounted ConfigMap and
# Secret, and runs `sh -s -- MODE` on it. All file handling is the node
# script's own: atomic writes, the manifest of what it wrote, backups of files
# it found, and the rule that it never removes a file it did not write.
#
# Usage: sh kubernetes-sync.sh MODE, where MODE is one of
#   input MODE  print the standard input for node script MODE (hosts, delete,
#               config), for a look at what a pod runs
#   config      run config mode on the host: nsenter into the namespaces of
#               process NM_K8S_HOST_PID (1, the host's init) and run the node
#               script there, so that it uses the host's config.toml,
#               containerd binaries and restart command. Needs a privileged
#               container in the host's PID namespace.
#   sync        run hosts mode once in this container
#   check       exit 0 only when every wanted file is on the node with the
#               wanted content and mode, and the manifest lists exactly these
#               files (the readiness probe)
#   run         claim the node for this pod, then check every NM_K8S_INTERVAL
#               seconds and sync when the check fails (the main process)
#   stop        run delete mode unless a newer pod has claimed the node (the
#               preStop hook)
#
# The mounted directory NM_K8S_FILES contains settings.sh (NM_* assignments),
# hosts.tail (nm_file and nm_probe lines that read the files from
# "$NM_K8S_FILES"), files.list (namespace, name, mode and key of each file,
# separated by tabs) and the files under their keys. The host directories
# NM_CONFIG_PATH and NM_STATE_DIR are mounted at the same paths as on the host.
#
# Environment: NM_NODE (node name, for messages), NM_POD_UID (identity of this
# pod, the pod's host name when empty), NM_K8S_FILES (default
# /nexus-mirror/files), NM_K8S_RUN_DIR (pod-local directory of the lock and
# the stop flag, default /tmp), NM_K8S_INTERVAL (seconds, default 30),
# NM_K8S_HOST_PID (default 1).

NM_K8S_FILES=${NM_K8S_FILES:-/nexus-mirror/files}
NM_K8S_RUN_DIR=${NM_K8S_RUN_DIR:-/tmp}
NM_K8S_INTERVAL=${NM_K8S_INTERVAL:-30}
NM_K8S_HOST_PID=${NM_K8S_HOST_PID:-1}
NM_K8S_POD=${NM_POD_UID:-$(uname -n)}
NM_K8S_SCRIPT=$(dirname "$0")/nexus-mirror-node.sh
NM_K8S_TAB=$(printf '\t')
NM_K8S_INPUT=
NM_K8S_SLEEP_PID=

k8s_log() {
    printf 'nexus-mirror: kubernetes-sync: node %s: %s\n' "${NM_NODE:-unknown}" "$*" >&2
}

# Read NM_CONFIG_PATH, NM_STATE_DIR and the other settings.
k8s_settings() {
    if [ ! -r "$NM_K8S_FILES/settings.sh" ]; then
        k8s_log "cannot read $NM_K8S_FILES/settings.sh; check that the ConfigMap is mounted at $NM_K8S_FILES"
        return 1
    fi
    # shellcheck source=/dev/null
    . "$NM_K8S_FILES/settings.sh"
}

# Write the standard input for node script mode $1 to a new private file and
# set NM_K8S_INPUT to its path. Fails, writing nothing, when a part is
# missing, so that hosts mode never runs without its files (it would remove
# every managed file).
k8s_build_input() {
    for _bi_part in "$NM_K8S_SCRIPT" "$NM_K8S_FILES/settings.sh" "$NM_K8S_FILES/hosts.tail" \
        "$NM_K8S_FILES/files.list"; do
        if [ ! -r "$_bi_part" ]; then
            k8s_log "cannot read $_bi_part; check the ConfigMap and Secret mounted at $NM_K8S_FILES"
            return 1
        fi
    done
    if [ "$1" = hosts ] && [ ! -s "$NM_K8S_FILES/files.list" ]; then
        k8s_log "$NM_K8S_FILES/files.list lists no file; refusing to run hosts mode, which would remove every managed file"
        return 1
    fi
    NM_K8S_INPUT=$(umask 077 && mktemp "$NM_K8S_RUN_DIR/nexus-mirror-input.XXXXXX") || {
        k8s_log "cannot create a temporary file in $NM_K8S_RUN_DIR"
        return 1
    }
    if {
        cat "$NM_K8S_SCRIPT" && echo && cat "$NM_K8S_FILES/settings.sh" &&
            { [ "$1" = config ] || cat "$NM_K8S_FILES/hosts.tail"; } &&
            printf '%s\n' 'nm_main "$@" </dev/null'
    } >"$NM_K8S_INPUT"; then
        return 0
    fi
    k8s_log "cannot write $NM_K8S_INPUT"
    rm -f "$NM_K8S_INPUT"
    NM_K8S_INPUT=
    return 1
}

k8s_drop_input() {
    [ -z "$NM_K8S_INPUT" ] || rm -f "$NM_K8S_INPUT"
    NM_K8S_INPUT=
}

# Run node script mode $1 (hosts or delete) in this container. Its JSON
# report goes to stdout and its progress to stderr, both into the pod log.
k8s_node() {
    k8s_build_input "$1" || return 1
    sh -s -- "$1" <"$NM_K8S_INPUT"
    _nd_status=$?
    k8s_drop_input
    return "$_nd_status"
}

k8s_mode_config() {
    k8s_build_input config || return 1
    # setns() into the host's mount namespace also moves the root directory,
    # so sh, containerd and the restart command are the host's.
    nsenter -t "$NM_K8S_HOST_PID" -m -u -i -n -p -- sh -s -- config <"$NM_K8S_INPUT"
    _cf_status=$?
    k8s_drop_input
    return "$_cf_status"
}

# Print why the node's files differ from the wanted ones and return 1, or
# return 0 when they match.
k8s_check() {
    k8s_settings || return 1
    # The node script only defines functions when it is sourced; its file
    # mode and hash helpers are the ones that wrote the files.
    # shellcheck source=/dev/null
    . "$NM_K8S_SCRIPT"
    NM_CONFIG_PATH=$(nm_strip_slashes "$NM_CONFIG_PATH")

    _ck_list=$NM_K8S_FILES/files.list
    _ck_manifest=$NM_STATE_DIR/managed
    if [ ! -s "$_ck_list" ]; then
        echo "$_ck_list lists no file"
        return 1
    fi
    if [ ! -f "$_ck_manifest" ]; then
        echo "no manifest $_ck_manifest yet: the files were never synced"
        return 1
    fi

    _ck_wanted=
    while IFS=$NM_K8S_TAB read -r _ck_ns _ck_name _ck_mode _ck_key; do
        _ck_target=$NM_CONFIG_PATH/$_ck_ns/$_ck_name
        if [ -L "$_ck_target" ] || [ ! -f "$_ck_target" ]; then
            echo "$_ck_target is missing or not a regular file"
            return 1
        fi
        if ! cmp -s "$NM_K8S_FILES/$_ck_key" "$_ck_target"; then
            echo "$_ck_target differs from the wanted content"
            return 1
        fi
        if [ "$(nm_file_mode "$_ck_target")" != "$(printf '%04o' "0$_ck_mode")" ]; then
            echo "$_ck_target has mode $(nm_file_mode "$_ck_target"), not $_ck_mode"
            return 1
        fi
        _ck_wanted="$_ck_wanted$(nm_sha256 "$_ck_target") $_ck_target$NM_NL"
    done <"$_ck_list"

    # Files the manifest lists beyond the wanted ones are managed files still
    # to be removed (or a run that was cut short).
    _ck_listed=$(grep -v '^dir ' "$_ck_manifest" | sort)
    if [ "$_ck_listed" != "$(printf '%s' "$_ck_wanted" | sort)" ]; then
        echo "the manifest $_ck_manifest does not list exactly the wanted files"
        return 1
    fi
    echo "all $(wc -l <"$_ck_list" | tr -d ' ') files match"
    return 0
}

k8s_owner_file() {
    printf '%s/kubernetes-pod\n' "$NM_STATE_DIR"
}

# Record this pod as the one that syncs the node. A pod that a rollout
# started next to the old one (maxSurge) claims the node, so the old pod
# neither syncs again nor removes the files when it stops.
k8s_claim() {
    _cl_file=$(k8s_owner_file)
    if ! (umask 077 && mkdir -p "$NM_STATE_DIR") ||
        ! printf '%s\n' "$NM_K8S_POD" >"$_cl_file.$$" || ! mv -f "$_cl_file.$$" "$_cl_file"; then
        rm -f "$_cl_file.$$"
        k8s_log "cannot write $_cl_file; check that $NM_STATE_DIR is mounted writable"
        return 1
    fi
}

# Succeed unless another pod has claimed the node.
k8s_owned() {
    _ow_file=$(k8s_owner_file)
    [ ! -f "$_ow_file" ] || [ "$(cat "$_ow_file")" = "$NM_K8S_POD" ]
}

# Take the pod-local lock that keeps `run` from syncing while `stop` removes
# the files. A lock left by a process that no longer runs is removed.
k8s_lock() {
    while ! mkdir "$NM_K8S_RUN_DIR/sync.lock" 2>/dev/null; do
        _lk_pid=$(cat "$NM_K8S_RUN_DIR/sync.lock/pid" 2>/dev/null)
        if [ -n "$_lk_pid" ] && ! kill -0 "$_lk_pid" 2>/dev/null; then
            rm -rf "$NM_K8S_RUN_DIR/sync.lock"
            continue
        fi
        sleep 1
    done
    echo "$$" >"$NM_K8S_RUN_DIR/sync.lock/pid"
}

k8s_unlock() {
    rm -rf "$NM_K8S_RUN_DIR/sync.lock"
}

k8s_on_term() {
    [ -z "$NM_K8S_SLEEP_PID" ] || kill "$NM_K8S_SLEEP_PID" 2>/dev/null
    k8s_log "stopping"
    exit 0
}

k8s_mode_run() {
    k8s_settings || exit 1
    # The emptyDir outlives a container restart: clear what an earlier
    # container of this pod left.
    rm -rf "$NM_K8S_RUN_DIR/sync.lock" "$NM_K8S_RUN_DIR/stopping"
    trap k8s_on_term TERM INT
    k8s_claim || exit 1
    k8s_log "claimed the node for pod $NM_K8S_POD; checking every $NM_K8S_INTERVAL s"
    _rn_passive=
    while :; do
        k8s_lock
        if [ -e "$NM_K8S_RUN_DIR/stopping" ]; then
            # The preStop hook runs; exiting now would end it with the container.
            :
        elif ! k8s_owned; then
            if [ -z "$_rn_passive" ]; then
                k8s_log "a newer pod ($(cat "$(k8s_owner_file)")) has claimed the node; this pod no longer syncs"
                _rn_passive=1
            fi
        elif ! _rn_reason=$(k8s_check 2>&1); then
            k8s_log "syncing: $_rn_reason"
            k8s_node hosts || k8s_log "hosts mode failed (see the lines above); retrying in $NM_K8S_INTERVAL s"
        fi
        k8s_unlock
        sleep "$NM_K8S_INTERVAL" &
        NM_K8S_SLEEP_PID=$!
        wait "$NM_K8S_SLEEP_PID"
        NM_K8S_SLEEP_PID=
    done
}

k8s_mode_stop() {
    k8s_settings || exit 1
    : >"$NM_K8S_RUN_DIR/stopping"
    k8s_lock
    if ! k8s_owned; then
        k8s_log "a newer pod ($(cat "$(k8s_owner_file)")) has claimed the node; keeping its files"
        k8s_unlock
        return 0
    fi
    k8s_log "removing the managed files: the pod stops and no newer pod has claimed the node"
    k8s_node delete
    _st_status=$?
    if [ "$_st_status" -eq 0 ]; then
        rm -f "$(k8s_owner_file)"
    fi
    k8s_unlock
    return "$_st_status"
}

case ${1-} in
input)
    case ${2-} in
    hosts | delete | config) ;;
    *)
        k8s_log "usage: kubernetes-sync.sh input hosts|delete|config"
        exit 2
        ;;
    esac
    k8s_build_input "$2" || exit 1
    cat "$NM_K8S_INPUT"
    k8s_drop_input
    ;;
config) k8s_mode_config ;;
sync) k8s_node hosts ;;
check) k8s_check ;;
run) k8s_mode_run ;;
stop) k8s_mode_stop ;;
*)
    k8s_log "usage: kubernetes-sync.sh input MODE|config|sync|check|run|stop"
    exit 2
    ;;
esac
