#!/usr/bin/env bash
# Installs the Debian packages the end-to-end tests need when they are missing:
# openssh-server (provisioning against a real sshd) and chromium (dashboard browser tests).
set -euo pipefail
missing=()
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
[ -x /usr/bin/chromium ] || missing+=(chromium)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "The tests need these Debian packages: ${missing[*]}." >&2
  echo "Install them (sudo apt-get install ${missing[*]}) and run make test again." >&2
  exit 1
fi
echo "Installing ${missing[*]} ..."
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
