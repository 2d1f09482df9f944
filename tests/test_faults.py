"""Dead, stopped and interrupted peers, with real processes and real signals.

The kill matrix runs ``pvmmu run`` as its own process, waits until the guest is in
the measured part (hundreds of hypercalls done), sends one signal to the host, the
guest or the supervisor, and checks what the user sees (exit status, message) and
that nothing is left behind (the autouse ``no_leaks`` fixture checks segments, run
directories and processes after every test; these tests also check by name).
"""

from __future__ import annotations

import glob
import json
import os
import signal
import stat
import subprocess
import sys
import time

import psutil
import pytest

from protocol.messages import pack_hello, pack_hypercall, unpack
from pvmmu.doorbell import ZmqCaller
from pvmmu.rundir import run_dirs, runtime_dir
from pvmmu.shm import GuestMemory, list_segments
from pvmmu.supervisor import RunConfig, RunError, hosted, run_pair

PVMMU = [sys.executable, "-m", "pvmmu"]
LONG_RUN = ["run", "--mode", "direct", "--workload", "writes", "--ops", "1000000", "--mem-mb", "64"]


def _mid_run(cli: subprocess.Popen, timeout: float = 60.0) -> tuple[psutil.Process, psutil.Process]:
    """The host and guest of a running ``pvmmu run``, once the guest is well into the measured part."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert cli.poll() is None, cli.communicate()
        kids = {" ".join(k.cmdline()): k for k in psutil.Process(cli.pid).children(recursive=True)}
        host = next((k for c, k in kids.items() if "-m host_proc" in c), None)
        guest = next((k for c, k in kids.items() if "-m guest_proc" in c), None)
        # Every direct-mode hypercall blocks the guest's main thread once: past 500, it is mid-run.
        if host and guest and guest.num_ctx_switches().voluntary > 500:
            return host, guest
        time.sleep(0.05)
    raise AssertionError("the run did not reach its measured part")


def _segments_of(pid: int) -> list[str]:
    return [n for n in list_segments() if n.startswith(f"pvmmu-{pid}-")]


# What the user must see, per target and signal: (exit status of pvmmu run, text in its stderr).
MATRIX = {
    ("host", signal.SIGKILL): (3, "host process {host} died (signal 9, SIGKILL) during hypercall"),
    ("host", signal.SIGTERM): (3, "host process {host} exited with status 143 after SIGTERM during hypercall"),
    ("host", signal.SIGINT): (3, "host process {host} exited with status 130 after SIGINT during hypercall"),
    ("guest", signal.SIGKILL): (3, "guest process {guest} died (signal 9, SIGKILL)"),
    ("guest", signal.SIGTERM): (3, "guest process {guest} exited with status 143 after SIGTERM"),
    ("guest", signal.SIGINT): (3, "guest process {guest} exited with status 130 after SIGINT"),
    ("supervisor", signal.SIGKILL): (-9, ""),
    ("supervisor", signal.SIGTERM): (143, "pvmmu: terminated by SIGTERM; the pair was torn down"),
    ("supervisor", signal.SIGINT): (130, "pvmmu: terminated by SIGINT; the pair was torn down"),
}


@pytest.mark.parametrize("target, sig", list(MATRIX), ids=[f"{t}-{s.name}" for t, s in MATRIX])
def test_kill_matrix(target, sig):
    cli = subprocess.Popen([*PVMMU, *LONG_RUN], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        host, guest = _mid_run(cli)
        victim = {"host": host, "guest": guest, "supervisor": psutil.Process(cli.pid)}[target]
        os.kill(victim.pid, sig)
        killed = time.monotonic()
        _, err = cli.communicate(timeout=30)
        detected = time.monotonic() - killed
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.communicate()
    code, text = MATRIX[(target, sig)]
    assert cli.returncode == code, err
    assert text.format(host=host.pid, guest=guest.pid) in err
    assert "Traceback" not in err
    # Host and guest are gone too; with the supervisor SIGKILLed they noticed by themselves (parent-death signal).
    gone, alive = psutil.wait_procs([host, guest], timeout=10)
    assert not alive, f"still running: {alive}"
    assert _segments_of(host.pid) == [] and run_dirs(cli.pid) == []
    print(f"{target} {sig.name}: pvmmu run exited {cli.returncode} {detected:.2f}s after the signal")
    if sig == signal.SIGKILL:  # and the next run starts cleanly at once
        record = run_pair(RunConfig(mode="multicall", ops=200, mem_mb=16))
        assert record["consistent"]


def test_run_dir_and_memory_are_private_while_a_run_is_going():
    cli = subprocess.Popen([*PVMMU, *LONG_RUN], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        host, _ = _mid_run(cli)
        (rundir,) = run_dirs(cli.pid)
        assert os.path.dirname(rundir) == runtime_dir()
        assert stat.S_IMODE(os.stat(rundir).st_mode) == 0o700
        assert stat.S_ISSOCK(os.stat(os.path.join(rundir, "doorbell")).st_mode)
        (segment,) = _segments_of(host.pid)
        assert stat.S_IMODE(os.stat(f"/dev/shm/{segment}").st_mode) == 0o600
    finally:
        cli.send_signal(signal.SIGINT)
        cli.communicate(timeout=30)
    assert cli.returncode == 130


def _guest_argv(endpoint: str, host_pid: int) -> list[str]:
    return [sys.executable, "-m", "guest_proc", "--endpoint", endpoint, "--ops", "300", "--host-pid", str(host_pid),
            "--parent-pid", str(os.getpid()), "--barrier"]  # fmt: skip


def test_the_host_frees_a_killed_guests_vcpu_and_its_memory_stays():
    with hosted(RunConfig(vcpus=1, mem_mb=16, timeout=10)) as run:
        guest = run.spawn("guest", _guest_argv(run.links.endpoint, run.host.pid))
        ready = guest.read_event("ready", 30, run.children)
        assert run.control("stats")["attached"] == [0]
        os.kill(guest.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while (stats := run.control("stats"))["attached"] and time.monotonic() < deadline:
            time.sleep(0.02)
        # The host noticed through the guest's pidfd, not a timeout, and freed vCPU 0.
        assert stats["attached"] == [] and stats["departed"][0]["pid"] == ready["pid"]
        # The guest had only attached: the segment is the host's and is still there.
        assert os.path.exists(f"/dev/shm/{run.shm_name}")
        # A new guest can take vCPU 0 and finish consistently on the wiped slot.
        again = run.spawn("guest2", _guest_argv(run.links.endpoint, run.host.pid))
        again.read_event("ready", 30, run.children)
        again.send("go")
        again.read_event("done", 30, run.children)
        again.send("check")
        assert again.read_event("check", 30, run.children)["ok"]
        assert run.control("check")["mismatches"] == 0
        again.send("quit")
        assert again.wait_exit(10) == 0


def test_only_the_creator_unlinks_a_segment_and_pvmmu_clean_sweeps_a_killed_creators():
    host = subprocess.Popen(
        [sys.executable, "-m", "host_proc", "--endpoint", "ipc:///nonexistent-dir/x", "--mem-mb", "8"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    _, err = host.communicate(timeout=30)
    assert host.returncode == 1 and "cannot bind" in err and "Traceback" not in err
    assert _segments_of(host.pid) == []  # a host that fails to start unlinks what it created

    # SIGTERM: the creator unlinks its segment on the way out.
    with hosted(RunConfig(mem_mb=8)) as run:
        os.kill(run.host.pid, signal.SIGTERM)
        assert run.host.wait_exit(10) == 143
        assert not os.path.exists(f"/dev/shm/{run.shm_name}")

    # SIGKILL: nobody else may unlink it while its creator could still be alive; once it is dead, the sweep does.
    rundir = os.path.join(runtime_dir(), "pvmmutest-standalone")
    os.makedirs(rundir, mode=0o700, exist_ok=True)
    host = subprocess.Popen(
        [sys.executable, "-m", "host_proc", "--endpoint", f"ipc://{rundir}/doorbell", "--mem-mb", "8"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        shm = json.loads(host.stdout.readline())["shm"]
        attacher = GuestMemory.attach(shm)  # this process attaches, then lets go: the segment stays
        attacher.close()
        assert os.path.exists(f"/dev/shm/{shm}")
        host.kill()
        host.wait(10)
        assert os.path.exists(f"/dev/shm/{shm}")  # the kernel does not unlink POSIX shared memory
        out = subprocess.run([*PVMMU, "clean"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and f"removed /dev/shm/{shm}" in out.stdout
        assert not os.path.exists(f"/dev/shm/{shm}")
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()
        host.stdout.close()
        host.stderr.close()
        for path in glob.glob(os.path.join(rundir, "*")):
            os.unlink(path)
        os.rmdir(rundir)


def test_eight_runs_started_at_once_do_not_see_each_other():
    procs = [
        subprocess.Popen(
            [
                *PVMMU,
                "run",
                "--mode",
                "multicall",
                "--workload",
                "fork",
                "--ops",
                "300",
                "--seed",
                str(seed),
                "--mem-mb",
                "16",
                "--json",
                "--timeout",
                "60",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for seed in range(1, 9)
    ]
    records = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
        records.append(json.loads(out))
    assert all(r["consistent"] for r in records), [r["problems"] for r in records]
    assert len({r["host"]["pid"] for r in records}) == 8
    # Each host served exactly its own guest's hypercalls; different seeds, different tables.
    assert all(r["host"]["hypercalls"] == r["hypercalls"] and r["host"]["rejected"] == {} for r in records)
    assert len({r["digest"] for r in records}) == 8


def test_a_guest_rewriting_its_buffer_during_hypercalls_cannot_make_the_host_apply_what_it_refused():
    """A second guest process flips the op buffer between legal writes and writes outside memory."""
    mem_mb = 8
    target = 0x400000  # legal: 21 entries of vCPU 0's first pool page
    outside = mem_mb << 20  # refused: the same 21 entries, one page-table's worth past the end of memory
    values = [(0x1000 + i) << 12 | 0x67 for i in range(21)]
    legal = b"".join(struct_write(target + 8 * i, values[i]) for i in range(21))
    hostile = b"".join(struct_write(outside + 8 * i, values[i]) for i in range(21))
    # The two buffers differ only in byte 2 of each pte_phys (0x40 or 0x80), so even a torn copy holds,
    # op by op, either a legal write or a refused one: never a third address.
    assert [i for i in range(len(legal)) if legal[i] != hostile[i]] == [24 * i + 10 for i in range(21)]
    buf_gpa = 0x10000
    with hosted(RunConfig(vcpus=1, mem_mb=mem_mb)) as run:
        door = ZmqCaller(run.links.endpoint, 10, run.host.pid)
        mem = None
        rewriter = None
        try:
            assert type(unpack(door.call(pack_hello(0, os.getpid())))).__name__ == "Welcome"
            mem = GuestMemory.attach(run.shm_name)
            mem.buf[buf_gpa : buf_gpa + len(legal)] = legal
            before = bytes(mem.buf)
            rewriter = subprocess.Popen([sys.executable, "-c", REWRITER, run.shm_name, str(buf_gpa), legal.hex(),
                                         hostile.hex()])  # fmt: skip
            results = []
            seq = 0
            while len(results) < 20000 and not (
                504 in results and any(r < 504 for r in results) and len(results) > 2000
            ):
                seq += 1
                results.append(unpack(door.call(pack_hypercall(0, seq, 2, 504, buf_gpa, 0))).ret)
            rewriter.kill()
            rewriter.wait()
            after = bytes(mem.buf)
            stats = run.control("stats")["totals"]
            check = run.control("check")
        finally:
            if rewriter is not None and rewriter.poll() is None:
                rewriter.kill()
                rewriter.wait()
            if mem is not None:
                mem.close()
            door.close()
    assert all(r % 24 == 0 and 0 <= r <= 504 for r in results)
    assert 504 in results and any(r < 504 for r in results), "the rewriter never raced the host"
    # Every byte outside the buffer and the 21 legal entries is as it was; those hold only legal values.
    changed = [i for page in range(0, len(before), 4096) if before[page : page + 4096] != after[page : page + 4096]
               for i in range(page, page + 4096) if before[i] != after[i] and not buf_gpa <= i < buf_gpa + 504]  # fmt: skip
    assert all(target <= i < target + 168 for i in changed)
    for i in range(21):
        assert int.from_bytes(after[target + 8 * i : target + 8 * i + 8], "little") in (0, values[i])
    # The host's counts add up exactly: each refused write stopped one hypercall, each applied one was counted.
    assert stats["ops"]["write_pte"] == sum(results) // 24
    assert stats["refused"] == {"pte_phys outside guest memory": sum(1 for r in results if r < 504)}
    assert check["mismatches"] == 0
    torn = sum(1 for r in results if 0 < r < 504)
    print(
        f"{len(results)} hypercalls: {results.count(504)} whole legal copies, {results.count(0)} hostile, {torn} torn"
    )


def struct_write(pte_phys: int, pte_val: int) -> bytes:
    return (1).to_bytes(4, "little") + bytes(4) + pte_phys.to_bytes(8, "little") + pte_val.to_bytes(8, "little")


REWRITER = """
import sys
from pvmmu.shm import GuestMemory
mem = GuestMemory.attach(sys.argv[1])
gpa, a, b = int(sys.argv[2]), bytes.fromhex(sys.argv[3]), bytes.fromhex(sys.argv[4])
end = gpa + len(a)
while True:
    mem.buf[gpa:end] = b
    mem.buf[gpa:end] = a
"""


def test_a_host_killed_between_control_commands_is_reported_with_its_signal():
    with hosted(RunConfig(mem_mb=8)) as run:
        os.kill(run.host.pid, signal.SIGKILL)
        run.host.wait_exit(10)
        with pytest.raises(RunError) as err:
            run.control("stats")
    assert str(err.value).startswith(f"host process {run.host.pid} died (signal 9, SIGKILL) during control 'stats'")
