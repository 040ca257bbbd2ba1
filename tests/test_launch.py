"""launch/tpu_pod.sh against a fake `gcloud`: one ssh per worker, each worker's log kept
locally, worker 0 streamed, failed workers reported, Ctrl-C stops the local sessions.

The fake runs the remote command it receives with bash in a per-worker "home" whose
`vist2-jax/.venv/bin/vist2` prints a few lines, so the remote `| tee train.log` and its
pipefail are exercised, not only looked for."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ["recipes/stage3_olm.yaml", "size=0.6b"]

FAKE_GCLOUD = r"""#!/usr/bin/env bash
set -euo pipefail
if [[ " $* " == *" tpu-vm describe "* ]]; then echo "$FAKE_WORKERS"; exit 0; fi
[[ " $* " == *" tpu-vm ssh "* ]] || { echo "fake gcloud: unexpected $*" >&2; exit 2; }
worker="" command=""
for arg in "$@"; do
  case "$arg" in
    --worker=*) worker=${arg#--worker=};;
    --command=*) command=${arg#--command=};;
  esac
done
if [[ $worker == all ]]; then  # sync and install: swallow what is piped in
  printf 'all\t%s\t%s\n' "$(wc -c | tr -d ' ')" "$command" >> "$FAKE_CALLS"
  exit 0
fi
printf '%s\t0\t%s\n' "$worker" "$command" >> "$FAKE_CALLS"
home="$FAKE_HOMES/worker-$worker"
mkdir -p "$home/vist2-jax/.venv/bin"
ln -sf "$FAKE_VIST2" "$home/vist2-jax/.venv/bin/vist2"
cd "$home"
FAKE_WORKER=$worker exec bash -c "$command"
"""

FAKE_VIST2 = r"""#!/usr/bin/env bash
echo "fake-train worker=$FAKE_WORKER argv=$*"
echo "fake-train worker=$FAKE_WORKER step 1"
echo "fake-train worker=$FAKE_WORKER on stderr" >&2
if [[ -n "${FAKE_HANG:-}" ]]; then echo $$ > "$FAKE_HOMES/pid-$FAKE_WORKER"; sleep 600; fi
if [[ "$FAKE_WORKER" == "${FAKE_FAIL_WORKER:-}" ]]; then
  echo "fake-train worker=$FAKE_WORKER crashed" >&2
  exit 3
fi
echo "fake-train worker=$FAKE_WORKER done"
"""


def _fake_env(tmp_path, **extra):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("gcloud", FAKE_GCLOUD), ("fake_vist2", FAKE_VIST2)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "homes").mkdir(exist_ok=True)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_CALLS=str(tmp_path / "calls.tsv"),
               FAKE_HOMES=str(tmp_path / "homes"), FAKE_VIST2=str(bin_dir / "fake_vist2"), FAKE_WORKERS="2")
    env.pop("FAKE_FAIL_WORKER", None)
    env.update(extra)
    return env


def _launch(tmp_path, *options, **env):
    return subprocess.run(["bash", "launch/tpu_pod.sh", "--tpu", "t", "--zone", "z", *options, "--", *RECIPE],
                          cwd=ROOT, env=_fake_env(tmp_path, **env), capture_output=True, text=True, timeout=60)


def _calls(tmp_path):
    return [line.split("\t", 2) for line in (tmp_path / "calls.tsv").read_text().splitlines()]


@pytest.mark.parametrize("fail_worker", [None, 2])
def test_tpu_pod_streams_worker0_keeps_every_log_and_reports_failures(tmp_path, fail_worker):
    log_dir = tmp_path / "logs"
    env = {} if fail_worker is None else {"FAKE_FAIL_WORKER": str(fail_worker)}
    proc = _launch(tmp_path, "--workers", "4", "--log-dir", str(log_dir), **env)

    calls = _calls(tmp_path)
    sync, install, *runs = calls
    assert sync[0] == "all" and "tar xzf -" in sync[2] and int(sync[1]) > 1000  # the checkout was piped in
    assert install[0] == "all" and "pip install" in install[2]
    assert sorted(worker for worker, _, _ in runs) == ["0", "1", "2", "3"]
    for _, _, command in runs:
        assert "vist2 train recipes/stage3_olm.yaml size=0.6b" in command and "pipefail" in command

    for i in range(4):
        log = (log_dir / f"worker-{i}.log").read_text()
        assert f"fake-train worker={i} step 1" in log and f"fake-train worker={i} on stderr" in log
        assert all(f"worker={j} " not in log for j in range(4) if j != i)
        assert (tmp_path / "homes" / f"worker-{i}" / "vist2-jax" / "train.log").read_text() == log  # kept remotely too
    assert "fake-train worker=0 step 1" in proc.stdout and "fake-train worker=0 on stderr" in proc.stdout
    assert all(f"fake-train worker={j}" not in proc.stdout for j in (1, 2, 3))

    if fail_worker is None:
        assert proc.returncode == 0, proc.stderr
        assert "exited with status" not in proc.stdout + proc.stderr
        assert str(log_dir) in proc.stdout
    else:
        assert proc.returncode != 0
        # the training's own status (3) comes back through the remote `| tee train.log`
        assert f"worker 2 exited with status 3; log: {log_dir}/worker-2.log" in proc.stderr
        assert "fake-train worker=2 crashed" in proc.stderr  # the end of its log
        assert all(f"worker {j} exited" not in proc.stderr for j in (0, 1, 3))
        assert 'pkill -f "vist2 train"' in proc.stderr


def test_tpu_pod_reads_worker_count_and_no_sync_skips_the_install(tmp_path):
    log_dir = tmp_path / "logs"
    proc = _launch(tmp_path, "--no-sync", "--log-dir", str(log_dir), FAKE_WORKERS="3")
    assert proc.returncode == 0, proc.stderr
    assert sorted(worker for worker, _, _ in _calls(tmp_path)) == ["0", "1", "2"]
    assert sorted(p.name for p in log_dir.iterdir()) == ["worker-0.log", "worker-1.log", "worker-2.log"]


def test_tpu_pod_interrupt_stops_local_sessions_and_says_how_to_stop_remote(tmp_path):
    env = _fake_env(tmp_path, FAKE_HANG="1")
    proc = subprocess.Popen(["bash", "launch/tpu_pod.sh", "--tpu", "t", "--zone", "z", "--workers", "2", "--no-sync",
                             "--log-dir", str(tmp_path / "logs"), "--", *RECIPE],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pid_files = [tmp_path / "homes" / f"pid-{i}" for i in range(2)]
    # generous: CI machines run two test workers on two cores; the fake trainers hang far longer,
    # so they cannot finish on their own before the interrupt (a 30 s hang once did, under load)
    deadline = time.monotonic() + 60
    while not all(p.exists() and p.read_text().strip() for p in pid_files) and time.monotonic() < deadline:
        time.sleep(0.05)
    trainers = [int(p.read_text()) for p in pid_files]
    # no settling pause: the launcher polls its workers, so the interrupt is handled wherever
    # it lands (it used to block in `wait`, where bash could hold it until the job ended)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert "may still run on the workers" in err and "--worker=all --command='pkill -f \"vist2 train\"'" in err

    def alive(pid):  # a killed process may linger as a zombie until something reaps it
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in trainers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in trainers)


DIES_IN_A_COLLECTIVE = """
import os, signal, time
from vist2_jax.training.distributed import initialize_from_env
initialize_from_env()
import jax
from jax.experimental import multihost_utils
multihost_utils.sync_global_devices("started")
if jax.process_index() == 1:
    os.kill(os.getpid(), signal.SIGKILL)  # a host lost mid-run
while True:
    multihost_utils.sync_global_devices("step")  # the survivor waits here for the dead one
"""


def test_local_launch_names_a_killed_process_and_the_survivor_exits_within_the_heartbeat(tmp_path):
    import sys

    script = tmp_path / "dies.py"
    script.write_text(DIES_IN_A_COLLECTIVE)
    env = {**os.environ, "VIST2_HEARTBEAT_S": "5", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "launch/local.py", "--processes", "2", "--grace", "60", "--",
                           sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=180)
    elapsed = time.monotonic() - started
    assert proc.returncode == 128 + signal.SIGKILL, proc.stderr[-3000:]
    assert "process 1 of 2 was killed by SIGKILL" in proc.stderr
    assert "still runs" not in proc.stderr  # the survivor exited by itself, well before the grace
    assert elapsed < 60, elapsed
