"""Pure renderers of the files written into a sandbox (and next to it)."""

from __future__ import annotations

from pathlib import Path

CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
# Point every TLS stack at the system bundle (uv, pip, requests, curl); harmless on a real host.
CA_ENV = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "PIP_CERT", "CURL_CA_BUNDLE")
HEADER = "# Written by mlflow-stack sandbox; do not edit.\n"


def sshd_config(port: int, address: str = "127.0.0.1") -> str:
    """Full /etc/ssh/sshd_config: key-only logins on `address:port`."""
    return HEADER + (
        "Include /etc/ssh/sshd_config.d/*.conf\n"
        f"ListenAddress {address}\n"
        f"Port {port}\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\n"
        "PubkeyAuthentication yes\n"
        "UsePAM yes\n"
        "UseDNS no\n"
        "X11Forwarding no\n"
        "PrintMotd no\n"
        "AllowTcpForwarding yes\n"
        "MaxSessions 64\n"
        "MaxStartups 64:30:128\n"
        "Subsystem sftp /usr/lib/openssh/sftp-server\n"
    )


def hosts(name: str, address: str | None = None) -> str:
    """/etc/hosts resolving the sandbox's own hostname (else sudo warns).

    A host with a fixed address (a private sandbox) maps its name to it, as Debian advises;
    one sharing the controller's network gets Debian's 127.0.1.1.
    """
    return (
        "127.0.0.1\tlocalhost\n"
        f"{address or '127.0.1.1'}\t{name}\n"
        "::1\tlocalhost ip6-localhost ip6-loopback\n"
        "ff02::1\tip6-allnodes\n"
        "ff02::2\tip6-allrouters\n"
    )


def sudoers(user: str) -> str:
    """/etc/sudoers.d/90-<user>: passwordless sudo, as on an EC2 Ubuntu image."""
    return f"{user} ALL=(ALL) NOPASSWD:ALL\n"


def environment() -> str:
    """/etc/environment (read by pam_env for SSH and sudo sessions)."""
    return "".join(f'{var}="{CA_BUNDLE}"\n' for var in CA_ENV)


def systemd_environment() -> str:
    """systemd manager drop-in giving every unit the same CA variables."""
    pairs = " ".join(f'"{var}={CA_BUNDLE}"' for var in CA_ENV)
    return HEADER + f"[Manager]\nDefaultEnvironment={pairs}\n"


def known_hosts(host_keys: list[str], port: int, address: str = "127.0.0.1") -> str:
    """known_hosts lines pinning each `<type> <base64>` host key to `[address]:port`."""
    pattern = address if port == 22 else f"[{address}]:{port}"
    lines = []
    for key in host_keys:
        kind, blob = key.split()[:2]
        lines.append(f"{pattern} {kind} {blob}\n")
    return "".join(lines)


def ssh_config(
    name: str, port: int, user: str, key_file: Path, known_hosts_file: Path, address: str
) -> str:
    """An ssh_config `Host <name>` entry for `ssh -F <file> <name>`."""
    return (
        f"Host {name}\n"
        f"    HostName {address}\n"
        f"    Port {port}\n"
        f"    User {user}\n"
        f"    IdentityFile {key_file}\n"
        "    IdentitiesOnly yes\n"
        f"    UserKnownHostsFile {known_hosts_file}\n"
        "    GlobalKnownHostsFile /dev/null\n"
        "    StrictHostKeyChecking yes\n"
    )


def parse_failed_units(output: str) -> list[str]:
    """Unit names from `systemctl --failed --plain --no-legend` output."""
    units = []
    for line in output.splitlines():
        fields = line.split()
        if fields and fields[0] in ("●", "*"):
            fields = fields[1:]
        if fields:
            units.append(fields[0])
    return units
