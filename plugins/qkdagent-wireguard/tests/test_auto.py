"""`auto`: the kernel is asked first; the userspace socket only when the kernel has no such
WireGuard device in this namespace (pure decision, plus the host's real kernel answers)."""

from __future__ import annotations

import errno
import socket
from pathlib import Path

import pytest
from qkdagent_wireguard.auto import Kernel, choose, classify, detect, explain, probe_kernel
from qkdagent_wireguard.backend import BackendError
from qkdagent_wireguard.drive import drive_blocking

SOCK = Path("/run/wireguard/wg0.sock")


def test_explain() -> None:
    assert explain(errno.ENODEV) == "netlink: ENODEV, no such device"
    assert explain(errno.EPERM) == "netlink: EPERM"
    assert explain(None) == "netlink: failed"


@pytest.mark.parametrize(
    ("code", "verdict"),
    [
        (None, Kernel.DEVICE),
        (errno.ENODEV, Kernel.ABSENT),  # no such interface
        (errno.EOPNOTSUPP, Kernel.ABSENT),  # an interface of another kind (wireguard-go's tun)
        (errno.ENOENT, Kernel.ABSENT),  # no `wireguard` netlink family
        (errno.EPERM, Kernel.UNKNOWN),  # no CAP_NET_ADMIN: cannot tell
        (errno.ETIMEDOUT, Kernel.UNKNOWN),
    ],
)
def test_classify(code: int | None, verdict: Kernel) -> None:
    assert classify(code) is verdict


def test_a_kernel_device_wins_over_a_socket_of_the_same_name() -> None:
    assert choose("wg0", Kernel.DEVICE, "", SOCK, has_socket=True) == "netlink"
    assert choose("wg0", Kernel.DEVICE, "", SOCK, has_socket=False) == "netlink"


def test_the_socket_only_when_the_kernel_has_no_such_device() -> None:
    assert choose("wg0", Kernel.ABSENT, "no such interface", SOCK, has_socket=True) == "uapi"
    with pytest.raises(BackendError, match=r"no kernel WireGuard.*\(netlink: ENODEV\).*control"):
        choose("wg0", Kernel.ABSENT, "netlink: ENODEV", SOCK, has_socket=False)


def test_undecidable_is_an_error_even_with_a_socket() -> None:
    for has_socket in (True, False):
        with pytest.raises(BackendError, match=r"cannot tell.*EPERM.*explicitly"):
            choose("wg0", Kernel.UNKNOWN, "netlink: EPERM", SOCK, has_socket=has_socket)


def test_probe_of_an_interface_missing_here_needs_no_netlink() -> None:
    verdict = drive_blocking(probe_kernel("wqnone0"), 5, "probe")
    assert verdict == (Kernel.ABSENT, "no such interface")


def test_probe_of_an_interface_of_another_kind() -> None:
    # `lo` exists everywhere and is not WireGuard: EOPNOTSUPP from a kernel with WireGuard,
    # ENOENT (no family) from one without (this host); either way not a kernel device.
    kernel, reason = drive_blocking(probe_kernel("lo"), 5, "probe")
    assert kernel is Kernel.ABSENT
    assert reason in (
        "netlink: EOPNOTSUPP, not a WireGuard device",
        "netlink: ENOENT, no WireGuard in this kernel",
    )


def test_detect_uses_a_socket_only_for_an_interface_the_kernel_does_not_have(
    tmp_path: Path,
) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "lo.sock"))  # a socket file nobody listens on
    stale.close()
    assert detect("lo", tmp_path) == "uapi"  # `lo` is no WireGuard device: the socket it is
    with pytest.raises(BackendError, match="control socket"):
        detect("wqnone0", tmp_path / "empty")
