"""What one sandbox may use: the recipe section `[env.limits]` and the errors a sandbox raises.

Every limit is enforced by the kernel, not by trusting the code inside: wall time per command (the
agent kills the command's process group), CPU seconds (RLIMIT_CPU), address space per process
(RLIMIT_AS), the largest file (RLIMIT_FSIZE), the repository's and /tmp's size (tmpfs `size=`), and
processes (RLIMIT_NPROC, counted per host uid: every sandbox runs as a uid of its own when the host
is root, so one episode's fork bomb cannot use up another's processes).
"""

from __future__ import annotations

from pydantic import Field

from alignloop.errors import AlignloopError
from alignloop.recipes import Section


class AgentEnvError(AlignloopError):
    """A user-facing agent-environment error: no bubblewrap, a bad task name, an unreachable server."""


class SandboxError(AgentEnvError):
    """The sandbox itself failed (died, stopped answering): the episode ends with this as its error."""


class SandboxLimits(Section):
    wall_seconds: float = Field(10.0, gt=0, le=600, description="wall time of one command (run, test, lint)")
    cpu_seconds: int = Field(10, ge=1, le=600, description="CPU seconds of one command's processes each")
    memory_mb: int = Field(512, ge=64, description="address space of each process in the sandbox")
    processes: int = Field(64, ge=8, description="processes in the sandbox at once (host root only)")
    disk_mb: int = Field(64, ge=1, description="size of the repository's filesystem (/work)")
    tmp_mb: int = Field(16, ge=1, description="size of /tmp")

    def agent_args(self) -> dict:
        return {"wall_seconds": self.wall_seconds, "cpu_seconds": self.cpu_seconds, "memory_mb": self.memory_mb,
                "processes": self.processes, "disk_mb": self.disk_mb}
