"""Getting a bundle measured on a device: push it, run its runner (resumably), pull measurements.json.

`LocalTransport` runs the bundle here in a separate Python process; `SSHTransport` uses the system's
`ssh` and `scp`. `measure_bundle` drives either one and retries a dropped connection: the runner resumes
from the partial file on the device, so nothing finished is timed twice.
"""
from __future__ import annotations

import json
import logging
import shlex
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Callable, Protocol, Sequence

from hwnas.profiling import runner

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]  # (done, total, stage)
BUNDLE_FILES = ("models", "manifest.json", "run.py", "hwnas_timer.py", "hwnas_fingerprint.py")
PUSHED_MARK = ".pushed"  # on the device: the sha256 of the manifest pushed there


class TransportError(RuntimeError):
    """The device could not be reached or its runner failed; the message says which and what to do."""


class ConnectionDropped(TransportError):
    """The connection went away mid-run; running again resumes."""


class Transport(Protocol):
    """Where a bundle is measured."""

    def push(self, bundle: Path) -> None:
        """Make the bundle available on the device (idempotent)."""

    def run(self, bundle: Path, args: Sequence[str], progress: Progress | None) -> None:
        """Run the bundle's runner to completion; ConnectionDropped when it may be resumed."""

    def pull(self, bundle: Path) -> Path:
        """Fetch measurements.json into the local bundle folder; returns its path."""


def _stream(cmd: Sequence[str], progress: Progress | None, owner: object) -> tuple[int, list[str]]:
    """Run `cmd`, feeding the runner's JSON progress lines to `progress`; (exit code, last other lines)."""
    proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    owner.proc = proc  # type: ignore[attr-defined]  # lets a caller (or a test) end the connection
    tail: deque[str] = deque(maxlen=20)
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            line = line.rstrip("\n")
            msg = _progress_of(line)
            if msg is None:
                tail.append(line)
                log.info("device: %s", line)
            elif progress is not None:
                progress(msg["progress"], msg["total"], msg["stage"])
    except BaseException:
        proc.kill()
        raise
    finally:
        rc = proc.wait()
        owner.proc = None  # type: ignore[attr-defined]
    return rc, list(tail)


def _progress_of(line: str) -> dict | None:
    if not line.startswith('{"progress"'):
        return None
    try:
        msg = json.loads(line)
        return msg if {"progress", "total", "stage"} <= set(msg) else None
    except ValueError:
        return None


def _check_exit(rc: int, tail: list[str], where: str) -> None:
    """Raise for a failed runner: ConnectionDropped when a rerun resumes, TransportError otherwise."""
    if rc == 0:
        return
    last = next((t for t in reversed(tail) if t.strip()), "")
    if rc == 255 or rc < 0 or rc == 141:  # ssh's connection error, a killed client, a runner whose pipe broke
        raise ConnectionDropped(f"{where}: connection lost (exit {rc}) {last}".rstrip())
    if rc == 127:
        raise TransportError(f"{where}: Python not found ({last}); pass --remote-python PATH")
    if rc == 130:
        raise TransportError(f"{where}: the runner was interrupted; run again to continue ({last})")
    raise TransportError(f"{where}: the runner failed (exit {rc}): {last or 'no output'}")


class LocalTransport:
    """This machine, in a fresh Python process (the device case with no network in between)."""

    def __init__(self, python: str = sys.executable) -> None:
        self.python, self.proc = python, None

    def push(self, bundle: Path) -> None:
        """Nothing to copy: the runner works in the bundle folder itself."""

    def run(self, bundle: Path, args: Sequence[str], progress: Progress | None) -> None:
        """`python run.py --progress-json ARGS` in the bundle folder."""
        rc, tail = _stream([self.python, str(Path(bundle) / "run.py"), "--progress-json", *args], progress, self)
        _check_exit(rc, tail, "local runner")

    def pull(self, bundle: Path) -> Path:
        """measurements.json is already in place."""
        return Path(bundle) / runner.MEASUREMENTS_NAME


class SSHTransport:
    """A device reached with the system's `ssh`/`scp` (keys and host aliases from ~/.ssh/config apply)."""

    def __init__(self, host: str, remote_python: str = "python3", remote_dir: str | None = None,
                 options: Sequence[str] = ()) -> None:
        if not host or host.startswith("-"):
            raise ValueError(f"--ssh: not a host: {host!r}")
        self.host, self.remote_python, self.remote_dir = host, remote_python, remote_dir
        # -o options are understood by ssh and scp alike (ssh's -p is scp's -P, hence Port=).
        self.options = [*("-o", "BatchMode=yes", "-o", "ServerAliveInterval=10", "-o", "ServerAliveCountMax=3"),
                        *(a for o in options for a in ("-o", o))]
        self.proc = None

    def _dir(self, bundle: Path) -> str:
        if self.remote_dir:
            return self.remote_dir
        return f"hwnas-bundles/{Path(bundle).resolve().name}-{runner.manifest_sha256(bundle)[:12]}"

    def _ssh(self, command: str, capture: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["ssh", *self.options, self.host, command], stdin=subprocess.DEVNULL,
                              capture_output=capture, text=True)

    def _scp(self, sources: Sequence[str], target: str) -> None:
        done = subprocess.run(["scp", "-q", "-r", *self.options, *sources, target], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True)
        if done.returncode != 0:
            err = (done.stderr.strip().splitlines() or [""])[-1]
            cls = ConnectionDropped if done.returncode == 255 else TransportError
            raise cls(f"scp to/from {self.host}: {err or f'exit {done.returncode}'}")

    def push(self, bundle: Path) -> None:
        """Copy the bundle unless the device holds this very manifest already (its partial state is kept)."""
        bundle, remote = Path(bundle), self._dir(bundle)
        sha = runner.manifest_sha256(bundle)
        q = shlex.quote(remote)
        have = self._ssh(f"mkdir -p {q} && cat {q}/{PUSHED_MARK} 2>/dev/null || true")
        if have.returncode != 0:
            cls = ConnectionDropped if have.returncode == 255 else TransportError
            raise cls(f"ssh {self.host}: {(have.stderr.strip().splitlines() or [''])[-1] or f'exit {have.returncode}'}")
        if have.stdout.strip() == sha:
            log.info("%s:%s already holds this bundle", self.host, remote)
            return
        log.info("copying the bundle to %s:%s", self.host, remote)
        self._scp([str(bundle / f) for f in BUNDLE_FILES], f"{self.host}:{remote}/")
        mark = self._ssh(f"echo {sha} > {q}/{PUSHED_MARK}")
        if mark.returncode != 0:
            raise ConnectionDropped(f"ssh {self.host}: could not mark the bundle as pushed (exit {mark.returncode})")

    def run(self, bundle: Path, args: Sequence[str], progress: Progress | None) -> None:
        """The runner on the device, its progress streamed back."""
        remote = shlex.quote(self._dir(bundle))
        cmd = " ".join([f"cd {remote} &&", shlex.quote(self.remote_python), "run.py", "--progress-json",
                        *(shlex.quote(a) for a in args)])
        rc, tail = _stream(["ssh", *self.options, self.host, cmd], progress, self)
        _check_exit(rc, tail, f"{self.host}")

    def pull(self, bundle: Path) -> Path:
        """scp the device's measurements.json into the local bundle (through a temp name, then a rename)."""
        local = Path(bundle) / runner.MEASUREMENTS_NAME
        tmp = local.with_name(f".{local.name}.pulled")
        self._scp([f"{self.host}:{self._dir(bundle)}/{runner.MEASUREMENTS_NAME}"], str(tmp))
        tmp.replace(local)
        return local


def measure_bundle(transport: Transport, bundle: str | Path, args: Sequence[str] = (),
                   progress: Progress | None = None, retries: int = 3, retry_wait_s: float = 2.0) -> Path:
    """Push, run and pull `bundle` through `transport`, resuming up to `retries` times after a dropped connection."""
    bundle = Path(bundle)
    runner.read_manifest(bundle)  # a broken bundle fails here, not on the device
    for attempt in range(retries + 1):
        try:
            transport.push(bundle)
            transport.run(bundle, args, progress)
            return transport.pull(bundle)
        except ConnectionDropped as err:
            if attempt == retries:
                raise TransportError(f"{err}; gave up after {retries + 1} attempts (rerun to continue)") from None
            log.warning("%s; resuming in %.0f s (attempt %d of %d)", err, retry_wait_s, attempt + 2, retries + 1)
            time.sleep(retry_wait_s)
    raise AssertionError("unreachable")
