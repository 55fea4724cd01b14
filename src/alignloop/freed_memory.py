"""What Polars' and pyarrow's allocators do with freed memory: keep it, or hand it back.

Polars allocates with jemalloc, pyarrow with mimalloc. Both hand freed pages back to the system
after a short delay (Polars: 0.5 s), and a page handed back is faulted in and zeroed by the kernel
when it is used again. Log work frees and allocates hundreds of megabytes of columns a second, so
the delay decides how much of its time goes to the kernel. Two policies, for two shapes of job:

- `keep`: freed pages stay in the process, to be reused, until it exits. For commands that filter
  or build logs held in memory and exit. 1M events, filter + build, 2-core AMD EPYC: a fresh
  process took 9.4-11.3 s with the libraries' defaults and 8.7-9.5 s with `keep`, its peak
  memory 3.4-3.5 GiB against 4.2; later runs in the same process 8.5-9.1 s (780-820k page faults
  a run) against 7.2-8.2 s (25-52k).
- `release`: freed pages go back at once. For jobs streamed through user partitions on disk:
  with freed pages kept, the footprint grows to a multiple of the one partition they hold (10M
  events: 5.4 GiB instead of 2.6). The same 1M events in memory took 13.1-13.3 s under it.

Both libraries read these settings once, when they load. So the command line chooses a policy
before anything imports them (`choose`), and a command that finds out only later that its job is
streamed starts itself again under `release` (`restart_under`). Settings the user made win.
A program that imports alignloop as a library gets the libraries' defaults.
"""

from __future__ import annotations

import os
import sys

KEEP = {"_RJEM_MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1", "MIMALLOC_PURGE_DELAY": "-1"}
RELEASE = {"_RJEM_MALLOC_CONF": "background_thread:true,dirty_decay_ms:0,muzzy_decay_ms:0",
           "MIMALLOC_PURGE_DELAY": "0"}
POLICIES = {"keep": KEEP, "release": RELEASE}
CHOSEN = "ALIGNLOOP_FREED_MEMORY"
"""The environment variable naming the policy alignloop chose ("user": the user's own settings);
children started with this environment (a restart, a stage run as a subprocess) inherit it."""

POLARS_DEFAULT = "dirty_decay_ms:500,muzzy_decay_ms:1000"
"""What Polars writes into `_RJEM_MALLOC_CONF` when it loads, in front of any value already there:
in a process that imported Polars, that much is not the user's (with POLARS_THP=1 it adds
transparent huge pages, a choice the user made)."""


def _users(env: dict[str, str] | os._Environ) -> bool:
    """Whether the user set either library's setting in `env`."""
    jemalloc = env.get("_RJEM_MALLOC_CONF")
    return "MIMALLOC_PURGE_DELAY" in env or (jemalloc is not None and jemalloc.removeprefix(POLARS_DEFAULT) != "")


def _ours(env: dict[str, str] | os._Environ) -> str | None:
    """The policy `env` runs under when alignloop chose it (its settings are still that policy's)."""
    policy = env.get(CHOSEN)
    # Polars puts its own defaults in front of the jemalloc setting when it loads; the later
    # values win, so a setting that ends with the policy's is still the policy's.
    if policy in POLICIES and all(env.get(k, "").endswith(v) for k, v in POLICIES[policy].items()):
        return policy
    return None


def choose(policy: str) -> str:
    """This process's policy, set in its environment before Polars or pyarrow load. Returns the
    policy in force: `policy`, one alignloop chose for this process before (a restart), or "user"
    when the user set either library's setting."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}: one of {sorted(POLICIES)}")
    chosen = _ours(os.environ)
    if chosen is not None:
        return chosen
    if _users(os.environ):
        os.environ[CHOSEN] = "user"
        return "user"
    os.environ.update({**POLICIES[policy], CHOSEN: policy})
    return policy


def environment(policy: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) for a child process to run under `policy`, as `choose`
    would set it there: settings the user made win."""
    env = dict(os.environ if env is None else env)
    if _ours(env) is None and _users(env):
        return {**env, CHOSEN: "user"}
    return {**env, **POLICIES[policy], CHOSEN: policy}


def settings() -> dict[str, str | None]:
    """The settings this process runs with, and which policy they are (a stage's manifest records them)."""
    return {CHOSEN: os.environ.get(CHOSEN), **{k: os.environ.get(k) for k in KEEP}}


def restart_command(policy: str) -> tuple[list[str], dict[str, str]] | None:
    """(argv, environment) that starts this command again under `policy`, or None when it needs
    no restart: it already runs under it, the user's settings rule, or alignloop chose nothing
    for this process (a library caller, a test calling a command in-process)."""
    current = _ours(os.environ)
    if current is None or current == policy:
        return None
    return [sys.executable, *sys.orig_argv[1:]], {**os.environ, **POLICIES[policy], CHOSEN: policy}


def restart_under(policy: str) -> None:
    """Start this command again under `policy` when it runs under the other one (see
    `restart_command`). Call it before the command has done anything: the process is replaced."""
    command = restart_command(policy)
    if command is None:
        return
    argv, env = command
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, env)
