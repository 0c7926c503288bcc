"""Per-instance layer: identity, login key, host keys and sshd, written into the upper dir.

The instance's root is an overlay of the shared read-only base (lower) and `state/upper`;
files written here before boot shadow the base's.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from . import render
from .base import USER, SandboxError
from .rootfs import run

UPPER = "upper"  # the instance's own layer: every change made to the host lands here
CONFIGURED = "configured"  # marker file in the state dir once configure() finished


def configure(
    state: Path, base: Path, name: str, address: str, port: int, resolv: str | None = None
) -> None:
    """One-time setup of host `name`'s layer; ends with the CONFIGURED marker."""
    upper = state / UPPER
    upper.mkdir(mode=0o755)
    put(base, upper, "/etc/hostname", f"{name}\n")
    put(base, upper, "/etc/machine-id", uuid.uuid4().hex + "\n", mode=0o444)
    key = state / "id_ed25519"
    if not key.exists():
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"mlflow-stack@{name}",
             "-f", str(key)])  # fmt: skip
    key.chmod(0o600)
    uid, gid, home = passwd_entry(base, USER)
    public = key.with_suffix(".pub").read_text()
    put(base, upper, f"{home}/.ssh/authorized_keys", public, mode=0o600, owner=(uid, gid))
    make_parents(base, upper, "/etc/ssh/sshd_config")
    run(["ssh-keygen", "-A", "-f", str(upper)])
    set_address(state, base, name, address, port, resolv)
    (state / CONFIGURED).touch()


def put(
    base: Path, upper: Path, path: str, content: str, mode: int = 0o644,
    owner: tuple[int, int] = (0, 0),
) -> Path:  # fmt: skip
    """Write a file into the upper layer (its new parent dirs copy the base's)."""
    dest = make_parents(base, upper, path)
    dest.write_text(content)
    os.chown(dest, *owner)
    dest.chmod(mode)
    return dest


def make_parents(base: Path, upper: Path, path: str) -> Path:
    """Create the parents of `path` in `upper` with the owner and mode they have in `base`."""
    rel = Path(path.lstrip("/"))
    current = upper
    for part in rel.parent.parts:
        current = current / part
        if current.exists():
            continue
        ref = base / current.relative_to(upper)
        if ref.is_symlink():
            raise SandboxError(f"cannot shadow the symlink {ref} in the instance layer")
        st = ref.stat() if ref.is_dir() else None
        current.mkdir()
        os.chown(current, st.st_uid if st else 0, st.st_gid if st else 0)
        current.chmod(st.st_mode & 0o7777 if st else 0o755)
    return upper / rel


def passwd_entry(root: Path, user: str) -> tuple[int, int, str]:
    """(uid, gid, home) of `user` from the root's /etc/passwd."""
    for line in (root / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == user:
            return int(fields[2]), int(fields[3]), fields[5]
    raise SandboxError(f"user {user} missing from {root}/etc/passwd: rebuild with --fresh")


def set_address(
    state: Path, base: Path, name: str, address: str, port: int, resolv: str | None = None
) -> None:
    """(Re)write what names the host's address: sshd_config (`address:port`), /etc/hosts,
    /etc/resolv.conf (`resolv`, private network only) and the controller's known_hosts and
    ssh_config. Run at every boot: a kept instance may come back on another address."""
    upper = state / UPPER
    private = resolv is not None
    put(base, upper, "/etc/ssh/sshd_config", render.sshd_config(port, address))
    put(base, upper, "/etc/hosts", render.hosts(name, address if private else None))
    if private:
        resolv_conf = upper / "etc/resolv.conf"
        if resolv_conf.is_symlink():
            resolv_conf.unlink()
        put(base, upper, "/etc/resolv.conf", resolv)
    pubs = [p.read_text() for p in sorted((upper / "etc/ssh").glob("ssh_host_*_key.pub"))]
    known = state / "known_hosts"
    known.write_text(render.known_hosts(pubs, port, address))
    (state / "ssh_config").write_text(
        render.ssh_config(name, port, USER, state / "id_ed25519", known, address)
    )
