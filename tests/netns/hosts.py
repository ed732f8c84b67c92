"""Several "hosts" on one machine: network namespaces joined by a veth pair (needs root and `ip`).

Each namespace has its own loopback, its own address on the pair and its own port space, so a rank
in one cannot reach the other through 127.0.0.1: traffic between them crosses the veth link and
stays inside the two namespaces (nothing is added to the root namespace). Processes are started
in a host with `ip netns exec NAME ...` and share the filesystem with everything else.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass


class NetnsUnavailable(RuntimeError):
    """Namespaces cannot be created here (not root, no `ip`, or the kernel refused): skip, don't fail."""


@dataclass(frozen=True)
class Host:
    namespace: str
    interface: str
    address: str

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.namespace]


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


def check_available() -> None:
    if os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root")
    if shutil.which("ip") is None:
        raise NetnsUnavailable("the `ip` command (iproute2) is not installed")


class TwoHosts:
    """Context manager: two namespaces `dftA<tag>`/`dftB<tag>` with a veth pair, 10.77.0.1 and .2/24.

    Names carry the pid (and an optional tag), so parallel runs do not collide; the namespaces,
    and with them the veth pair, are deleted on exit whatever happened.
    """

    SUBNET = "10.77.0.{}/24"

    def __init__(self, tag: str = ""):
        suffix = f"{os.getpid()}{tag}"
        self.hosts = [Host(f"dft{side}{suffix}", f"v{side.lower()}{suffix}"[:15], self.SUBNET.format(i + 1)[:-3])
                      for i, side in enumerate("AB")]
        self._made: list[str] = []

    def __enter__(self) -> list[Host]:
        check_available()
        a, b = self.hosts
        try:
            for host in self.hosts:
                try:
                    _ip("netns", "add", host.namespace)
                except RuntimeError as exc:
                    raise NetnsUnavailable(str(exc)) from None
                self._made.append(host.namespace)
            _ip("link", "add", a.interface, "type", "veth", "peer", "name", b.interface)
            for i, host in enumerate(self.hosts):
                _ip("link", "set", host.interface, "netns", host.namespace)
                _ip("-n", host.namespace, "addr", "add", self.SUBNET.format(i + 1), "dev", host.interface)
                _ip("-n", host.namespace, "link", "set", host.interface, "up")
                _ip("-n", host.namespace, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self.hosts

    def close(self) -> None:
        # Deleting a namespace deletes the veth end inside it, and with it the pair; a pair still in
        # the root namespace (failed half-way) is deleted by name.
        subprocess.run(["ip", "link", "del", self.hosts[0].interface], capture_output=True, timeout=30)
        while self._made:
            subprocess.run(["ip", "netns", "del", self._made.pop()], capture_output=True, timeout=30)

    def __exit__(self, *exc) -> None:
        self.close()
