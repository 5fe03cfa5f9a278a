#!/bin/sh
# Install the Debian packages that lab/lab.sh runs. Run as root. When every
# package is already installed it changes nothing, so it is safe to run again.
set -eu

PACKAGES="containerd docker-registry openssh-server skopeo curl nginx sudo openssl busybox"
POLICY_RC=/usr/sbin/policy-rc.d

if [ "$(id -u)" -ne 0 ]; then
  echo "install.sh: must run as root to install Debian packages; run: sudo sh $0" >&2
  exit 1
fi

missing=
for package in $PACKAGES; do
  status=$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null || true)
  if [ "$status" != "install ok installed" ]; then
    missing="$missing $package"
  fi
done
if [ -z "$missing" ]; then
  echo "install.sh: all lab packages are installed: $PACKAGES"
  exit 0
fi
echo "install.sh: installing $PACKAGES (missing:$missing)"

# The packages' maintainer scripts start system services (containerd on
# /run/containerd/containerd.sock, sshd, nginx and docker-registry on all
# interfaces) unless policy-rc.d forbids it. The lab runs its own instances,
# so when the machine has no policy-rc.d, one that denies every start is in
# place during the installation.
if [ ! -e "$POLICY_RC" ]; then
  printf '#!/bin/sh\n# Placed by nexus-mirror lab/install.sh during apt-get install.\nexit 101\n' \
    >"$POLICY_RC"
  chmod 755 "$POLICY_RC"
  trap 'rm -f "$POLICY_RC"' EXIT
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update
# PACKAGES is a space-separated list of package names.
# shellcheck disable=SC2086
apt-get install -y $PACKAGES
echo "install.sh: installed $PACKAGES"
