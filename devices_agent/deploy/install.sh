#!/bin/sh
# Installs and starts the Flotilla agent on a board. Run by the provisioning job over SSH;
# also usable by hand:
#   sh install.sh install DIR BUNDLE [PYTHON [PACKAGES REQUIREMENTS [PIP_OPTION...]]]
#                                               venv in DIR/venv, packages, agent from BUNDLE
#   sh install.sh selftest DIR [--train]        prove the venv serves (and trains) models
#   sh install.sh start DIR                     systemd unit when possible, else nohup + pidfile
#   sh install.sh stop DIR
#   sh install.sh status DIR
# PACKAGES says where the agent's dependencies (the pinned lines of REQUIREMENTS) come from:
#   system (the default)  already importable by PYTHON (OS image): the venv sees PYTHON's
#                         packages, and REQUIREMENTS, when given, is checked, not installed;
#   index, wheelhouse     a venv of its own, into which pip installs REQUIREMENTS with the
#                         PIP_OPTIONs (an index, or --no-index --find-links WHEELHOUSE).
# The bundle itself is installed with `pip --no-index --no-deps`: it needs no internet.
# Exit codes of install: 10 pip could not install the packages, 11 a package is missing
# (system); any other, another step failed.
set -eu

cmd=${1:?usage: install.sh install|selftest|start|stop|status DIR ...}
dir=${2:?install dir}
unit=flotilla-agent
venv="$dir/venv"
pidfile="$dir/agent.pid"
log="$dir/agent.log"

# With PACKAGES=system: every pinned line of the requirement file must be installed; a
# version other than the pin is reported (a vendor's build of torch, say), not refused.
check_present='
import importlib.metadata as metadata
import sys

missing = []
for raw in open(sys.argv[1]):
    line = raw.split("#", 1)[0].strip()
    if not line or line.startswith("-"):
        continue
    name, _, pinned = line.partition("==")
    try:
        found = metadata.version(name)
    except metadata.PackageNotFoundError:
        missing.append(line)
        continue
    note = "" if found.split("+")[0] == pinned else f" (the server pins {pinned})"
    print(f"found {name} {found}{note}")
if missing:
    print("missing on the board: " + ", ".join(missing), file=sys.stderr)
    sys.exit(1)
'

use_systemd() {
    # Only when systemd actually runs this machine (not merely installed) and we may
    # write unit files.
    [ "$(id -u)" = 0 ] && command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]
}

running_pid() {
    if [ -f "$pidfile" ]; then
        pid=$(cat "$pidfile")
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            echo "$pid"
            return 0
        fi
    fi
    return 1
}

stop_agent() {
    if use_systemd && [ -f "/etc/systemd/system/$unit.service" ]; then
        systemctl stop "$unit" || true
    fi
    if pid=$(running_pid); then
        kill "$pid" 2>/dev/null || true
        # Give it a moment to flush its outbox and exit before anything replaces it.
        for _ in 1 2 3 4 5; do
            kill -0 "$pid" 2>/dev/null || break
            sleep 1
        done
        if kill -0 "$pid" 2>/dev/null; then
            kill -9 "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$pidfile"
}

case "$cmd" in
install)
    bundle=${3:?bundle path}
    python=${4:-python3}
    packages=${5:-system}
    requirements=${6:-}
    # Beside it, requirements-bare.txt: packages installed without their declared dependencies.
    bare="${requirements%.txt}-bare.txt"
    if [ $# -gt 6 ]; then shift 6; else shift $#; fi
    case "$packages" in
    system | index | wheelhouse) ;;
    *)
        echo "unknown package source $packages (system, index or wheelhouse)" >&2
        exit 2
        ;;
    esac
    if [ "$packages" != system ] && [ ! -f "$requirements" ]; then
        echo "no requirement file at '$requirements'" >&2
        exit 2
    fi
    mkdir -p "$dir"
    chmod 700 "$dir"
    # Whether a venv sees the system's packages is fixed when it is made: one made for
    # another source is replaced, not patched.
    if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/flotilla-packages" 2>/dev/null)" != "$packages" ]; then
        echo "replacing $venv: it was made for other packages"
        rm -rf "$venv"
    fi
    if [ ! -x "$venv/bin/python" ]; then
        if [ "$packages" = system ]; then
            "$python" -m venv --system-site-packages "$venv"
        else
            "$python" -m venv "$venv"
        fi
        echo "$packages" > "$venv/flotilla-packages"
        echo "created $venv"
    fi
    if [ "$packages" = system ]; then
        # When PYTHON is itself a virtualenv, --system-site-packages points past it to the base
        # interpreter; a .pth file makes PYTHON's own packages (the agent's dependencies) visible.
        base_lib=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
        venv_lib=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
        if [ "$base_lib" != "$venv_lib" ]; then
            echo "$base_lib" > "$venv_lib/flotilla-base-packages.pth"
        fi
        if [ -n "$requirements" ]; then
            "$venv/bin/python" -c "$check_present" "$requirements" || exit 11
            if [ -f "$bare" ]; then
                "$venv/bin/python" -c "$check_present" "$bare" || exit 11
            fi
        fi
    else
        echo "installing $(grep -c '==' "$requirements") pinned packages with pip"
        "$venv/bin/python" -m pip install --disable-pip-version-check --no-input --progress-bar off \
            -r "$requirements" "$@" || exit 10
        if [ -f "$bare" ]; then
            echo "installing $(grep -c '==' "$bare") pinned packages without their dependencies"
            "$venv/bin/python" -m pip install --disable-pip-version-check --no-input --progress-bar off \
                --no-deps -r "$bare" "$@" || exit 10
        fi
    fi
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-index --no-deps \
        --force-reinstall "$bundle"
    "$venv/bin/python" -c 'import devices_agent; print("agent", devices_agent.__version__)'
    ;;
selftest)
    shift 2
    status=0
    "$venv/bin/python" -m devices_agent selftest "$@" || status=$?
    if [ "$status" -gt 128 ]; then
        # Killed, not failed: a native library crashed the interpreter, so no report came.
        echo "the selftest was killed by signal $((status - 128))" >&2
    fi
    exit "$status"
    ;;
start)
    config="$dir/agent.toml"
    stop_agent
    # Provisioning always gives the board a new identity: an earlier enrollment's state
    # would make the agent ignore the fresh token, so it is kept aside, not reused.
    if [ -d "$dir/state" ]; then
        mv "$dir/state" "$dir/state.replaced-$(date +%Y%m%d%H%M%S)"
    fi
    if use_systemd; then
        sed -e "s|@VENV@|$venv|g" -e "s|@DIR@|$dir|g" -e "s|@CONFIG@|$config|g" \
            "$dir/flotilla-agent.service.in" > "/etc/systemd/system/$unit.service"
        systemctl daemon-reload
        systemctl enable "$unit" >/dev/null 2>&1
        systemctl restart "$unit"
        sleep 2
        if ! systemctl is-active --quiet "$unit"; then
            journalctl -u "$unit" -n 30 --no-pager >&2 || true
            echo "the agent service did not stay up" >&2
            exit 1
        fi
        echo "started systemd unit $unit"
    else
        cd "$dir"
        # setsid + nohup: the agent outlives this SSH session; no systemd here, so it does
        # not survive a reboot (documented fallback).
        setsid nohup "$venv/bin/python" -m devices_agent run --config "$config" \
            </dev/null >>"$log" 2>&1 &
        echo $! > "$pidfile"
        chmod 600 "$pidfile"
        sleep 2
        if ! running_pid >/dev/null; then
            tail -n 30 "$log" >&2 || true
            echo "the agent exited right after starting" >&2
            exit 1
        fi
        echo "started with nohup, pid $(cat "$pidfile")"
    fi
    ;;
stop)
    stop_agent
    ;;
status)
    if pid=$(running_pid); then
        echo "running $pid"
    elif use_systemd && systemctl is-active --quiet "$unit"; then
        echo "running systemd"
    else
        echo "stopped"
        exit 3
    fi
    ;;
*)
    echo "unknown command $cmd" >&2
    exit 2
    ;;
esac
