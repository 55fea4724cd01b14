"""`kill -9` of the server under load loses no acknowledged event, on SQLite and on PostgreSQL.

The server runs as a real process (`alignloop serve`, tiny model); clients post events as fast as
they can and remember every id the server acknowledged; the server is SIGKILLed mid-load and
started again on the same store, and every acknowledged id must be there. PostgreSQL is a real
server started here from Debian's package (`initdb` + `pg_ctl`, as the `postgres` user when the
tests run as root); the test skips when the package is not installed.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from alignloop.serve.run import start_process
from alignloop.serve.store import LogStore


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bin(name: str) -> str | None:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))[-1:]), None)
    return found


@pytest.fixture(scope="module")
def postgres():
    initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    # Not under pytest's tmp folder: its parents are private to root, and the server runs as postgres.
    home = Path(tempfile.mkdtemp(prefix="alignloop-pg-"))
    data = home / "data"
    port = free_port()
    as_postgres: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        as_postgres = ["runuser", "-u", "postgres", "--"]
        shutil.chown(home, "postgres")
    run = lambda *cmd: subprocess.run([*as_postgres, *cmd], check=True, capture_output=True, text=True)
    run(initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
    run(pg_ctl, "-D", str(data), "-o", f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=on",
        "-l", str(data / "log.txt"), "-w", "start")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_postgres, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], check=False, capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


def start_server(tmp_path: Path, store: str) -> tuple[subprocess.Popen, str]:
    recipe = tmp_path / "serve.toml"
    recipe.write_text(f'[serve]\nport = 0\nstore = "{store}"\ncontext = 128\nthreads = 1\n'
                      f'[[models]]\nversion = "v1"\nmodel = "tiny-llama"\n[generation]\nmax_tokens = 4\n')
    return start_process(recipe, timeout=120)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_kill_9_keeps_every_acknowledged_event(backend, tmp_path, request):
    store = str(tmp_path / "logs.db") if backend == "sqlite" else request.getfixturevalue("postgres")
    proc, url = start_server(tmp_path, store)
    try:
        key = httpx.post(f"{url}/api/signup").json()["api_key"]
        h = {"Authorization": f"Bearer {key}"}
        first = httpx.get(f"{url}/api/characters").json()[0]["id"]
        cid = httpx.post(f"{url}/api/conversations", headers=h, json={"character_id": first}).json()["conversation_id"]
        turn = httpx.post(f"{url}/api/conversations/{cid}/messages", headers=h, json={"text": "hi", "parent_id": None},
                          timeout=60).json()["candidate"]["turn_id"]
        acked: list[str] = []
        stop = threading.Event()

        def client() -> None:
            with httpx.Client(timeout=10) as http:
                while not stop.is_set():
                    batch = [{"type": "read", "conversation_id": cid, "turn_id": turn, "value": 1.0,
                              "event_id": f"e-{uuid.uuid4().hex}"} for _ in range(4)]
                    try:
                        r = http.post(f"{url}/api/events", headers=h, json={"events": batch})
                    except httpx.HTTPError:
                        return  # the server is gone
                    if r.status_code == 200:
                        acked.extend(r.json()["event_ids"])

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        while len(acked) < 200:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        stop.set()
        for t in threads:
            t.join()
    finally:
        proc.kill()
    # Started again on the same store: it serves, and every acknowledged event is there.
    proc, url = start_server(tmp_path, store)
    try:
        assert httpx.get(f"{url}/api/conversations", headers=h).json()[0]["conversation_id"] == cid
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    stored = LogStore(store).event_ids()
    missing = set(acked) - stored
    assert len(acked) >= 200 and not missing, f"{len(missing)} of {len(acked)} acknowledged events lost"
