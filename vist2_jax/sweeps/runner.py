"""``vist2 sweep run``: each variant's stages in order, each started only when the one before
it finished (``state.finished``: its run folder says so), finished stages skipped, a failed
or preempted stage relaunched up to ``retries`` times (the trainer resumes from its newest
checkpoint). A chain that fails stops alone; the others go on.

Launchers: ``local`` runs ``vist2 train`` here, one stage at a time (a child that dies with
the runner: SIGTERM, so it checkpoints). ``tpu`` runs ``launch/tpu_pod.sh`` (which lasts as
long as the training), ``slurm`` submits ``launch/slurm.sbatch`` and ``gke`` applies
``launch/gke.sh``'s JobSet, then ask the queue until the job has ended. Cluster variants
run side by side, one chain at a time per TPU slice. The outcome is always read from the
run folder, never from an exit code alone."""

from __future__ import annotations

import concurrent.futures
import ctypes
import os
import resource
import shlex
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from vist2_jax import storage
from vist2_jax.sweeps import state as st
from vist2_jax.sweeps.spec import Stage, Sweep, Variant, job_name, launch_command

REPO = Path(__file__).resolve().parents[2]  # the launch/ scripts run from the checkout
_stop = threading.Event()  # set by SIGINT / SIGTERM to the runner: no new launches, no retries


def _die_with_parent() -> None:  # preexec_fn of local children: SIGTERM when the runner dies
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_DEATHSIG
    except OSError:
        pass


class _Process:
    """A launcher process that lives as long as the training (local, tpu). Its output goes
    straight to a file, never through a pipe to the runner, so a child outlives a killed
    runner (and checkpoints on the SIGTERM it gets) without writing to a broken pipe: the
    attempt's log itself on local disk, else a local copy uploaded through the path layer."""

    def __init__(self, command: list[str], log_path, cwd: str | None, local: bool):
        self.log_path = storage.as_path(log_path)
        self.remote = storage.is_remote(self.log_path)
        self.file = (Path(storage.scratch_folder("sweep-logs")) / f"{os.getpid()}-{time.time_ns()}.log" if self.remote
                     else Path(os.fspath(self.log_path)))
        self.file.parent.mkdir(parents=True, exist_ok=True)
        self.file.write_text(f"$ {shlex.join(command)}\n")
        with open(self.file, "a") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                         preexec_fn=_die_with_parent if local else None)
        self.pid = self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def sync(self) -> None:
        if self.remote:
            storage.upload(self.file, self.log_path)

    def close(self) -> None:
        self.sync()


class _Queued:
    """A job handed to a queue (slurm, gke): submitted, then asked until it has ended."""

    def __init__(self, stage: Stage, launcher: str, log_path, local_logs: Path):
        self.launcher, self.log_path, self.pid, self.ended = launcher, log_path, None, None
        self.name = job_name(stage)
        local_logs.mkdir(parents=True, exist_ok=True)
        if launcher == "gke":  # a JobSet of the same name from an earlier attempt would not rerun
            subprocess.run(["kubectl", "delete", "jobset", self.name, "--ignore-not-found"], cwd=REPO,
                           capture_output=True, text=True)
        command = launch_command(stage, launcher, log_dir=str(local_logs))
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        storage.write_atomic(log_path, f"$ {' '.join(command)}\n{done.stdout}{done.stderr}")
        if done.returncode != 0:
            self.ended = done.returncode
        self.job = done.stdout.strip().split(";")[0] if launcher == "slurm" else self.name
        self.local_log = local_logs / f"slurm-{self.job}.log"

    def poll(self) -> int | None:
        if self.ended is not None:
            return self.ended
        if self.launcher == "slurm":
            queued = subprocess.run(["squeue", "-h", "-j", self.job, "-o", "%T"], capture_output=True, text=True)
            if queued.returncode == 0 and queued.stdout.strip():
                return None
            code = subprocess.run(["sacct", "-n", "-X", "-j", self.job, "-o", "ExitCode"], capture_output=True,
                                  text=True).stdout.strip().split(":")[0]
            self.ended = int(code) if code.isdigit() else 1
        else:
            terminal = subprocess.run(["kubectl", "get", "jobset", self.name, "-o",
                                       "jsonpath={.status.terminalState}"], capture_output=True, text=True)
            if terminal.returncode == 0 and not terminal.stdout.strip():
                return None
            self.ended = 0 if terminal.stdout.strip() == "Completed" else 1
        return self.ended

    def sync(self) -> None:  # the queue keeps the log until the job ends
        pass

    def stop(self) -> None:
        if self.launcher == "slurm":
            subprocess.run(["scancel", "--signal=TERM", self.job], capture_output=True)
        else:
            subprocess.run(["kubectl", "delete", "jobset", self.name], capture_output=True)

    def close(self) -> None:
        if self.launcher == "slurm" and self.local_log.exists():
            storage.upload(self.local_log, self.log_path)
        elif self.launcher == "gke":
            logs = subprocess.run(["kubectl", "logs", "-l", f"jobset.sigs.k8s.io/jobset-name={self.name}",
                                   "--tail=2000", "--prefix"], capture_output=True, text=True)
            storage.write_atomic(self.log_path, storage.as_path(self.log_path).read_text() + logs.stdout + logs.stderr)


class Runner:
    def __init__(self, sweep: Sweep, launcher: str, poll_s: float = 2.0, echo=None):
        self.sweep, self.launcher, self.poll_s = sweep, launcher, poll_s
        self.echo = echo or (lambda line: print(line, flush=True))

    def _start(self, stage: Stage, attempt: int):
        log = st.log_path(stage, attempt)
        if self.launcher in ("local", "tpu"):
            local_logs = REPO / "logs" / stage.variant / stage.name / f"attempt-{attempt}"
            command = launch_command(stage, self.launcher, log_dir=str(local_logs) if self.launcher == "tpu" else "")
            if self.launcher == "tpu":
                command[0] = str(REPO / command[0])
            return _Process(command, log, None, local=self.launcher == "local")
        return _Queued(stage, self.launcher, log, REPO / "logs" / stage.variant / stage.name)

    def _wait_for_earlier_runner(self, stage: Stage) -> bool:
        """False when another live runner drives ``stage``; waits for a local child left by a
        killed runner (it is saving its checkpoint after the SIGTERM it got)."""
        state = st.read_state(stage)
        if st.alive(state) and (state.get("host"), state.get("pid")) != (socket.gethostname(), os.getpid()):
            self.echo(f"[{stage.variant}] {stage.name}: driven by another runner (pid {state.get('pid')} on "
                      f"{state.get('host')}); leaving it")
            return False
        child = state.get("child_pid")
        if state.get("host") == socket.gethostname() and child and _pid_alive(int(child)):
            self.echo(f"[{stage.variant}] {stage.name}: waiting for pid {child} (left by an earlier runner) to exit")
            while _pid_alive(int(child)) and not _stop.is_set():
                time.sleep(self.poll_s)
        return True

    def run_stage(self, stage: Stage) -> bool:
        if not self._wait_for_earlier_runner(stage):
            return False
        state = st.read_state(stage)
        first, wall = int(state.get("attempt", 0)) + 1, float(state.get("wall_s", 0.0))
        cpu_s = float(state.get("cpu_s", 0.0))
        last = first + self.sweep.retries
        for attempt in range(first, last + 1):
            if _stop.is_set():
                return False
            cpu = _children_cpu_s()
            resumed = st.metrics(stage)
            note = f", resuming from step {resumed[-1]['step']}" if resumed else ""
            started = time.time()
            job = self._start(stage, attempt)
            self.echo(f"[{stage.variant}] {stage.name}: attempt {attempt} ({attempt - first + 1} of {last - first + 1} "
                      f"in this run) with {self.launcher}{note}; log {st.log_path(stage, attempt)}")
            st.write_state(stage, state="running", attempt=attempt, launcher=self.launcher, host=socket.gethostname(),
                           pid=os.getpid(), child_pid=job.pid, started=started, log=str(st.log_path(stage, attempt)),
                           wall_s=wall)
            beat, stopping = time.time(), False
            while (code := job.poll()) is None:
                time.sleep(self.poll_s)
                if _stop.is_set() and not stopping:
                    job.stop()  # the stage checkpoints and exits
                    stopping = True
                if time.time() - beat >= st.HEARTBEAT_S:
                    job.sync()
                    st.write_state(stage, wall_s=wall + time.time() - started)  # kept if this runner dies
                    beat = time.time()
            job.close()
            wall += time.time() - started
            if self.launcher == "local":  # one child at a time: the CPU time is this stage's
                cpu_s += _children_cpu_s() - cpu
            if st.finished(stage):
                st.write_state(stage, state="done", exit_code=code, wall_s=wall, ended=time.time(),
                               **({"cpu_s": cpu_s} if self.launcher == "local" else {}))
                self.echo(f"[{stage.variant}] {stage.name}: done in {wall:.0f} s")
                return True
            why = "preempted" if code == 0 and (st.summary(stage) or {}).get("preempted") else f"exit code {code}"
            final = attempt == last or _stop.is_set()
            outcome = "stopped" if _stop.is_set() else "failed" if final else "running"
            st.write_state(stage, state=outcome, exit_code=code, wall_s=wall, ended=time.time(), reason=why)
            self.echo(f"[{stage.variant}] {stage.name}: {why}: {st.last_log_line(st.log_path(stage, attempt))}"
                      + ("" if final else "; relaunching"))
        return False

    def run_chain(self, variant: Variant) -> bool:
        for stage in variant.stages:
            if st.finished(stage):
                self.echo(f"[{variant.name}] {stage.name}: finished, skipped")
                continue
            if not self.run_stage(stage):
                later = [s.name for s in variant.stages[stage.index + 1:]]
                if later and not _stop.is_set():
                    self.echo(f"[{variant.name}] chain stopped at {stage.name}; not started: {', '.join(later)}")
                return False
        return True

    def run(self) -> int:
        """Every chain (side by side per TPU slice / job for cluster launchers); 0 when all finished."""
        groups: dict[str, list[Variant]] = {}
        for variant in self.sweep.variants:
            key = "local" if self.launcher == "local" else (
                str(variant.stages[0].entry.get("tpu", variant.name)) if self.launcher == "tpu" else variant.name)
            groups.setdefault(key, []).append(variant)
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, lambda *_: _stop.set())
        _stop.clear()
        try:
            with concurrent.futures.ThreadPoolExecutor(max_workers=len(groups)) as pool:
                results = pool.map(lambda chains: [self.run_chain(v) for v in chains], groups.values())
                ok = all(all(r) for r in results)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if _stop.is_set():
            self.echo("stopped: running stages were told to checkpoint and exit; rerun to continue")
            return 130
        return 0 if ok else 1


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def dry_run(sweep: Sweep, launcher: str) -> list[str]:
    """What ``run`` would do now: finished stages skipped, the command of every other one."""
    import shlex

    lines = []
    for variant in sweep.variants:
        for stage in variant.stages:
            if st.finished(stage):
                lines.append(f"# {variant.name} {stage.name}: finished, skipped")
                continue
            lines.append(f"# {variant.name} {stage.name}: {stage.steps} steps -> {stage.workdir}")
            lines.append(shlex.join(launch_command(stage, launcher)))
    return lines
