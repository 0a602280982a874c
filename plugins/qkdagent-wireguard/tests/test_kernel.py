"""Kernel WireGuard (netlink backend): boots the Debian kernel once under QEMU and runs
guest/netlink_guest.py inside it with the host's Python. ci/setup.sh fetches the kernel."""

from __future__ import annotations

import os
import shlex
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from wg_guestvm import cache_ready, run_guest

from qkdagent.testing import in_ci, missing, require_binary, require_root

PLUGIN = Path(__file__).resolve().parents[1]
REPO = PLUGIN.parents[1]
CACHE = PLUGIN / ".cache" / "kernel"
GUEST_TESTS = PLUGIN / "tests" / "guest" / "netlink_guest.py"
MIN_TESTS = 26


def guest_script(results: str = "/mnt") -> str:
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        # the host's /tmp stays visible (the checkout may live there); scratch space is a tmpfs
        "HOME": "/run/tmp",
        "TMPDIR": "/run/tmp",
        "PYTHONDONTWRITEBYTECODE": "1",
        "CI": "true" if in_ci() else "",
    }
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    cmd = [
        sys.executable, "-m", "pytest", str(GUEST_TESTS), "-q", "-p", "no:cacheprovider",
        f"--junitxml={results}/junit.xml",
    ]  # fmt: skip
    return (
        f"export {exports}\n"
        "ip link set lo up\n"
        f"cd {shlex.quote(str(REPO))}\n"
        f"{shlex.join(cmd)} > {results}/pytest.log 2>&1\n"
    )


def test_netlink_backend_in_a_real_kernel(tmp_path: Path) -> None:
    require_root()
    require_binary("qemu-system-x86_64", "busybox", "wg", "ip", "ping")
    if not os.path.exists("/bin/busybox"):
        missing("/bin/busybox (busybox-static) is needed for the guest's initramfs")
    if not cache_ready(CACHE):
        missing(f"no kernel in {CACHE}: run plugins/qkdagent-wireguard/ci/setup.sh")
    workdir = tmp_path / "guest"
    result = run_guest(CACHE, workdir, guest_script(), timeout=300)
    log_file = workdir / "pytest.log"
    log = log_file.read_text() if log_file.exists() else "(no pytest log)"
    detail = f"guest pytest output:\n{log[-6000:]}\nconsole tail:\n{result.console[-3000:]}"
    assert result.exit_code == 0, detail
    suite = ET.parse(workdir / "junit.xml").getroot()  # noqa: S314 - written by our own guest
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    assert suite is not None
    counts = {k: int(suite.get(k, "0")) for k in ("tests", "failures", "errors", "skipped")}
    assert counts["tests"] >= MIN_TESTS, (counts, detail)
    assert counts["failures"] == counts["errors"] == counts["skipped"] == 0, (counts, detail)
    print(f"guest ran {counts['tests']} netlink tests in {result.seconds:.1f} s (boot included)")
