# Sourced by the set-up and test scripts: package installs that survive a
# registry hiccup. Each tries three times, 15 s apart, and says which package
# could not be installed before the script stops, so a failed CI run names
# its cause. pip's cache is off: the PyTorch wheel alone is ~5 GB with its
# dependencies, and a second copy in ~/.cache can fill a small disk.
apt_install() {  # packages...
  local SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO=sudo
  local i
  for i in 1 2 3; do
    if $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@"; then return 0; fi
    echo "install: apt-get install $* failed (try $i of 3)" >&2
    sleep 15
  done
  echo "install: could not install the Debian packages $*; check the network to the Debian mirror and the free disk (df -h)" >&2
  return 1
}
pip_install() {  # pip packages...
  local i
  for i in 1 2 3; do
    if python3 -m pip install -q --no-cache-dir "$@" || python3 -m pip install -q --no-cache-dir --break-system-packages "$@"; then
      return 0
    fi
    echo "install: pip install $* failed (try $i of 3)" >&2
    sleep 15
  done
  echo "install: could not install the pip packages $*; check the network to PyPI and the free disk (df -h)" >&2
  return 1
}
