"""The system parts the test suite runs for real, installed before the first test that needs them.

``make test`` runs ``python -m tests.system`` before pytest, and ``tests/conftest.py`` calls ``ensure()`` at
session start, so the suite finds Prometheus (and its promtool) in any test order, on a machine that never
ran it before: the parts come from Debian's packages, installed with apt-get as root.

Without root or apt, ``ensure()`` leaves them missing and says which; the tests that need them then skip
with that reason, and under ``CI=true`` fail (``tests/conftest.py``): a CI that quietly skips the
monitoring tests has not tested them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

# binary -> the Debian package that provides it
PARTS = {
    "prometheus": "prometheus",  # tests/test_monitoring_prometheus.py, the two-node monitor (tests/test_cluster.py)
    "promtool": "prometheus",  # the rendered config checked by Prometheus' own tool
    "ip": "iproute2",  # network namespaces: the two-node cluster tests
}


def missing() -> dict[str, str]:
    """Binaries of PARTS not on PATH -> their package."""
    return {b: pkg for b, pkg in PARTS.items() if shutil.which(b) is None}


def ensure(log=print) -> dict[str, str]:
    """Install the packages of missing parts (root with apt-get only); returns what is still missing."""
    need = missing()
    if not need:
        return {}
    packages = sorted(set(need.values()))
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        log(f"tests.system: missing {', '.join(sorted(need))} (packages {' '.join(packages)}); "
            "not root or no apt-get: the tests that need them will skip (fail under CI=true)")
        return need
    log(f"tests.system: installing {' '.join(packages)} (Debian) for {', '.join(sorted(need))}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages], check=True, env=env,
                       stdout=subprocess.DEVNULL)
    except subprocess.CalledProcessError as e:
        log(f"tests.system: apt-get failed ({e}); still missing: {', '.join(sorted(missing()))}")
    left = missing()
    if not left:
        log("tests.system: every system part is installed")
    return left


def skip_reason(binary: str) -> str:
    return (f"{binary} not found and not installable here (Debian package {PARTS[binary]}; "
            "`python -m tests.system` installs it as root)")


if __name__ == "__main__":
    left = ensure()
    sys.exit(1 if left and os.environ.get("CI", "").lower() in ("1", "true", "yes") else 0)
