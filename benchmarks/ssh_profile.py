"""A profile measured over SSH against a real OpenSSH server on 127.0.0.1, with one connection killed mid-run.

Starts /usr/sbin/sshd (Debian `openssh-server`) as a child process, on 127.0.0.1 only, with a host key and
a client key generated in a temp folder; runs `hwnas profile --bundle B --ssh USER@127.0.0.1` through the
SSH transport, kills the ssh client once after KILL_AFTER timings, and lets the transport resume. Prints
JSON: wall time, timings per runner session (nothing finished is timed twice) and the profile's validation.

    PYTHONPATH=$PWD python3 benchmarks/ssh_profile.py [--quick] [--kill-after 40] [--out DIR]
"""
from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

SSHD = "/usr/sbin/sshd"


def sshd_missing() -> str | None:
    """Why a local sshd cannot be started here, or None."""
    if not Path(SSHD).exists():
        return f"{SSHD} is not installed (Debian: apt-get install openssh-server)"
    for tool in ("ssh", "scp", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_sshd(workdir: Path) -> Iterator[tuple[str, list[str]]]:
    """An sshd on 127.0.0.1 accepting a fresh key for this user; yields (user@127.0.0.1, ssh -o options)."""
    workdir.mkdir(parents=True, exist_ok=True)
    host_key, user_key = workdir / "host_key", workdir / "user_key"
    for key in (host_key, user_key):
        if not key.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    authorized = workdir / "authorized_keys"
    authorized.write_text((workdir / "user_key.pub").read_text())
    authorized.chmod(0o600)
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    port = _free_port()
    cmd = [SSHD, "-D", "-e", "-f", "/dev/null", "-p", str(port), "-h", str(host_key),
           "-o", "ListenAddress=127.0.0.1", "-o", f"AuthorizedKeysFile={authorized}", "-o", f"PidFile={workdir / 'sshd.pid'}",
           "-o", "StrictModes=no", "-o", "UsePAM=no", "-o", "PasswordAuthentication=no",
           "-o", "KbdInteractiveAuthentication=no", "-o", "PermitRootLogin=prohibit-password",
           "-o", "Subsystem=sftp internal-sftp"]
    log = open(workdir / "sshd.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"sshd exited at once: {(workdir / 'sshd.log').read_text()[-500:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("sshd did not start listening within 10 s")
            time.sleep(0.1)
        options = [f"Port={port}", f"IdentityFile={user_key}", "IdentitiesOnly=yes", "StrictHostKeyChecking=no",
                   "UserKnownHostsFile=/dev/null", "LogLevel=ERROR", "ConnectTimeout=10"]
        yield f"{getpass.getuser()}@127.0.0.1", options
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def main() -> None:
    """Run the benchmark and print its JSON."""
    import logging

    from hwnas.config import ProfileConfig
    from hwnas.profiling.bundle import profile_from_bundle, write_profile_bundle
    from hwnas.profiling.transport import SSHTransport, measure_bundle

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the --quick profile (the default is a full one)")
    p.add_argument("--kill-after", type=int, default=40, help="kill the ssh client after this many timings")
    p.add_argument("--out", default=None, help="folder for the bundle and the profile (default: a temp folder)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if (why := sshd_missing()) is not None:
        print(json.dumps({"skipped": why}))
        return
    out = Path(args.out or tempfile.mkdtemp(prefix="hwnas-ssh-"))
    cfg = ProfileConfig(device="localhost-ssh", quick=args.quick)
    t0 = time.monotonic()
    write_profile_bundle(cfg, out / "bundle")
    t_bundle = time.monotonic() - t0
    killed: list[int] = []
    with local_sshd(out / "sshd") as (host, options):
        transport = SSHTransport(host, remote_python=sys.executable, remote_dir=str(out / "remote"), options=options)

        def progress(done: int, total: int, stage: str) -> None:
            if not killed and done >= args.kill_after and transport.proc is not None:
                killed.append(done)
                transport.proc.kill()  # the connection drops as if the network went away

        t1 = time.monotonic()
        measure_bundle(transport, out / "bundle", progress=progress, retry_wait_s=1.0)
        t_measure = time.monotonic() - t1
    profile = profile_from_bundle(out / "bundle")
    profile.save(out / "profile.json")
    meas = json.loads((out / "bundle" / "measurements.json").read_text())
    records = meas["records"]["profile"]
    v = profile.validation
    print(json.dumps({
        "cpu": meas["fingerprint"]["cpu_model"], "quick": args.quick, "bundle_s": round(t_bundle, 1),
        "measure_over_ssh_s": round(t_measure, 1), "killed_connection_after": killed,
        "sessions": [{k: s[k] for k in ("resumed_with", "timed")} for s in meas["sessions"]],
        "records": len(records), "distinct_records": len({(k, r) for k, r, _, _ in records}),
        "timed_in_all_sessions": sum(s["timed"] for s in meas["sessions"]),
        "validation": {k: v[k] for k in ("predictor", "n", "mape", "within_10pct", "spearman", "noise_ceiling_within_10pct")},
        "profile": str(out / "profile.json"),
    }, indent=1))


if __name__ == "__main__":
    main()
