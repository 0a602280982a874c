"""Run a command under a real Debian kernel in QEMU, for kernel-WireGuard (netlink) tests.

The host has no WireGuard module and cannot load one, so a Debian `linux-image-*-amd64` package
is unpacked (`extract`, run once by ci/setup.sh) and booted with TCG and a tiny busybox
initramfs that loads virtio, 9p, veth and wireguard with their dependencies. The guest mounts
the host's `/` read-only over 9p, chroots into it, and runs a script with the host's own Python
and packages; a second, writable 9p share carries the script in and the results out.

    python plugins/qkdagent-wireguard/tests/wg_guestvm.py extract UNPACKED_DEB_ROOT CACHE_DIR
"""

from __future__ import annotations

import gzip
import io
import re
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "veth", "wireguard", "virtio_rng")
EXIT_MARK = "QKDAGENT-GUEST-EXIT="
SHARE = "security_model=none,multidevs=remap"


# -- one-time extraction of the kernel and the modules the guest needs ------------------------


def _modinfo_depends(path: Path) -> list[str]:
    match = re.search(rb"depends=([^\x00]*)\x00", path.read_bytes())
    if not match or not match.group(1):
        return []
    return match.group(1).decode().split(",")


def resolve_modules(module_dir: Path, roots: tuple[str, ...] = ROOT_MODULES) -> list[Path]:
    """The `.ko` files for `roots` and their dependencies, dependencies first."""
    index: dict[str, Path] = {}
    for path in module_dir.rglob("*.ko"):
        index[path.stem.replace("-", "_")] = path
    builtin = set()
    builtin_list = module_dir / "modules.builtin"
    if builtin_list.exists():
        for line in builtin_list.read_text().splitlines():
            builtin.add(Path(line).stem.replace("-", "_"))
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        key = name.replace("-", "_")
        if key in seen or key in builtin:
            return
        seen.add(key)
        if key not in index:
            raise LookupError(f"kernel module {name} is neither built in nor in {module_dir}")
        for dep in _modinfo_depends(index[key]):
            visit(dep)
        order.append(index[key])

    for root in roots:
        visit(root)
    return order


def extract(unpacked: Path, cache: Path) -> None:
    """Copy vmlinuz and the needed modules from an unpacked kernel .deb into `cache`."""
    vmlinuz = next((unpacked / "boot").glob("vmlinuz-*"))
    module_dir = next((unpacked / "lib" / "modules").iterdir())
    modules = resolve_modules(module_dir)
    staging = cache.with_name(cache.name + ".new")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "modules").mkdir(parents=True)
    shutil.copy(vmlinuz, staging / "vmlinuz")
    names = []
    for path in modules:
        shutil.copy(path, staging / "modules" / path.name)
        names.append(path.stem)
    (staging / "modules" / "order").write_text("\n".join(names) + "\n")
    (staging / "release").write_text(module_dir.name + "\n")
    shutil.rmtree(cache, ignore_errors=True)
    staging.rename(cache)


def cache_ready(cache: Path) -> bool:
    return (cache / "vmlinuz").is_file() and (cache / "modules" / "order").is_file()


# -- initramfs --------------------------------------------------------------------------------

INIT = """#!/bin/busybox sh
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
$B mount -t devtmpfs dev /dev
for m in $($B cat /modules/order); do
    $B insmod /modules/$m.ko || echo "qkdagent guest: insmod $m failed"
done
$B mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /newroot
$B mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 results /newroot/mnt
$B mount -t proc proc /newroot/proc
$B mount -t sysfs sys /newroot/sys
$B mount -t devtmpfs dev /newroot/dev
$B mount -t tmpfs run /newroot/run
$B mkdir -p /newroot/run/tmp
$B chroot /newroot /bin/sh /mnt/guest.sh </dev/null
echo "QKDAGENT-GUEST-EXIT=$?"
$B poweroff -f
"""


class _Cpio:
    """A minimal `newc` cpio writer (what the kernel unpacks as an initramfs)."""

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.ino = 1

    def add(self, name: str, mode: int, data: bytes = b"") -> None:
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
        self.ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.out.write(header + name.encode() + b"\x00")
        self.out.write(b"\x00" * (-(110 + len(name) + 1) % 4))
        self.out.write(data)
        self.out.write(b"\x00" * (-len(data) % 4))

    def finish(self) -> bytes:
        self.add("TRAILER!!!", 0)
        return self.out.getvalue()


def build_initramfs(cache: Path, busybox: Path = Path("/bin/busybox")) -> bytes:
    cpio = _Cpio()
    for directory in ("bin", "proc", "sys", "dev", "newroot", "modules"):
        cpio.add(directory, stat.S_IFDIR | 0o755)
    cpio.add("bin/busybox", stat.S_IFREG | 0o755, busybox.read_bytes())
    cpio.add("init", stat.S_IFREG | 0o755, INIT.encode())
    for path in sorted((cache / "modules").iterdir()):
        cpio.add(f"modules/{path.name}", stat.S_IFREG | 0o644, path.read_bytes())
    return gzip.compress(cpio.finish(), compresslevel=1)


# -- running ----------------------------------------------------------------------------------


@dataclass
class GuestResult:
    exit_code: int | None
    """The script's exit status as the guest reported it; None if it never got that far."""
    console: str
    seconds: float


def run_guest(
    cache: Path, workdir: Path, script: str, *, timeout: float = 240, memory_mb: int = 1024
) -> GuestResult:
    """Boot the cached kernel, run `script` (sh, in the host root, cwd /) and power off.

    `workdir` is shared writable at /mnt in the guest; the script writes its results there.
    """
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise FileNotFoundError("qemu-system-x86_64 is not installed")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "guest.sh").write_text(script)
    initrd = workdir / "initramfs.gz"
    initrd.write_bytes(build_initramfs(cache))
    argv = [
        qemu, "-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", str(memory_mb),
        "-nodefaults", "-display", "none", "-no-reboot", "-serial", "stdio",
        "-kernel", str(cache / "vmlinuz"), "-initrd", str(initrd),
        "-append", "console=ttyS0 panic=-1 quiet loglevel=3 random.trust_cpu=on",
        "-virtfs", f"local,path=/,mount_tag=hostroot,{SHARE},readonly=on",
        "-virtfs", f"local,path={workdir},mount_tag=results,{SHARE}",
        "-device", "virtio-rng-pci",
    ]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    console = out.decode(errors="replace")
    code = None
    for line in console.splitlines():
        if line.strip().startswith(EXIT_MARK):
            try:
                code = int(line.strip()[len(EXIT_MARK) :])
            except ValueError:
                pass
    return GuestResult(code, console, time.monotonic() - started)


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "extract":
        extract(Path(argv[1]), Path(argv[2]))
        count = len((Path(argv[2]) / "modules" / "order").read_text().split())
        print(f"kernel and {count} modules in {argv[2]}")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
