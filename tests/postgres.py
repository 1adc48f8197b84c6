"""A throwaway PostgreSQL server for the tests: ``initdb`` into a temporary folder, a free loopback port.

The tests that store conversations run against SQLite and against this server (tests/app/conftest.py,
the ``database_url`` fixture). ``.ci/setup --dev`` installs Debian's ``postgresql``; where the server's
binaries are missing (or, as root, the ``postgres`` account that must run them), the PostgreSQL half
skips with :data:`SKIP_REASON`, which tests/conftest.py's skip guard accepts only on such a machine.

The cluster is for tests only: no fsync, no full-page writes, trust authentication on 127.0.0.1.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

SKIP_REASON = "PostgreSQL is not installed here (initdb and pg_ctl; .ci/setup --dev installs Debian's postgresql)"
USER = "scratchgpt"


def _version(bindir: str) -> tuple[int, ...]:
    match = re.search(r"/(\d+(?:\.\d+)*)/bin$", bindir)
    return tuple(int(p) for p in match.group(1).split(".")) if match else ()


def postgres_bindir() -> Path | None:
    """Where initdb and pg_ctl are: SCRATCHGPT_PG_BIN, Debian's /usr/lib/postgresql/<newest>/bin, or PATH."""
    candidates = [os.environ.get("SCRATCHGPT_PG_BIN", "")]
    candidates += sorted((os.path.dirname(p) for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")), key=_version,
                         reverse=True)
    initdb = shutil.which("initdb")
    candidates.append(os.path.dirname(os.path.realpath(initdb)) if initdb else "")
    for bindir in candidates:
        if bindir and all(os.access(Path(bindir) / tool, os.X_OK) for tool in ("initdb", "pg_ctl")):
            return Path(bindir)
    return None


def _run_as() -> str | None:
    """The account the server tools run as: initdb refuses root, so root hands them to ``postgres``."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres").pw_name
    except KeyError:
        return ""


def postgres_missing() -> bool:
    """Whether this machine cannot start a throwaway server (what SKIP_REASON says)."""
    return postgres_bindir() is None or _run_as() == ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresCluster:
    """One server in a temporary folder; :meth:`database` creates an empty database and gives its URL."""

    def __init__(self) -> None:
        bindir = postgres_bindir()
        if bindir is None or _run_as() == "":
            raise RuntimeError(SKIP_REASON)
        self.bindir = bindir
        self.account = _run_as()
        self.root = Path(tempfile.mkdtemp(prefix="scratchgpt-pg-"))
        if self.account:
            shutil.chown(self.root, user=self.account)
        self.data = self.root / "data"
        self.port = _free_port()
        self._count = 0

    def _tool(self, name: str, *args: str) -> None:
        command = [str(self.bindir / name), *args]
        if self.account:
            command = ["runuser", "-u", self.account, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            log = (self.root / "log").read_text()[-2000:] if (self.root / "log").is_file() else ""
            raise RuntimeError(f"{name} failed ({result.returncode}): {result.stderr.strip()}\n{log}")

    def start(self) -> "PostgresCluster":
        self._tool("initdb", "-D", str(self.data), "-A", "trust", "-U", USER, "-E", "UTF8", "--no-sync")
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c full_page_writes=off -c synchronous_commit=off")
        self._tool("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "log"), "-w", "start")
        return self

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").is_file():
                self._tool("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}/{database}"

    def database(self) -> str:
        """A new empty database (one per test, so tests never see each other's rows); its SQLAlchemy URL."""
        import psycopg

        self._count += 1
        name = f"test_{self._count}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user={USER} dbname=postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def __enter__(self) -> "PostgresCluster":
        try:
            return self.start()
        except BaseException:
            self.stop()  # a half-started server is not left running, nor its folder behind
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
