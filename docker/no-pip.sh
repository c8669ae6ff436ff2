#!/bin/sh
# The runtime stage's last word on packaging tools: remove pip, setuptools and wheel from the
# base image's own Python, so that nothing in the image can install or build a package.
# python:3.11-slim has them in /usr/local (and ensurepip's bundled wheels); the Debian 12
# base docker/debian-base.sh makes has them as the wheels python3-venv depends on
# (python3-pip-whl, python3-setuptools-whl). tmbatch's virtualenv never had them.
# Fails when any of them is still importable or a wheel of them is left.
set -eu
if python3 -c 'import pip' 2>/dev/null; then
    python3 -m pip uninstall --yes --quiet pip setuptools wheel 2>/dev/null \
        || python3 -m pip uninstall --yes --quiet pip setuptools
fi
for pkg in python3-venv python3.11-venv python3-pip-whl python3-setuptools-whl python3-pip \
           python3-setuptools python3-wheel; do
    if dpkg-query --show --showformat='${Status}' "$pkg" 2>/dev/null | grep -qx 'install ok installed'; then
        purge="${purge:-} $pkg"
    fi
done
if [ -n "${purge:-}" ]; then
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get purge -y --auto-remove $purge
fi
bundled=$(python3 -c 'import ensurepip, os; print(os.path.join(os.path.dirname(ensurepip.__file__), "_bundled"))' 2>/dev/null || true)
[ -n "$bundled" ] && rm -rf "$bundled"
rm -f /usr/local/bin/pip /usr/local/bin/pip3 /usr/local/bin/pip3.* /usr/local/bin/wheel
python3 - <<'PY'
import importlib.util, pathlib, sys
left = [m for m in ("pip", "setuptools", "wheel") if importlib.util.find_spec(m)]
left += [str(p) for root in ("/usr", "/opt") for p in pathlib.Path(root).rglob("*.whl")]
if left:
    sys.exit(f"no-pip.sh: still in the image: {left}")
PY
