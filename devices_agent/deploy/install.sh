#!/bin/sh
# Installs and starts the Flotilla agent on a board. Run by the provisioning job over SSH;
# also usable by hand:
#   sh install.sh install DIR BUNDLE [PYTHON]   venv in DIR/venv, agent installed from BUNDLE
#   sh install.sh start DIR                     systemd unit when possible, else nohup + pidfile
#   sh install.sh stop DIR
#   sh install.sh status DIR
# The bundle is installed with `pip --no-index --no-deps`: the board needs no internet, but the
# agent's dependencies (numpy, httpx, onnxruntime, safetensors, cryptography, psutil,
# websockets) must already be importable by PYTHON (from the OS image or a wheelhouse); the
# venv sees PYTHON's packages.
set -eu

cmd=${1:?usage: install.sh install|start|stop|status DIR ...}
dir=${2:?install dir}
unit=flotilla-agent
venv="$dir/venv"
pidfile="$dir/agent.pid"
log="$dir/agent.log"

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
    mkdir -p "$dir"
    chmod 700 "$dir"
    if [ ! -x "$venv/bin/python" ]; then
        "$python" -m venv --system-site-packages "$venv"
    fi
    # When PYTHON is itself a virtualenv, --system-site-packages points past it to the base
    # interpreter; a .pth file makes PYTHON's own packages (the agent's dependencies) visible.
    base_lib=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    venv_lib=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    if [ "$base_lib" != "$venv_lib" ]; then
        echo "$base_lib" > "$venv_lib/flotilla-base-packages.pth"
    fi
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-index --no-deps \
        --force-reinstall "$bundle"
    "$venv/bin/python" -c 'import devices_agent; print("agent", devices_agent.__version__)'
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
