"""Per-instance setup of an extracted root: identity, keys, CA certificates, sshd."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from . import render
from .base import ADDRESS, USER
from .rootfs import chroot, run, write

CONTROLLER_CA_DIR = Path("/usr/local/share/ca-certificates")
CONFIGURED = "configured"  # marker file in the state dir once configure() finished


def configure(state: Path, name: str, port: int) -> None:
    """One-time setup of `state/rootfs` as host `name`; ends with the CONFIGURED marker."""
    root = state / "rootfs"
    write(root, "/etc/hostname", f"{name}\n")
    write(root, "/etc/hosts", render.hosts(name))
    write(root, "/etc/machine-id", uuid.uuid4().hex + "\n", mode=0o444)
    if copy_ca_certs(root):
        chroot(root, "update-ca-certificates >/dev/null")
    key = state / "id_ed25519"
    if not key.exists():
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"mlflow-stack@{name}",
             "-f", str(key)])  # fmt: skip
    key.chmod(0o600)
    authorize(root, key.with_suffix(".pub").read_text())
    run(["ssh-keygen", "-A", "-f", str(root)])
    set_port(state, name, port)
    (state / CONFIGURED).touch()


def copy_ca_certs(root: Path, source: Path = CONTROLLER_CA_DIR) -> list[Path]:
    """Copy the controller's extra CA certificates (`*.crt`) into the root."""
    copied = []
    for cert in sorted(source.rglob("*.crt")) if source.is_dir() else []:
        dest = root / "usr/local/share/ca-certificates" / cert.relative_to(source)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cert, dest)
        dest.chmod(0o644)
        copied.append(dest)
    return copied


def authorize(root: Path, public_key: str) -> None:
    """Install `public_key` as the login user's only authorized key."""
    uid, gid, home = passwd_entry(root, USER)
    ssh_dir = root / home.lstrip("/") / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    keys = ssh_dir / "authorized_keys"
    keys.write_text(public_key)
    keys.chmod(0o600)
    for path in (ssh_dir, keys):
        shutil.chown(path, uid, gid)


def passwd_entry(root: Path, user: str) -> tuple[int, int, str]:
    """(uid, gid, home) of `user` from the root's /etc/passwd."""
    for line in (root / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == user:
            return int(fields[2]), int(fields[3]), fields[5]
    raise KeyError(user)


def set_port(state: Path, name: str, port: int) -> None:
    """(Re)write sshd_config for `port` and the controller's known_hosts and ssh_config."""
    root = state / "rootfs"
    write(root, "/etc/ssh/sshd_config", render.sshd_config(port, ADDRESS))
    pubs = [p.read_text() for p in sorted((root / "etc/ssh").glob("ssh_host_*_key.pub"))]
    known = state / "known_hosts"
    known.write_text(render.known_hosts(pubs, port, ADDRESS))
    (state / "ssh_config").write_text(
        render.ssh_config(name, port, USER, state / "id_ed25519", known, ADDRESS)
    )
