"""clean-processes finds only this user's medcli processes, ends them, marks their runs."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time

import psutil
import pytest
from typer.testing import CliRunner

from medcli import processes
from medcli.cli import app
from medcli.errors import UsageError
from medcli.run import Run

runner = CliRunner()

# A stand-in for a long medcli stage: it runs a stage the way `medcli train` does (stage
# lock held, manifest entry "running"), burns CPU while it waits, and optionally ignores
# SIGTERM (a hung process).
FAKE = """
import signal, sys, time
from medcli.run import Run
run, ignore_term = sys.argv[2], sys.argv[3] == "1"
if ignore_term:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if run == "-":  # another rank of a job: it computes, but holds no stage
    time.sleep(120)
with Run.open(run).stage("train"):
    print("ready", flush=True)
    end = time.time() + 120
    while time.time() < end:
        pass
"""


@pytest.fixture
def fake_medcli(tmp_path):
    script = tmp_path / "bin" / "medcli"  # named like the console script
    script.parent.mkdir()
    script.write_text(FAKE)
    started = []

    def start(ignore_term=False):
        run = Run.create(tmp_path / "runs", "r", config={}, dataset={}).run_dir
        proc = subprocess.Popen([sys.executable, str(script), "train", str(run), "1" if ignore_term else "0"],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        started.append(proc)
        return proc, run

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_lists_medcli_processes_and_their_runs_but_nothing_else(fake_medcli):
    proc, run = fake_medcli()
    # Mentions medcli in its arguments, but is not medcli: must be left alone.
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "medcli", "train"])
    try:
        found = {p.pid: p for p in processes.find_processes()}
        assert proc.pid in found and bystander.pid not in found
        assert os.getpid() not in found
        assert found[proc.pid].run_dirs == [str(run)]
        assert found[proc.pid].subcommand == "train"
        assert found[proc.pid].cpu_percent > 20, "a busy process must not read as 0% (unprimed psutil)"
        result = runner.invoke(app, ["clean-processes", "--json"])  # dry run by default
        assert result.exit_code == 0
        listed = json.loads(result.stdout)
        assert listed["ended"] is False and proc.pid in {p["pid"] for p in listed["processes"]}
        assert proc.poll() is None  # still alive: a dry run ends nothing
        # review: the listing went to stderr (so `| grep` found nothing) and -q did not silence it
        quiet = runner.invoke(app, ["-q", "clean-processes", "--dry-run"])
        assert quiet.exit_code == 0 and quiet.stderr == "" and str(proc.pid) in quiet.stdout
    finally:
        bystander.kill()
        bystander.wait()


def test_yes_ends_processes_escalating_to_sigkill_and_marks_runs(fake_medcli, monkeypatch):
    polite, polite_run = fake_medcli()
    stubborn, stubborn_run = fake_medcli(ignore_term=True)
    # Only our two fakes may be ended: the developer running these tests may have real
    # medcli trainings going, and a test must never kill them.
    ours = {polite.pid, stubborn.pid}
    find = processes.find_processes
    monkeypatch.setattr(processes, "find_processes", lambda *a, **k: [p for p in find(*a, **k) if p.pid in ours])
    result = runner.invoke(app, ["clean-processes", "--yes", "--grace", "1", "--json"])
    assert result.exit_code == 0, result.output
    report = {p["pid"]: p for p in json.loads(result.stdout)["processes"]}
    # Both are gone (psutil reaped them, so Popen can't see the signal): the stubborn one,
    # which ignores SIGTERM and sleeps for minutes, can only have gone by SIGKILL.
    polite.wait(timeout=10)
    stubborn.wait(timeout=10)
    assert report[polite.pid]["signal"] == "SIGTERM" and report[stubborn.pid]["signal"] == "SIGKILL"
    for run in (polite_run, stubborn_run):
        stage = Run.open(run).stages["train"]
        assert stage["status"] == "interrupted" and "clean-processes" in stage["error"]


def test_grace_zero_still_waits_for_sigkill_before_judging(fake_medcli):
    """--grace 0 is accepted: SIGTERM ignored, SIGKILL at once, and the report must wait for
    the SIGKILL'd process to go (review: it judged after 0 s, "still running after SIGKILL",
    exit 1, the run left running)."""
    stubborn, run = fake_medcli(ignore_term=True)
    [entry] = [p for p in processes.find_processes() if p.pid == stubborn.pid]
    [report] = processes.end_processes([entry], grace_s=0)
    stubborn.wait(timeout=10)
    assert report["ended"] is True and report["signal"] == "SIGKILL" and report["error"] is None
    assert report["runs_marked_interrupted"] == [str(run)]
    assert Run.open(run).stages["train"]["status"] == "interrupted"


def test_a_reused_pid_is_never_signalled(fake_medcli):
    """A process found, then gone, its pid taken by an unrelated process: ending the stale
    entry must not touch the newcomer. psutil's handle checks the start time; a bare pid
    would not."""
    proc, run = fake_medcli()
    [entry] = [p for p in processes.find_processes() if p.pid == proc.pid]
    proc.kill()
    proc.wait()
    # Simulate the reuse: same pid, a different process (the handle's start time no longer matches).
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import psutil

        entry.handle._create_time = entry.handle.create_time() - 1000  # what a reused pid looks like
        entry.handle._pid = bystander.pid
        entry.pid = bystander.pid
        [report] = processes.end_processes([entry], grace_s=1)
        assert bystander.poll() is None and psutil.pid_exists(bystander.pid)
        assert report["runs_marked_interrupted"] == [], "the stage of a live newcomer is not ours to mark"
    finally:
        bystander.kill()
        bystander.wait()


def test_permission_denied_is_reported_not_raised(fake_medcli, monkeypatch):
    import psutil

    proc, run = fake_medcli()
    [entry] = [p for p in processes.find_processes() if p.pid == proc.pid]

    def deny(self):
        raise psutil.AccessDenied(self.pid)

    monkeypatch.setattr(psutil.Process, "terminate", deny)
    monkeypatch.setattr(psutil.Process, "kill", deny)
    [report] = processes.end_processes([entry], grace_s=0.5)
    assert report["ended"] is False and report["error"] == "permission denied" and report["signal"] is None
    assert proc.poll() is None and Run.open(run).stages["train"]["status"] == "running"


def test_older_than_filters_young_processes(fake_medcli):
    proc, _ = fake_medcli()
    assert proc.pid not in {p.pid for p in processes.find_processes(older_than_s=3600)}
    time.sleep(0.2)
    assert proc.pid in {p.pid for p in processes.find_processes(older_than_s=0.1)}


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start a process as another user")
def test_other_users_processes_are_never_listed(tmp_path):
    # argv[0] is "medcli", exactly what a real medcli process shows, but the user is nobody.
    other = subprocess.Popen(["bash", "-c", "exec -a medcli sleep 60"], preexec_fn=lambda: os.setuid(65534))
    try:
        time.sleep(0.3)
        assert other.pid not in {p.pid for p in processes.find_processes()}
    finally:
        other.kill()
        other.wait()


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("10m", 600), ("2h", 7200), ("1d", 86400), ("1h30m", 5400)])
def test_parse_duration(text, seconds):
    assert processes.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "2x", "h", "10 minutes"])
def test_parse_duration_rejects_garbage(text):
    with pytest.raises(UsageError):
        processes.parse_duration(text)


def test_dry_run_and_yes_conflict():
    result = runner.invoke(app, ["clean-processes", "--dry-run", "--yes"])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, said", [(["--run", "no/such/run"], "--run no/such/run: no such run directory"),
                                        (["--run", "FOLDER"], "is no run directory (it has no manifest.json)"),
                                        (["--pid", "-5"], "--pid -5 is not a process id")])
def test_a_job_that_cannot_exist_is_a_usage_error_not_an_empty_table(args, said, tmp_path):
    """Review: a mistyped --run path (or --pid -5) exited 0 with an empty table, which reads as
    "nothing to clean"; so did a folder that is no run (e.g. the runs folder itself)."""
    args = [str(tmp_path) if arg == "FOLDER" else arg for arg in args]
    result = runner.invoke(app, ["clean-processes", *args, "--dry-run"])
    assert result.exit_code == 2 and said in result.stderr and result.stdout == "", result.output


def test_clean_ends_only_with_consent_and_a_process_left_running_exits_1(monkeypatch):
    """processes.clean (the whole of clean-processes): asks `confirm` with the count, ends
    nothing on a no or with dry_run; the CLI exits 1 when a process could not be ended."""
    found = processes.MedcliProcess(pid=999999, age_s=5.0, command="medcli train", subcommand="train")
    monkeypatch.setattr(processes, "find_processes", lambda older_than_s=0.0: [found])
    ended = []

    def end(procs, grace_s=10.0):
        ended.append(procs)
        return [{**p.to_dict(), "signal": None, "ended": False, "error": "permission denied",
                 "runs_marked_interrupted": []} for p in procs]

    monkeypatch.setattr(processes, "end_processes", end)
    asked = []
    report = processes.clean(confirm=lambda count: asked.append(count) or False)
    assert asked == [1] and report == {"ended": False, "processes": [found.to_dict()]} and ended == []
    assert not processes.clean(dry_run=True, confirm=lambda count: True)["ended"] and ended == []
    assert processes.clean(confirm=lambda count: True)["ended"] and len(ended) == 1
    result = runner.invoke(app, ["clean-processes", "--yes", "--json"])
    assert result.exit_code == 1 and json.loads(result.stdout)["processes"][0]["error"] == "permission denied"
    assert "could not end pid 999999: permission denied" in result.stderr


def test_other_trainings_matches_device(fake_medcli):
    proc, _ = fake_medcli()
    assert proc.pid in {p.pid for p in processes.other_trainings("cpu")}  # its device is 'auto'


def test_train_warns_when_another_training_shares_the_device(fake_medcli, monkeypatch):
    from medcli import console, train

    proc, _ = fake_medcli()  # a 'medcli train' holding a run, device auto
    warnings = []
    monkeypatch.setattr(console, "warn", warnings.append)
    train._warn_if_device_shared("cpu")
    assert any(f"pid {proc.pid}" in w for w in warnings)
    assert proc.poll() is None  # warned, never killed
    # The other processes of one distributed job (children of the same launcher) are not others.
    assert proc.pid not in {p.pid for p in processes.other_trainings("cpu", exclude_parent=os.getpid())}


@pytest.mark.parametrize("cmdline, start", [
    (["/usr/bin/python3", "-u", "-m", "medcli", "train"], 4),  # how torchrun starts each rank
    (["python3", "-X", "dev", "-W", "ignore", "-m", "medcli", "evaluate"], 7),
    (["python", "-u", "/venv/bin/medcli", "train"], 3),
    (["/usr/bin/python3", "/venv/bin/torchrun", "--nproc-per-node=2", "-m", "medcli", "train"], 5),
    (["torchrun", "--standalone", "--module", "medcli", "train"], 4),
    (["python", "-c", "import time", "-m", "medcli"], None),  # mentions medcli, is not medcli
    (["python", "-m", "pytest", "medcli"], None),
    (["python", "-", "medcli"], None),  # a script on stdin, given the argument "medcli"
    (["python", "/venv/bin/torchrun", "other.py", "-m", "medcli"], None),  # another program's arguments
    (["torchrun", "--nproc-per-node", "2", "other.py", "--module", "medcli"], None),
    (["python", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "medcli", "train"], 8),
    (["torchrun", "-r3", "-m", "medcli", "train"], 4),  # a short option with its value attached
    (["torchrun", "-m", "--standalone", "medcli", "train"], 4),  # -m is a flag, anywhere among the options
    (["torchrun", "-m", "--standalone", "other.py", "medcli"], None),
])
def test_medcli_is_recognised_behind_interpreter_options_and_torchrun(cmdline, start):
    """Review: the ranks torchrun starts (`python -u -m medcli ...`) were invisible to
    clean-processes, so a hung distributed job could not be ended by it."""
    assert processes._is_medcli(cmdline) == start


def test_run_and_pid_keep_to_one_job_with_its_launcher_and_ranks(tmp_path):
    """Review: `--yes` was the only way to end a hung job, and it ends every medcli process
    of the user. `--run RUN` / `--pid PID` end the job: the process on that run, its launcher
    and the launcher's other ranks (which hold no stage lock), and nothing else."""
    fake = tmp_path / "fake"  # `python -u -m medcli` run from here imports this stand-in
    (fake / "medcli").mkdir(parents=True)
    (fake / "medcli" / "__init__.py").write_text("")
    (fake / "medcli" / "__main__.py").write_text(LAUNCHER)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "medcli").write_text(FAKE)
    runs = [Run.create(tmp_path / "runs", name, config={}, dataset={}).run_dir for name in ("a", "b")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    jobs = [subprocess.Popen([sys.executable, "-u", "-m", "medcli", str(tmp_path / "bin" / "medcli"), str(run)],
                             cwd=fake, env=env, stdout=subprocess.PIPE, text=True) for run in runs]
    try:
        for job in jobs:
            assert job.stdout.readline().strip() == "ready"
        found = processes.find_processes()
        ours = [p for p in found if p.pid in {j.pid for j in jobs}]
        assert len(ours) == 2  # the launchers, `python -u -m medcli`, are seen
        job_a = processes.job_of(found, run=runs[0])
        launcher = next(p for p in job_a if p.pid == jobs[0].pid)
        ranks = [p for p in job_a if p is not launcher]
        assert len(ranks) == 2 and any(p.run_dirs == [str(runs[0])] for p in ranks)  # rank 0 holds the lock, rank 1 not
        assert {p.pid for p in processes.job_of(found, pid=ranks[0].pid)} == {p.pid for p in job_a}
        assert not {p.pid for p in job_a} & {p.pid for p in processes.job_of(found, run=runs[1])}
        result = processes.clean(yes=True, run=runs[0], grace_s=2)
        assert result["ended"] and {p["pid"] for p in result["processes"]} == {p.pid for p in job_a}
        jobs[0].wait(timeout=20)
        assert jobs[1].poll() is None  # the other job runs on
        assert Run.open(runs[0]).stages["train"]["status"] == "interrupted"
    finally:
        for job in jobs:
            if job.poll() is None:
                for child in psutil.Process(job.pid).children(recursive=True):
                    child.kill()
            job.kill()
            job.wait()


# A stand-in for `train --nproc 2`'s launcher: two ranks, `python -u <medcli> train RUN`, of which
# rank 0 runs the stage (FAKE) and rank 1 only computes.
LAUNCHER = """
import subprocess, sys, time
script, run = sys.argv[1], sys.argv[2]
rank0 = subprocess.Popen([sys.executable, "-u", script, "train", run, "0"], stdout=subprocess.PIPE, text=True)
rank1 = subprocess.Popen([sys.executable, "-u", script, "train", "-", "0"])
rank0.stdout.readline()
print("ready", flush=True)
rank0.wait()
"""


# A launcher (torchrun, `train --nproc`) that passes SIGTERM on to its process and waits for it;
# the process writes a line per SIGTERM and takes a moment to stop, as a rank saving its state.
FORWARDING_LAUNCHER = """
import signal, subprocess, sys, time
children = []
signal.signal(signal.SIGTERM, lambda *a: (time.sleep(0.3), children[0].send_signal(signal.SIGTERM)))  # as torchrun
children.append(subprocess.Popen([sys.executable, sys.argv[2], "train", sys.argv[3]]))
children[0].wait()
"""
COUNTING_RANK = """
import signal, sys, time
def stop(*args):
    with open(sys.argv[2], "a") as handle:
        handle.write("SIGTERM\\n")
    time.sleep(1)
    sys.exit(130)
signal.signal(signal.SIGTERM, stop)
open(sys.argv[2] + ".ready", "w").close()
time.sleep(120)
"""


def test_a_launchers_processes_get_sigterm_once_through_it(tmp_path):
    """Review: `clean-processes --run` sent SIGTERM to a torchrun launcher and to its ranks;
    the launcher passed its own on, so each rank got two, and the second landed while rank 0
    was stopping ("error: interrupted", its stage never recorded)."""
    launcher_script, rank_script = tmp_path / "a" / "medcli", tmp_path / "b" / "medcli"  # named like medcli
    for path, text in ((launcher_script, FORWARDING_LAUNCHER), (rank_script, COUNTING_RANK)):
        path.parent.mkdir()
        path.write_text(text)
    log = tmp_path / "signals.txt"
    launcher = subprocess.Popen([sys.executable, str(launcher_script), "train", str(rank_script), str(log)])
    try:
        deadline = time.time() + 30
        while not (tmp_path / "signals.txt.ready").exists() and time.time() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "signals.txt.ready").exists(), "the stand-in rank never started"
        (rank,) = psutil.Process(launcher.pid).children()
        found = [p for p in processes.find_processes() if p.pid in (launcher.pid, rank.pid)]
        assert len(found) == 2
        reports = processes.end_processes(found, grace_s=10)
        launcher.wait(timeout=10)
        assert log.read_text() == "SIGTERM\n"
        assert all(report["ended"] and report["signal"] == "SIGTERM" for report in reports)
    finally:
        try:
            leftovers = [*psutil.Process(launcher.pid).children(recursive=True), psutil.Process(launcher.pid)]
        except psutil.Error:
            leftovers = []
        for proc in leftovers:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        launcher.wait()


def test_a_narrow_terminal_keeps_pids_and_numbers_whole():
    """Review: at COLUMNS=40 the pid 14508 wrapped onto two lines ("145" / "08"), which a user
    copies into kill."""
    from rich.console import Console

    found = processes.MedcliProcess(pid=1450812, age_s=75.0, command="medcli train --model resnet18 --epochs 60",
                                    subcommand="train", run_dirs=["runs/20261201-134614_bloodmnist28_resnet18"],
                                    cpu_percent=187.0, rss_mb=1324.0)
    console = Console(width=40, record=True)
    console.print(processes.table([found], "medcli processes"))
    text = console.export_text()
    assert "1450812" in text, text


def test_an_empty_age_filter_is_refused_not_taken_as_none(monkeypatch):
    """Review: `--older-than "$MAXAGE"` with MAXAGE unset (an empty string) meant no filter:
    with --yes, every medcli process of the user, fresh ones too, was ended."""
    monkeypatch.setattr(processes, "end_processes", lambda *a, **k: pytest.fail("nothing may be ended"))
    with pytest.raises(UsageError, match="cannot read duration"):
        processes.clean(older_than="", yes=True)
    result = runner.invoke(app, ["clean-processes", "--older-than", "", "--yes"])
    assert result.exit_code == 2 and "--older-than is empty (an unset shell variable?)" in result.stderr


def test_ctrl_c_at_the_confirmation_exits_130_not_1(fake_medcli):
    """Review: Ctrl-C at "End 1 process? [y/N]" (a terminal's prompt) printed "Aborted!" and
    exited 1 (Click turns the interrupt into Abort); an interruption exits 130, ending nothing."""
    import select
    import signal

    proc, _ = fake_medcli()
    master, terminal = os.openpty()
    child = subprocess.Popen([sys.executable, "-m", "medcli", "clean-processes", "--pid", str(proc.pid)],
                             stdin=terminal, stdout=terminal, stderr=terminal)
    os.close(terminal)
    shown, deadline = b"", time.monotonic() + 60
    while b"[y/N]" not in shown and time.monotonic() < deadline and child.poll() is None:
        if select.select([master], [], [], 1)[0]:
            shown += os.read(master, 4096)
    assert b"[y/N]" in shown, shown
    time.sleep(1)  # as a person would: a signal caught just before input() blocks in read() waits for a key
    child.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 30
    while child.poll() is None and time.monotonic() < deadline:  # reading on: a terminal nobody reads blocks
        with contextlib.suppress(OSError):
            if select.select([master], [], [], 1)[0]:
                shown += os.read(master, 4096)
    os.close(master)
    assert child.poll() == 130, shown
    assert proc.poll() is None  # still running


@pytest.mark.parametrize("mode", ["--yes", "--dry-run"])
def test_a_pid_that_is_no_medcli_process_exits_1(mode, fake_medcli):
    """Review: `clean-processes --pid N --yes` of a pid that is no medcli process of this user
    (ended already, a typo, another program) exited 0, which a script reads as "ended"; like
    kill(1), naming one process that is not there is a failure, and the program is left alone.
    A medcli process that --older-than leaves out is said to be too young (exit 0), and a
    --run nobody works on stays a plain empty listing: that job has simply ended."""
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "medcli", "train"])
    proc, run = fake_medcli()
    try:
        result = runner.invoke(app, ["clean-processes", "--pid", str(bystander.pid), mode, "--json"])
        assert result.exit_code == 1 and result.stdout == "", result.output
        assert result.stderr.strip().splitlines() == [f"error: pid {bystander.pid} is no medcli process of this user"]
        assert bystander.poll() is None
        young = runner.invoke(app, ["clean-processes", "--pid", str(proc.pid), "--older-than", "1h", mode, "--json"])
        assert young.exit_code == 0 and json.loads(young.stdout)["processes"] == [], young.output
        assert f"pid {proc.pid} is not older than 1h" in young.stderr and proc.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
