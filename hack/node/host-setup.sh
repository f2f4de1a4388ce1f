#!/usr/bin/env bash
# Installs the host packages the real-container tier and `make images` need, from Debian's
# own packages (the mirror apt is configured with): runc (crun refuses this kernel's hybrid
# cgroup layout), containerd, buildah, mmdebstrap (base root filesystems without a registry),
# umoci and skopeo (OCI layouts), the CNI plugins and iptables.
#
# Idempotent and quick when everything is present (one dpkg query, no apt call). Needs root
# and apt-get; without them it says what is missing and exits 1, so callers can skip or fail.
set -euo pipefail
pkgs=(runc containerd buildah mmdebstrap umoci skopeo containernetworking-plugins iptables uidmap)
missing=()
for p in "${pkgs[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "host-setup: not root; cannot install ${missing[*]}" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null; then
  echo "host-setup: no apt-get; install ${missing[*]} by hand" >&2
  exit 1
fi
echo "host-setup: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
# Serialised: several checkouts on one host may run this at once.
exec 9>/var/lock/cpt-host-setup.lock
flock 9
apt-get update -qq >&2
apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
