"""A throwaway PostgreSQL server for the tests: Debian's binaries, initdb into a temp dir,
listening on 127.0.0.1 and a free port. Postgres refuses to run as root, so as root the
server runs as the packaged ``postgres`` user (``runuser``)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time

from servers import free_port


def _bindir() -> str:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    if not found:
        raise RuntimeError("PostgreSQL not installed: apt-get install -y postgresql")
    return os.path.dirname(found[-1])


class PostgresServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="idemtask-pg-")
        self.data = os.path.join(self.dir, "data")
        self._as: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
            self._as = ["runuser", "-u", "postgres", "--"]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _opts(self) -> list[str]:
        return ["-p", str(self.port), "-k", self.dir, "-c", "fsync=off"]

    def start(self) -> PostgresServer:
        bindir = _bindir()
        subprocess.run(
            [*self._as, f"{bindir}/initdb", "-D", self.data, "-U", "postgres", "-A", "trust"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        self.proc = subprocess.Popen(
            [*self._as, f"{bindir}/postgres", "-D", self.data, "-h", "127.0.0.1", *self._opts()],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready = subprocess.run(
                [f"{bindir}/pg_isready", "-h", "127.0.0.1", "-p", str(self.port)],
                stdout=subprocess.DEVNULL,
            )
            if ready.returncode == 0:
                return self
            time.sleep(0.1)
        raise RuntimeError("postgres did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)
