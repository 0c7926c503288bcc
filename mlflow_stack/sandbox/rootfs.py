"""The cached Debian root filesystems, one per distribution (suite).

debootstrap builds each once into a tarball (the cache, keyed by the recipe and the suite);
the tarball is unpacked once more into a read-only *base* directory, with the controller's CA
certificates added, that every instance mounts as the lower layer of its overlay root.
Cache names: `debian-<suite>-rootfs-<key>.tar` and `debian-<suite>-base-<key>-<hash>/`; a new
build or pruning removes old entries of its own suite only.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from . import distro as distros
from . import render
from .base import USER, SandboxError, cache_dir, preflight, which
from .distro import Distro

log = logging.getLogger("mlflow_stack.sandbox")

MIRROR = "http://deb.debian.org/debian"
VARIANT = "minbase"
PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "libpam-systemd", "openssh-server", "python3", "sudo",
    "ca-certificates", "curl", "iproute2", "procps", "netbase",
)  # fmt: skip
RECIPE_VERSION = 1
CONTROLLER_CA_DIR = Path("/usr/local/share/ca-certificates")
MASKED_UNITS = (
    "getty@.service", "serial-getty@.service", "console-getty.service",
    "container-getty@.service", "getty.target",
)  # fmt: skip
CUSTOMIZE = f"""set -eu
useradd --create-home --shell /bin/bash --uid 1000 --user-group --groups adm,sudo {USER}
install -d -m 0700 -o {USER} -g {USER} /home/{USER}/.ssh
chmod 0440 /etc/sudoers.d/90-{USER}
visudo -cq -f /etc/sudoers.d/90-{USER}
for f in /etc/pam.d/sudo /etc/pam.d/sudo-i; do  # as on Ubuntu: sudo reads /etc/environment
    echo 'session required pam_env.so readenv=1 user_readenv=0' >> "$f"
done
systemctl mask --quiet {" ".join(MASKED_UNITS)}
rm -f /etc/ssh/ssh_host_*
apt-get clean
rm -rf /var/lib/apt/lists/* && mkdir -p /var/lib/apt/lists/partial
ln -sf /etc/machine-id /var/lib/dbus/machine-id
: > /etc/machine-id
"""
TAR_FLAGS = ("--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls")


def recipe_files(distro: Distro | None = None) -> dict[str, str]:
    """Files written into the image before CUSTOMIZE runs (path -> content)."""
    return {
        f"/etc/sudoers.d/90-{USER}": render.sudoers(USER),
        "/etc/environment": render.environment(),
        "/etc/systemd/system.conf.d/90-sandbox-ca.conf": render.systemd_environment(),
        "/etc/default/locale": "LANG=C.UTF-8\n",
        **_distro(distro).image_files(),
    }


def _distro(distro: Distro | str | None) -> Distro:
    return distro if isinstance(distro, Distro) else distros.get(distro)


def cache_key(distro: Distro | str | None = None) -> str:
    """Short hash of the whole build recipe of `distro`: any change to it means a rebuild."""
    distro = _distro(distro)
    recipe = {
        "version": RECIPE_VERSION,
        "suite": distro.suite,
        "mirror": MIRROR,
        "variant": VARIANT,
        "packages": sorted(PACKAGES),
        "files": recipe_files(distro),
        "customize": CUSTOMIZE,
    }
    blob = json.dumps(recipe, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def tarball_path(distro: Distro | str | None = None) -> Path:
    """Where the tarball for the current recipe of `distro` (default: bookworm) lives."""
    distro = _distro(distro)
    return cache_dir() / f"{distro.prefix}-rootfs-{cache_key(distro)}.tar"


def debootstrap_argv(target: Path, distro: Distro | str | None = None) -> list[str]:
    """The debootstrap command line of the recipe."""
    return [
        "debootstrap", f"--variant={VARIANT}", f"--include={','.join(PACKAGES)}",
        _distro(distro).suite, str(target), MIRROR,
    ]  # fmt: skip


def own_entries(distro: Distro, kind: str) -> list[Path]:
    """Cache entries (`kind`: rootfs or base) of `distro`.

    Entries named `debian12-*` by earlier versions of this tool are left alone: sessions still
    running those versions may use them (delete them by hand once unused).
    """
    return sorted(cache_dir().glob(f"{distro.prefix}-{kind}-*"))


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if missing; the holder may unlink it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fh = open(path, "a")  # noqa: SIM115 - closed below or after the block
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            if os.fstat(fh.fileno()).st_ino == os.stat(path).st_ino:
                break  # still the live lock file, not one unlinked by the previous holder
        except FileNotFoundError:
            pass
        fh.close()
    try:
        yield
    finally:
        fh.close()


def build_lock(prefix: str) -> contextlib.AbstractContextManager[None]:
    """Serialise changes to one distribution's cache entries (others build meanwhile)."""
    return locked(cache_dir() / f".{prefix}.lock")


def ensure_tarball(distro: Distro | str | None = None, *, fresh: bool = False) -> Path:
    """Return the cached tarball of `distro`, building it first if missing (or if `fresh`)."""
    distro = _distro(distro)
    target = tarball_path(distro)
    if target.exists() and not fresh:
        return target
    preflight(need_debootstrap=True)
    with build_lock(distro.prefix):
        if target.exists() and not fresh:  # built meanwhile by another process
            return target
        _build(target, distro)
    return target


def _build(target: Path, distro: Distro) -> None:
    cache = target.parent
    for stale in cache.glob(f".{distro.prefix}-build-*"):  # an interrupted build; we hold the lock
        remove_tree(stale)
    work = Path(tempfile.mkdtemp(prefix=f".{distro.prefix}-build-", dir=cache))
    root, build_log = work / "root", cache / f"debootstrap-{distro.suite}.log"
    started = time.monotonic()
    log.info(
        "building the %s (%s) root filesystem (about a minute); log: %s",
        distro.version, distro.suite, build_log,
    )  # fmt: skip
    try:
        with open(build_log, "wb") as out:
            argv = debootstrap_argv(root, distro)
            rc = subprocess.call(argv, stdout=out, stderr=subprocess.STDOUT)
        if rc != 0:
            raise SandboxError(
                f"debootstrap failed (exit {rc}); see {build_log} "
                f"(needs {MIRROR} reachable; retry with --fresh)"
            )
        for path, content in recipe_files(distro).items():
            write(root, path, content)
        chroot(root, CUSTOMIZE)
        tmp_tar = work / "rootfs.tar"
        run(["tar", *TAR_FLAGS, "-C", str(root), "-cf", str(tmp_tar), "."])
        os.replace(tmp_tar, target)
    finally:
        remove_tree(work)
    for old in own_entries(distro, "rootfs"):
        if old != target and old.suffix == ".tar":
            old.unlink(missing_ok=True)
    log.info("root filesystem cached in %s (%.0f s)", target, time.monotonic() - started)


def controller_certs(source: Path = CONTROLLER_CA_DIR) -> dict[str, bytes]:
    """The controller's extra CA certificates: relative path -> PEM bytes."""
    if not source.is_dir():
        return {}
    return {str(p.relative_to(source)): p.read_bytes() for p in sorted(source.rglob("*.crt"))}


def base_path(tarball: Path, certs: dict[str, bytes]) -> Path:
    """Base directory for this build of `tarball` plus `certs` (either changes -> new base)."""
    digest = hashlib.sha256(str(tarball.stat().st_mtime_ns).encode())
    for name, pem in sorted(certs.items()):
        digest.update(name.encode() + b"\0" + pem)
    stem = tarball.name.removesuffix(".tar").replace("-rootfs-", "-base-")
    return tarball.parent / f"{stem}-{digest.hexdigest()[:8]}"


def ensure_base(tarball: Path) -> Path:
    """The unpacked base (lower layer) for `tarball` and the current CA certificates."""
    certs = controller_certs()
    base = base_path(tarball, certs)
    if base.is_dir():
        return base
    prefix = tarball.name.split("-rootfs-")[0]
    with build_lock(prefix):
        if base.is_dir():
            return base
        for stale in base.parent.glob(f".{prefix}-base-*"):
            remove_tree(stale)
        log.info("unpacking the base root filesystem %s (once per build)", base)
        work = Path(tempfile.mkdtemp(prefix=f".{prefix}-base-", dir=base.parent))
        try:
            root = work / "root"
            root.mkdir(mode=0o755)
            run(["tar", *TAR_FLAGS, "-C", str(root), "-xpf", str(tarball)])
            for name, pem in certs.items():
                write(root, f"/usr/local/share/ca-certificates/{name}", pem.decode())
            if certs:
                chroot(root, "update-ca-certificates >/dev/null")
            os.rename(root, base)
        finally:
            remove_tree(work)
    return base


def prune_bases(keep: set[Path], distro: Distro | str | None = None) -> None:
    """Delete the unpacked bases of `distro` not in `keep` (bases of instances that exist)."""
    distro = _distro(distro)
    with build_lock(distro.prefix):
        keep = keep | lower_dirs_in_use()
        for base in own_entries(distro, "base"):
            if base not in keep:
                log.info("removing unused base %s", base)
                remove_tree(base)


def lower_dirs_in_use() -> set[Path]:
    """Lower layers of every systemd-nspawn running on this machine, whoever started it.

    Instances of other state roots share the cache; their overlay is mounted in nspawn's own
    mount namespace, out of sight, so their command lines are what tells.
    """
    found: set[Path] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if not args or os.path.basename(args[0]) != "systemd-nspawn":
            continue
        for arg in args:
            if arg.startswith("--overlay="):
                found.add(Path(arg.removeprefix("--overlay=").split(":", 1)[0]))
    return found


def write(root: Path, path: str, content: str, mode: int = 0o644) -> Path:
    """Write `content` to `path` inside the tree `root` (parents created)."""
    dest = root / path.lstrip("/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(content)
    dest.chmod(mode)
    return dest


def chroot(root: Path, script: str) -> None:
    """Run a shell script inside `root` with chroot (nothing is mounted)."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root"}
    proc = subprocess.run(
        [which("chroot") or "chroot", str(root), "/bin/sh", "-c", script],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise SandboxError(f"command in the sandbox root {root} failed: {first_line(proc.stderr)}")


def run(argv: list[str]) -> str:
    """Run a controller command; SandboxError with its last stderr line on failure."""
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        what = f"`{' '.join(argv[:2])} …` failed (exit {proc.returncode})"
        raise SandboxError(f"{what}: {first_line(proc.stderr)}")
    return proc.stdout


def first_line(text: str) -> str:
    """The first non-empty line of a command's stderr (the cause, usually)."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "no output")


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path`, deepest first."""
    prefix = str(path.resolve())
    found = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def remove_tree(path: Path) -> None:
    """Delete `path`, first unmounting anything left below it (e.g. by debootstrap)."""
    if not path.exists():
        return
    for point in mounts_under(path):
        if subprocess.call(["umount", point], stderr=subprocess.DEVNULL) != 0:
            subprocess.call(["umount", "-l", point], stderr=subprocess.DEVNULL)
    left = mounts_under(path)
    if left:
        raise SandboxError(f"refusing to delete {path}: still mounted at {left[0]}; unmount it")
    shutil.rmtree(path)
