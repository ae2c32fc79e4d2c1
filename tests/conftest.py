"""Fixtures every test folder may use: a private PostgreSQL cluster for the clearing tests.

``pg_cluster`` (one per session): initdb into a temporary directory, its own socket directory and
a free loopback port, run as the ``postgres`` user, stopped at the end. ``pg_url``: a fresh,
empty database in it for one test. As root or in CI these must run (``apt-get install
postgresql``); elsewhere they skip loudly."""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

_DATABASES = itertools.count(1)


def _cannot_run(reason: str) -> None:
    message = f"PostgreSQL clearing tests NOT RUN: {reason}"
    if os.geteuid() == 0 or os.environ.get("CI"):
        pytest.fail(f"{message}; as root or in CI they must run (apt-get install postgresql)")
    pytest.skip(message)


def pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


@pytest.fixture(scope="session")
def pg_cluster():
    """``postgresql://postgres@127.0.0.1:PORT/postgres`` of a private cluster."""
    pytest.importorskip("psycopg", reason="psycopg is not installed")
    initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        _cannot_run("initdb/pg_ctl not found")
    if os.geteuid() != 0:
        _cannot_run("starting a private cluster here needs root (to run it as postgres)")
    folder = Path(tempfile.mkdtemp(prefix="fb-pg-"))
    data = folder / "data"
    shutil.chown(folder, "postgres")
    os.chmod(folder, 0o700)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    def as_postgres(*argv):
        return subprocess.run(["runuser", "-u", "postgres", "--", *argv], capture_output=True,
                              text=True, timeout=120)

    made = as_postgres(initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8")
    assert made.returncode == 0, made.stderr
    started = as_postgres(pg_ctl, "-D", str(data), "-l", str(folder / "log"), "-w", "-o",
                          f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 "
                          "-c max_connections=300 -c fsync=off", "start")
    assert started.returncode == 0, started.stderr + (folder / "log").read_text()
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        as_postgres(pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def pg_url(pg_cluster):
    """A fresh empty database in the session's cluster, for one test."""
    import psycopg

    name = f"fb_{os.getpid()}_{next(_DATABASES)}"
    with psycopg.connect(pg_cluster, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield pg_cluster.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(pg_cluster, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
