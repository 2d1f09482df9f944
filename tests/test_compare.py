"""pvmmu compare / sweep / bench: real pairs on small sizes, and the pure parts that summarise them.

Counts, bytes and states only: no assertion here depends on how fast the machine is.
"""

from __future__ import annotations

import json
import math
import signal
import struct
import subprocess
import sys
import time

import psutil
import pytest

from guest_proc.paravirt import MODES
from protocol import theory
from pvmmu import bench, compare, plot, stats, sweep
from pvmmu.supervisor import RunConfig

N = 300


def small(**kw) -> RunConfig:
    return RunConfig(**{"workload": "writes", "ops": N, "mem_mb": 32, "timeout": 10.0, **kw})


def png_size(path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR, after checking the signature."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def pvmmu(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pvmmu", *args], capture_output=True, text=True, timeout=timeout)


# --- compare, on real pairs ---


@pytest.fixture(scope="module")
def result():
    return compare.compare(small(), repeat=3, warmup=1)


def test_every_mode_runs_interleaved_after_an_uncounted_warmup(result):
    assert result["modes"] == list(MODES) and [r["mode"] for r in result["rows"]] == list(MODES)
    assert [r["mode"] for r in result["runs"]] == list(MODES) * 3
    assert [r["round"] for r in result["runs"]] == [i for i in range(3) for _ in MODES]
    assert [r["mode"] for r in result["warmup_runs"]] == list(MODES)
    assert all(r["warmup"] for r in result["warmup_runs"]) and not any(r["warmup"] for r in result["runs"])
    assert all(r["consistent"] for r in result["runs"]) and result["consistent"]


def test_summaries_are_made_of_the_runs_records(result):
    for row in result["rows"]:
        mine = [r for r in result["runs"] if r["mode"] == row["mode"]]
        assert row["n"] == 3
        spo = row["figures"]["switches_per_op"]
        assert spo["samples"] == [r["ctx_switches"]["per_op"] for r in mine]
        assert spo["median"] == sorted(spo["samples"])[1]
        assert row["figures"]["switches_guest_involuntary"]["samples"] == [
            r["ctx_switches"]["guest"]["involuntary"] for r in mine
        ]
        assert row["figures"]["hypercalls"]["samples"] == [r["hypercalls"] for r in mine]
        for key in compare.SPREAD:
            assert set(row["figures"][key]) == {"n", "median", "mean", "stdev", "min", "max", "p99", "samples"}


def test_theory_and_measured_over_theory(result):
    rows = {r["mode"]: r for r in result["rows"]}
    batched = theory.write_pte_hypercalls(N, "multicall", 1024, 512)
    assert batched == math.ceil(N / 21)
    assert rows["direct"]["theory_reduction"] == rows["queued"]["theory_reduction"] == 1.0
    assert rows["multicall"]["theory_reduction"] == pytest.approx(N / batched)
    assert rows["multicall"]["figures"]["hypercalls"]["median"] == batched
    m = rows["multicall"]
    assert m["reduction"] == pytest.approx(
        rows["direct"]["figures"]["switches_per_op"]["median"] / m["figures"]["switches_per_op"]["median"]
    )
    assert m["measured_over_theory"] == pytest.approx(m["reduction"] / m["theory_reduction"])
    # Switches follow hypercalls: with the ZeroMQ I/O threads batched, about 6 per hypercall in every mode.
    assert m["measured_over_theory"] > 0.8


def test_the_verdict_claims_fewer_switches_only_with_a_significant_rank_test(result):
    rows = {r["mode"]: r for r in result["rows"]}
    test = rows["multicall"]["tests"]["fewer_switches"]
    # 3 runs each, completely separated: the smallest p three against three allows, 1/20.
    assert test["significant"] and test["p"] == pytest.approx(0.05) and test["method"] == "exact"
    line = next(v for v in result["verdict"] if v.startswith("multicall:"))
    assert f"{rows['multicall']['reduction']:.1f}x fewer context switches than direct" in line
    assert f"theory {rows['multicall']['theory_reduction']:.1f}x" in line
    assert len(result["verdict"]) == len(MODES) - 1


def test_the_text_report(result):
    text = compare.format_compare(result)
    for mode in MODES:
        assert mode in text.splitlines()[5]  # the table's header row
    for label in ("switches per op", "reduction vs direct", "theory (ops per hypercall)", "measured / theory",
                  "ops/s", "hypercall p50 (us)", "hypercall p99 (us)", "spread over runs"):  # fmt: skip
        assert label in text
    assert text.splitlines()[-1] == result["verdict"][-1]
    c = result["conditions"]
    assert f"pyzmq {c['pyzmq']} (libzmq {c['libzmq']})" in text


def test_conditions_are_recorded(result):
    c = result["conditions"]
    for key in ("cpu_count", "cpu_affinity", "load_average", "kernel", "python", "pyzmq", "libzmq", "psutil",
                "msgpack", "run"):  # fmt: skip
        assert c[key] not in (None, "", [], "not installed"), key
    assert (c["run"]["queue_bytes"], c["run"]["host_limit"], c["run"]["workload"], c["run"]["seed"]) == (
        1024, 512, "writes", 1,
    )  # fmt: skip
    assert result["version"] == compare.FORMAT_VERSION
    assert json.loads(json.dumps(result))["rows"][0]["mode"] == "direct"


# --- compare's pure parts: warnings and verdicts on made-up rows ---


def _row(mode: str, spo: list[float], ops_s: list[float], theory_hcs: int = 100) -> dict:
    figures = {key: stats.summarize([1.0] * len(spo)) for key, _, _ in compare.FIGURES}
    figures["switches_per_op"] = stats.summarize(spo)
    figures["ops_per_s"] = stats.summarize(ops_s)
    return {"mode": mode, "n": len(spo), "figures": figures, "consistent": True,
            "theory": {"hypercalls": theory_hcs, "ops_per_hypercall": 100 / theory_hcs}}  # fmt: skip


def _result(rows: list[dict], load: float = 0.0, runnable: list[int] | None = None) -> dict:
    for row in rows:
        row.update(compare.versus(row, rows[0]))
    return {"rows": rows, "runnable_others": runnable or [0] * 6,
            "conditions": {"cpu_affinity": [0, 1], "cpu_count": 2, "load_average": [load, 0, 0]}}  # fmt: skip


def test_quiet_results_draw_no_warning():
    r = _result([_row("direct", [6.0, 6.0, 6.1], [100, 101, 99]), _row("multicall", [0.3] * 3, [900, 910, 905], 5)])
    assert compare.noise_warnings(r) == []


def test_each_noise_warning_names_its_fix():
    rows = [_row("direct", [6.0, 6.0, 6.0], [50, 100, 100]), _row("multicall", [0.3] * 3, [900, 300, 905], 5)]
    warnings = compare.noise_warnings(_result(rows, load=1.7, runnable=[2, 1, 0, 3]))
    text = "\n".join(warnings)
    assert "σ above 10% of the mean" in text and "larger --repeat" in text
    assert "load average was 1.7 on 2 CPUs" in text
    assert "runnable before 3 of 4 runs" in text and "stop it" in text
    assert "direct: the first counted run was 2.0x slower" in text and "raise --warmup" in text
    assert "multicall: the first" not in text  # its slow run was not the first


def test_verdicts_say_untested_or_not_significant_instead_of_claiming():
    one = _result([_row("direct", [6.0], [100]), _row("multicall", [0.3], [900], 5)])
    line = compare.verdict_line(one["rows"][1])
    assert "untested" in line and "--repeat 3" in line and "fewer" not in line
    same = _result([_row("direct", [6.0, 6.1, 5.9], [100, 90, 110]), _row("queued", [6.05, 5.95, 6.0], [95, 105, 99])])
    line = compare.verdict_line(same["rows"][1])
    assert line.startswith("queued: no significant difference in context switches from direct")
    assert "not significantly faster" in line
    # Separated in every run, but by a hair: significant, and still not worth "1.0x fewer".
    hair = _result([_row("direct", [6.010, 6.011, 6.012], [100.0, 100.2, 100.4]),
                    _row("queued", [6.007, 6.008, 6.009], [100.5, 100.7, 100.9])])  # fmt: skip
    line = compare.verdict_line(hair["rows"][1])
    assert "no meaningful difference in context switches" in line and "fewer" not in line
    assert "not meaningfully faster" in line and "significant but under 2%" in line


# --- sweep ---


@pytest.fixture(scope="module")
def swept():
    return sweep.sweep(small(), queues=(128, 1024), limits=(512, 1024), repeat=1)


def test_sweep_measures_each_point_against_its_theory(swept):
    assert [(p["queue_bytes"], p["host_limit"]) for p in swept["points"]] == [(128, 512), (128, 1024),
                                                                              (1024, 512), (1024, 1024)]  # fmt: skip
    assert swept["baseline"]["mode"] == "direct" and swept["consistent"]
    for p in swept["points"]:
        hcs = theory.write_pte_hypercalls(N, "multicall", p["queue_bytes"], p["host_limit"])
        assert p["theory"]["hypercalls"] == hcs == p["figures"]["hypercalls"]["median"]
        assert p["theory_reduction"] == pytest.approx(N / hcs)
    # 128 B holds 5 write_pte whatever the host copies; the 512 B copy caps a 1024 B queue at 21 per call.
    by = {(p["queue_bytes"], p["host_limit"]): p for p in swept["points"]}
    assert by[(128, 512)]["theory_reduction"] == by[(128, 1024)]["theory_reduction"] == N / math.ceil(N / 5)
    assert by[(1024, 512)]["theory_reduction"] == pytest.approx(N / math.ceil(N / 21))
    assert by[(1024, 1024)]["theory_reduction"] == pytest.approx(N / math.ceil(N / 42))
    assert swept["cap_512"] == pytest.approx(N / math.ceil(N / 21))
    assert [b["host_limit"] for b in swept["by_limit"]] == [512, 1024]
    assert [r["mode"] for r in swept["runs"]] == ["direct"] + ["multicall"] * 4


def test_sweep_text_and_plot(swept, tmp_path):
    text = sweep.format_sweep(swept)
    assert "host limit 512 B (2.6.26): at most" in text and "with the patch's 1024 B queue" in text
    out = tmp_path / "sweep.png"
    plot.plot_sweep(swept, str(out))
    width, height = png_size(out)
    assert width > 1000 and height > 400


def test_sweep_configs_put_the_baseline_first():
    configs = sweep.sweep_configs(small(), (256, 512), (512,))
    assert [(c.mode, c.queue_bytes, c.host_limit) for c in configs] == [
        ("direct", 1024, 512), ("multicall", 256, 512), ("multicall", 512, 512),
    ]  # fmt: skip


# --- bench ---


def test_bench_measures_the_raw_doorbells_beside_pvmmu():
    r = bench.bench(RunConfig(mode="direct", ops=200, mem_mb=32), round_trips=200, repeat=1)
    rows = {row["doorbell"]: row for row in r["rows"]}
    assert list(rows) == list(bench.DOORBELLS)
    pipe, zmq_, pv = (r["runs"][name][0] for name in bench.DOORBELLS)
    assert pipe["round_trips"] == zmq_["round_trips"] == pv["round_trips"] == 200
    assert pv["record"]["consistent"] and pv["record"]["hypercalls"] == 200
    for side in ("client", "server"):
        # A pipe process is one thread; ZeroMQ adds an I/O thread that does most of the waking.
        assert pipe["per_side"][side]["other"] == 0
        assert zmq_["per_side"][side]["other"] > 0
        for run in (pipe, zmq_, pv):  # each round trip blocks each side's main thread about once
            assert run["per_side"][side]["main"] >= 0.9 * 200
    assert set(r["overhead"]) == {"os.pipe", "pyzmq REQ/REP"}
    assert r["overhead"]["os.pipe"]["switches"] == pytest.approx(
        rows["pvmmu direct"]["switches_per_round_trip"]["median"] / rows["os.pipe"]["switches_per_round_trip"]["median"]
    )
    assert "pvmmu's direct hypercall takes" in bench.format_bench(r)


# --- the command line ---


def test_cli_compare_json_and_plot(tmp_path):
    out_png = tmp_path / "compare.png"
    p = pvmmu("compare", "--ops", "200", "--mem-mb", "16", "--repeat", "1", "--warmup", "0", "--json",
              "--plot", str(out_png))  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stderr == f"plot written to {out_png}\n"  # and no progress bar: stderr is not a terminal
    doc = json.loads(p.stdout)
    assert doc["version"] == compare.FORMAT_VERSION and doc["command"] == "compare"
    assert [r["mode"] for r in doc["runs"]] == list(MODES)
    for run in doc["runs"]:  # every run's full `pvmmu run` record
        assert {"ops", "hypercalls", "ctx_switches", "theory", "host", "digest", "consistent"} <= set(run)
    assert {r["mode"] for r in doc["rows"]} == set(MODES)
    assert all("untested" in v for v in doc["verdict"])  # one run each cannot be tested
    assert png_size(out_png)[0] > 1000


def test_cli_plot_without_matplotlib_is_a_clear_error_before_any_run(tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None; sys.argv = ['pvmmu'] + sys.argv[1:]; "
            "from pvmmu.cli import main; main()")  # fmt: skip
    for command in ("compare", "sweep"):
        p = subprocess.run([sys.executable, "-c", code, command, "--plot", str(tmp_path / "x.png")],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
        assert p.returncode == 2
        assert p.stderr.strip() == ("pvmmu: --plot needs matplotlib, which is not installed: pip install 'pvmmu[plot]'")
        assert p.stdout == "" and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    "args, text",
    [
        (["sweep", "--queue-bytes", "128,abc"], "is not a comma-separated list of integers"),
        (["sweep", "--host-limit", "512,8"], "8 is not in the range 24<=x<=1048576"),
        (["sweep", "--queue-bytes", ","], "the list is empty"),
        (["compare", "--repeat", "0"], "Invalid value for '--repeat'"),
        (["compare", "--plot", "/nonexistent-dir/x.png"], "directory /nonexistent-dir does not exist"),
        (["bench", "--round-trips", "0"], "Invalid value for '--round-trips'"),
        (["compare", "--placement", "any,middle"], "'middle' is not one of any, same, split"),
        (["compare", "--modes", "multicall,ring"], "direct is the baseline"),
    ],
)
def test_cli_bad_input_is_a_clear_usage_error(args, text):
    p = pvmmu(*args, timeout=60)
    assert p.returncode == 2
    assert text in p.stderr and "Traceback" not in p.stderr


def test_cli_bench_and_sweep_json():
    b = pvmmu("bench", "--round-trips", "100", "--repeat", "1", "--json")
    assert b.returncode == 0, b.stderr
    assert [r["doorbell"] for r in json.loads(b.stdout)["rows"]] == list(bench.DOORBELLS)
    s = pvmmu("sweep", "--ops", "100", "--mem-mb", "16", "--queue-bytes", "256", "--host-limit", "512", "--json")
    assert s.returncode == 0, s.stderr
    doc = json.loads(s.stdout)
    assert [(p["queue_bytes"], p["host_limit"]) for p in doc["points"]] == [(256, 512)]
    assert doc["points"][0]["figures"]["hypercalls"]["median"] == math.ceil(100 / 10)


def test_cli_compare_whose_run_fails_exits_3_without_a_traceback():
    p = pvmmu("compare", "--ops", "1000000", "--mem-mb", "8", "--repeat", "1", "--warmup", "0", timeout=60)
    assert p.returncode == 3, p.stderr
    assert "frame pool exhausted" in p.stderr and "Traceback" not in p.stderr


def _has_child(pid: int, text: str) -> bool:
    for child in psutil.Process(pid).children():
        try:
            if text in " ".join(child.cmdline()):
                return True
        except psutil.NoSuchProcess:
            continue
    return False


def test_cli_compare_terminated_mid_run_tears_down_and_exits_143():
    proc = subprocess.Popen([sys.executable, "-m", "pvmmu", "compare", "--ops", "1000000", "--mem-mb", "64",
                             "--repeat", "1", "--warmup", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not _has_child(proc.pid, "guest_proc"):
            assert time.monotonic() < deadline and proc.poll() is None, "no guest appeared"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143
    assert "terminated by SIGTERM; the pair was torn down" in err and "Traceback" not in err


def test_compare_sets_placement_beside_batching_each_with_its_own_baseline(tmp_path):
    r = compare.compare(small(ops=120), repeat=1, warmup=0, modes=("direct", "multicall", "ring"),
                        placements=("any", "same"))  # fmt: skip
    assert r["placements"] == ["any", "same"] and r["consistent"]
    assert [row["label"] for row in r["rows"]] == [
        "direct any", "multicall any", "ring any", "direct same", "multicall same", "ring same"]  # fmt: skip
    for row in r["rows"]:
        assert row["baseline"]["label"] == f"direct {row['placement']}"
        assert row["theory_reduction"] == pytest.approx(
            row["figures"]["ops"]["median"] / row["theory"]["hypercalls"] if row["mode"] != "direct" else 1.0
        )
    same = [run for run in r["runs"] if run["placement"]["policy"] == "same"]
    assert len(same) == 3 and all(run["placement"]["observed"]["guests"] == [run["placement"]["observed"]["host"]]
                                  for run in same)  # fmt: skip
    text = compare.format_compare(r)
    assert "multicall same" in text and "same " in r["verdict"][-1] and "of any" in r["verdict"][-1]
    assert any("doorbells for" in v for v in r["verdict"] if v.startswith("ring"))
    plot.plot_compare(r, str(tmp_path / "p.png"))
    assert png_size(tmp_path / "p.png")[0] > 1000
