"""The agent inside a sandbox: one process per episode, speaking JSON lines on stdin/stdout.

Runs under the sandbox's Python (`python3 -I -S`, standard library only: it must not depend on
anything the sandbox does not show). It owns the episode's state between tool calls: the files
under /work (a size-capped tmpfs), the environment variables and the working directory that
`run` commands leave behind, and any processes they start in the background.

Requests: {"id": int, "op": str, "args": {...}}; answers: {"id": int, "ok": bool, "result"|"error"}.
Requests are served concurrently (one thread each), so several tool calls of one turn run in
parallel. Every command the policy causes (`run`, `test`, `lint`) is a child process in its own
process group with CPU, memory, file-size and process-count limits, killed with its group when its
wall time runs out; its output goes to files, not pipes, so a background process holding stdout
cannot make a call hang.

`python3 agent_main.py --tests DIR` is the test runner (also run as a limited child): it imports
every tests/test_*.py under DIR, calls each test_* function, and prints one JSON line
{"passed": [...], "failed": {name: error}}.
"""

import base64
import io
import json
import os
import queue
import re
import resource
import signal
import subprocess
import sys
import tarfile
import threading
import time
import traceback

WORK = "/work"
STATE = "/run/agent"   # the agent's private scratch (command output, env/cwd after a command)
OUTPUT_CAP = 8000      # characters of a command's output returned to the policy
FILE_CAP = 20000       # characters of a file returned by read
WORKERS = 8            # requests served at once (parallel tool calls of one turn)


class Agent:
    def __init__(self, limits):
        self.limits = limits
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": WORK, "LANG": "C.UTF-8",
                    "PYTHONDONTWRITEBYTECODE": "1"}
        self.cwd = WORK
        self.lock = threading.Lock()
        self.counter = 0

    # --- paths -------------------------------------------------------------------------------
    def path(self, name):
        """`name` (relative to the working directory, or absolute) resolved; must stay in /work."""
        full = os.path.realpath(os.path.join(self.cwd, name))
        if full != WORK and not full.startswith(WORK + "/"):
            raise ValueError(f"path outside the repository: {name}")
        return full

    # --- children ------------------------------------------------------------------------------
    def _limit(self):
        lim = self.limits
        mem = lim["memory_mb"] * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CPU, (lim["cpu_seconds"], lim["cpu_seconds"] + 1))
        disk = lim["disk_mb"] * 2**20
        resource.setrlimit(resource.RLIMIT_FSIZE, (disk, disk))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    def spawn(self, argv, timeout, cwd=None, env=None):
        """Run argv as a limited child; (exit code or None on timeout, output text, timed_out)."""
        with self.lock:
            self.counter += 1
            out_path = f"{STATE}/out.{self.counter}"
        notes = []
        if self.at_process_limit():
            notes.append(self.defuse())
        timed_out, code = False, None
        with open(out_path, "wb") as out:
            try:
                proc = subprocess.Popen(argv, cwd=cwd or self.cwd, env=env or self.env, stdin=subprocess.DEVNULL,
                                        stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                        preexec_fn=self._limit)  # noqa: PLW1509 rlimits must be set in the child
            except OSError as e:  # EAGAIN: the process limit is reached (a fork bomb left running)
                notes.append(f"could not start: {e}; " + self.defuse())
                proc = None
            if proc is not None:
                try:
                    code = proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    timed_out = True
                    _kill_group(proc)  # the command's whole process group, a fork bomb's forks included
        if self.at_process_limit():
            notes.append(self.defuse())
        with open(out_path, "rb") as f:
            data = f.read(OUTPUT_CAP + 1)
        os.unlink(out_path)
        text = data.decode("utf-8", "replace")
        if len(text) > OUTPUT_CAP:
            text = text[:OUTPUT_CAP] + "\n... [output cut]"
        if notes:
            text += "\n[" + "; ".join(notes) + "]"
        return code, text, timed_out

    def at_process_limit(self):
        limit = self.limits.get("processes", 0)
        return limit > 0 and _live_processes() >= limit - 16

    def defuse(self):
        """At the process limit nothing new can start, the agent's own work included: a fork bomb.
        Everything but the agent goes (background servers too, the price of the bomb)."""
        return f"process limit reached: killed all {_kill_all_but_me()} other processes of the sandbox"

    # --- ops -----------------------------------------------------------------------------------
    def op_init(self, files):
        for name, content in files.items():
            full = self.path(name)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, "w", encoding="utf-8") as f:
                f.write(content)
        return {"files": len(files)}

    def op_run(self, command, timeout=None):
        timeout = min(float(timeout or self.limits["wall_seconds"]), self.limits["wall_seconds"])
        with self.lock:
            self.counter += 1
            tag = self.counter
        trailer = (f'\n__rc=$?; pwd > {STATE}/cwd.{tag}; env -0 > {STATE}/env.{tag}; exit $__rc\n')
        code, output, timed_out = self.spawn(["/bin/bash", "-c", command + trailer], timeout)
        # What the command left behind (cd, export) is the next command's starting state.
        try:
            with open(f"{STATE}/cwd.{tag}") as f:
                cwd = f.read().strip()
            with open(f"{STATE}/env.{tag}", "rb") as f:
                pairs = [p.split(b"=", 1) for p in f.read().split(b"\0") if b"=" in p]
            env = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}
            for k in ("SHLVL", "_", "OLDPWD", "PWD", "__rc"):
                env.pop(k, None)
            with self.lock:
                self.cwd, self.env = cwd, env
        except (OSError, ValueError):
            pass
        for leftover in (f"{STATE}/cwd.{tag}", f"{STATE}/env.{tag}"):
            if os.path.exists(leftover):
                os.unlink(leftover)
        result = {"exit_code": code, "output": output}
        if timed_out:
            result["error"] = f"timed out after {timeout:g} s (killed)"
        elif code is not None and code < 0:
            result["error"] = f"killed by signal {-code}" + (" (CPU time limit)" if -code == signal.SIGXCPU else "")
        elif code is None:
            result["error"] = output
        if "process limit reached" in output and "error" not in result:
            result["error"] = "process limit reached (fork bomb?): the sandbox's processes were killed"
        return result

    def op_read(self, path):
        with open(self.path(path), encoding="utf-8", errors="replace") as f:
            text = f.read(FILE_CAP + 1)
        return {"content": text[:FILE_CAP] + ("\n... [file cut]" if len(text) > FILE_CAP else "")}

    def op_write(self, path, content):
        full = self.path(path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "w", encoding="utf-8") as f:
            f.write(content)
        return {"written": len(content)}

    def op_edit(self, path, old, new):
        full = self.path(path)
        with open(full, encoding="utf-8") as f:
            text = f.read()
        count = text.count(old) if old else 0
        if count != 1:
            raise ValueError(f"old text found {count} times in {path}; it must occur exactly once")
        with open(full, "w", encoding="utf-8") as f:
            f.write(text.replace(old, new, 1))
        return {"edited": path}

    def _files(self):
        for root, dirs, names in os.walk(WORK):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
            for name in sorted(names):
                yield os.path.join(root, name)

    def op_grep(self, pattern, path="."):
        regex = re.compile(pattern)
        base = self.path(path)
        hits = []
        for full in (self._files() if os.path.isdir(base) else [base]):
            if not full.startswith(base):
                continue
            try:
                with open(full, encoding="utf-8") as f:
                    for n, line in enumerate(f, 1):
                        if regex.search(line):
                            hits.append(f"{os.path.relpath(full, WORK)}:{n}: {line.rstrip()[:200]}")
            except (UnicodeDecodeError, OSError):
                continue
            if len(hits) >= 100:
                break
        return {"matches": hits[:100]}

    def op_files(self, max_bytes=200_000):
        """Every text file's content (for the host's semantic search), up to max_bytes in all."""
        out, total = {}, 0
        for full in self._files():
            try:
                with open(full, encoding="utf-8") as f:
                    text = f.read(max_bytes)
            except (UnicodeDecodeError, OSError):
                continue
            total += len(text)
            if total > max_bytes:
                break
            out[os.path.relpath(full, WORK)] = text
        return {"files": out}

    def op_lint(self, path="."):
        code, output, timed_out = self.spawn(["ruff", "check", "--no-cache", "--output-format", "concise",
                                              "--isolated", "--select", "E9,F", self.path(path)], self.limits["wall_seconds"])
        return {"exit_code": code, "output": output.replace(WORK + "/", ""),
                **({"error": "lint timed out"} if timed_out else {})}

    def op_test(self, files=None):
        """Run the repository's tests; `files` (name -> content) are written first (the grader's own
        copies of the test files, so a policy that edits the tests does not grade itself)."""
        for name, content in (files or {}).items():
            self.op_write(name, content)
        code, output, timed_out = self.spawn([sys.executable, "-I", "-S", os.path.abspath(__file__), "--tests", WORK],
                                             self.limits["wall_seconds"], cwd=WORK)
        last = output.strip().splitlines()[-1] if output.strip() else ""
        try:
            report = json.loads(last)
        except ValueError:
            reason = "timed out" if timed_out else f"exit code {code}"
            return {"passed": [], "failed": {}, "error": f"test run failed ({reason}): {output[-2000:]}"}
        return report

    def op_env(self):
        return {"env": dict(self.env), "cwd": self.cwd}

    def op_snapshot(self):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            tar.add(WORK, arcname=".")
        return {"tar": base64.b64encode(buf.getvalue()).decode(), "env": dict(self.env), "cwd": self.cwd}

    def op_restore(self, tar, env, cwd):
        for root, dirs, names in os.walk(WORK, topdown=False):
            for name in names:
                os.unlink(os.path.join(root, name))
            for name in dirs:
                os.rmdir(os.path.join(root, name))
        with tarfile.open(fileobj=io.BytesIO(base64.b64decode(tar)), mode="r:gz") as archive:
            # Python < 3.11.4 has no extraction filters; the archive came out of this sandbox anyway.
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            archive.extractall(WORK, **kwargs)
        with self.lock:
            self.env, self.cwd = dict(env), cwd
        return {"restored": True}

    def op_ping(self):
        return {"pong": True}


def _others():
    """Live processes of the sandbox (its own PID namespace) but pid 1 (bwrap's init) and the agent."""
    me, out = os.getpid(), []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in (1, me):
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.append(int(name))
    return out


def _live_processes():
    return len(_others()) + 2


def _kill_all_but_me():
    """SIGKILL every other process in the sandbox until none is left; how many there were."""
    first = len(_others())
    for _ in range(200):
        others = _others()
        if not others:
            break
        for pid in others:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.005)
    return first


def _kill_group(proc):
    """SIGKILL the process group until it is empty: a fork bomb's members fork while being killed."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    for _ in range(100):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        time.sleep(0.005)


def serve(limits):
    agent = Agent(limits)
    if limits.get("processes"):
        # Counted per host uid (this sandbox's own): bwrap's two processes, this agent and its
        # threads are inside the count too.
        resource.setrlimit(resource.RLIMIT_NPROC, (limits["processes"], limits["processes"]))
    os.makedirs(STATE, exist_ok=True)
    os.makedirs(WORK, exist_ok=True)
    write_lock = threading.Lock()

    def answer(message):
        with write_lock:
            sys.stdout.write(json.dumps(message) + "\n")
            sys.stdout.flush()

    def handle(request):
        try:
            fn = getattr(agent, "op_" + request["op"])
            answer({"id": request["id"], "ok": True, "result": fn(**request.get("args", {}))})
        except Exception as e:  # noqa: BLE001 the policy's mistake (bad path, bad regex): an error result, not a dead agent
            answer({"id": request.get("id"), "ok": False, "error": f"{type(e).__name__}: {e}"})

    # A fixed set of workers, started now: a thread is a task under RLIMIT_NPROC too, and at the
    # process limit the agent must still be able to answer.
    requests = queue.Queue()

    def work():
        while True:
            handle(requests.get())

    for _ in range(WORKERS):
        threading.Thread(target=work, daemon=True).start()
    answer({"id": 0, "ok": True, "result": {"ready": True}})
    for line in sys.stdin:
        if line.strip():
            requests.put(json.loads(line))


def run_tests(root):
    sys.path.insert(0, root)
    passed, failed = [], {}
    tests = os.path.join(root, "tests")
    for name in sorted(os.listdir(tests)) if os.path.isdir(tests) else []:
        if not (name.startswith("test_") and name.endswith(".py")):
            continue
        module = {"__name__": name[:-3], "__file__": os.path.join(tests, name)}
        try:
            with open(module["__file__"], encoding="utf-8") as f:
                exec(compile(f.read(), module["__file__"], "exec"), module)  # noqa: S102 the tests to run
        except BaseException as e:  # noqa: BLE001 a module that does not import fails each of its tests
            failed[name] = f"import failed: {type(e).__name__}: {e}"
            continue
        for fn_name in sorted(k for k in module if k.startswith("test_") and callable(module[k])):
            key = f"{name[:-3]}::{fn_name}"
            try:
                module[fn_name]()
                passed.append(key)
            except BaseException as e:  # noqa: B036, BLE001 a test that exits or raises anything has failed
                tb = traceback.extract_tb(e.__traceback__)[-1]
                failed[key] = f"{type(e).__name__}: {e} (line {tb.lineno}: {tb.line})"
    sys.stdout.write("\n" + json.dumps({"passed": passed, "failed": failed}) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--tests":
        run_tests(sys.argv[2])
    else:
        serve(json.loads(sys.argv[1]))
