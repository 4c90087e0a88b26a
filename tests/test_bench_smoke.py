"""The benchmark suite (``ssl-fast bench``: bench/suite.py, runner.py, measure.py, report.py): the correctness
gate of every provider, the CLI on tiny sweeps (CSV, markdown, PNG, index), refusal of a wrong provider,
rows written as they are measured, thread counts, largest batch, e2e, pytest-benchmark.

No timing assertions: this machine is shared. The benchmark runs in subprocesses, as users run it.
"""

import csv
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import ssl_fast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import measure  # noqa: E402
import ops  # noqa: E402
import report  # noqa: E402
import runner  # noqa: E402


def _env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the benchmark's CPU path never needs the interpreter
    return env


def _bench(args, timeout=600):
    """``ssl-fast bench ARGS`` through the CLI entry point, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "ssl_fast.cli", "bench", *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _device_dir(out):
    dirs = [d for d in os.listdir(out) if os.path.isdir(os.path.join(out, d))]
    assert len(dirs) == 1, dirs
    return os.path.join(out, dirs[0])


# ----------------------------------------------------------------------------------------------------
# the correctness gate, in-process: every provider that can run here matches the float64 reference


GATE_CASES = [pytest.param(op.name, p.name, id=f"{op.name}-{p.name}") for op in ops.OPS.values() for p in op.providers
              if not p.probe]  # a probe of the machine (stream_ceiling) computes nothing of the op: no gate


@pytest.mark.parametrize("op_name,provider", GATE_CASES)
def test_every_provider_passes_the_gate(op_name, provider):
    op = ops.OPS[op_name]
    prov = op.provider(provider)
    why = prov.unavailable("cpu", "fp32")
    if why:
        pytest.skip(why)
    if provider == "ssl_fast_cpp" and not ssl_fast.HAS_EXT:
        pytest.skip("ssl_fast._C not built")
    err = measure.gate(op, prov, torch.device("cpu"), dict(op.hparams))
    assert err <= op.gate_tol, f"{op_name}/{provider}: error {err:.2e} > {op.gate_tol:.0e}"


def test_gate_catches_a_wrong_value_and_a_wrong_gradient():
    op = ops.OPS["ntxent"]
    hp = dict(op.hparams)
    good = op.provider("torch")
    scaled = ops.Provider("x", lambda inputs, hp_, dev: (lambda f=good.build(inputs, hp_, dev): f() * 1.001))
    assert measure.gate(op, scaled, torch.device("cpu"), hp) > op.gate_tol

    def wrong_grad(inputs, hp_, dev):  # the right value, the gradient of z2 dropped
        from ssl_fast import reference
        z1, z2 = inputs["z1"], inputs["z2"]
        return lambda: reference.ntxent_reference(z1, z2.detach(), hp_["temperature"])
    assert measure.gate(op, ops.Provider("y", wrong_grad), torch.device("cpu"), hp) > op.gate_tol
    ema = ops.OPS["ema"]
    lazy = ops.Provider("z", lambda inputs, hp_, dev: (lambda: None))  # an EMA that does nothing
    assert measure.gate(ema, lazy, torch.device("cpu"), dict(ema.hparams)) > ema.gate_tol


# ----------------------------------------------------------------------------------------------------
# the CLI: a tiny sweep writes CSV + markdown + PNG, refuses a wrong provider, renders the index


WRONG = textwrap.dedent('''
    import ops
    from ssl_fast import reference

    def build(inputs, hp, device):
        z1, z2 = inputs["z1"], inputs["z2"]
        return lambda: 1.01 * reference.ntxent_reference(z1, z2, hp["temperature"])

    PROVIDERS = {"ntxent": [ops.Provider("wrong", build, about="1% off, on purpose")]}
''')


@pytest.fixture(scope="module")
def ntxent_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    extra = out / "wrong.py"
    extra.write_text(WRONG)
    proc = _bench(["ntxent", "--n2", "64", "128", "--dim", "16", "--providers", "torch", "ssl_fast_cpp", "lightly",
                   "ssl_fast_triton", "wrong", "--providers-file", str(extra), "--modes", "fwd", "full", "--repeats",
                   "1", "--threads", "1", "--device", "cpu", "--out", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_cli_csv_rows(ntxent_run):
    out, _ = ntxent_run
    rows = _rows(os.path.join(_device_dir(out), "ntxent.csv"))
    assert len(rows) == 2 * 2 * 5
    by = {(r["provider"], r["mode"], r["n2"]): r for r in rows}
    for n2 in ("64", "128"):
        for mode in ("fwd", "full"):
            for prov in ("torch", "ssl_fast_cpp"):
                r = by[prov, mode, n2]
                assert r["status"] == "ok", r
                assert r["gate"].startswith("pass"), r
                for col in ("median_ms", "min_ms", "iqr_ms", "peak_mem_mib", "speedup", "tflops", "pct_peak",
                            "peak_tflops", "peak_gbps", "value", "max_err", "first_call_ms"):
                    assert math.isfinite(float(r[col])), (col, r)
                assert float(r["median_ms"]) > 0 and float(r["max_err"]) < 1e-5
                assert r["commit"] and r["torch"] and r["device_name"] and r["timestamp"]
            assert float(by["torch", mode, n2]["speedup"]) == 1.0
            assert abs(float(by["torch", mode, n2]["value"]) - float(by["ssl_fast_cpp", mode, n2]["value"])) < 1e-5
            assert by["ssl_fast_cpp", mode, n2]["backend"] == "cpp"
            tri = by["ssl_fast_triton", mode, n2]
            assert tri["status"] == "unavailable" and math.isnan(float(tri["median_ms"])) and "cuda" in tri["note"]
            wrong = by["wrong", mode, n2]  # refused: no time, the reason in the note
            assert wrong["status"] == "wrong" and math.isnan(float(wrong["median_ms"]))
            assert "refused" in wrong["note"] and wrong["gate"].startswith("FAIL")
            lightly = by["lightly", mode, n2]
            assert lightly["status"] in ("ok", "unavailable"), lightly


def test_cli_markdown_plot_and_summary(ntxent_run):
    out, stdout = ntxent_run
    d = _device_dir(out)
    md = open(os.path.join(d, "ntxent.md")).read()
    assert "| n2 | dim | mode | torch | lightly | ssl_fast_cpp | ssl_fast_triton | wrong |" in md
    assert "**Peak extra memory, MiB**" in md and "% of the measured device peak" in md
    assert [f for f in os.listdir(d) if f.endswith(".png")]
    assert os.path.exists(os.path.join(d, "peak.csv"))
    assert "ssl_fast x faster" in stdout and "refused" in stdout


def test_cli_report_index(ntxent_run):
    out, _ = ntxent_run
    proc = _bench(["--report", "--out", str(out), "--no-plot"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    index = open(out / "README.md").read()
    assert "## Headline" in index and "[ntxent](" in index
    line = next(ln for ln in index.splitlines() if "[ntxent](" in ln and "n2=128" in ln)
    assert "ssl_fast_cpp" in line and "torch " in line


@pytest.mark.parametrize("args,op,providers", [
    (["sinkhorn", "--b", "64", "--k", "30", "--providers", "swav", "ssl_fast_cpp", "lightly"], "sinkhorn",
     ["swav", "ssl_fast_cpp", "lightly"]),
    (["ema", "--model", "tiny", "--dtype", "fp32-bf16", "--providers", "loop", "ssl_fast_cpp", "timm"], "ema",
     ["loop", "ssl_fast_cpp", "timm"]),
    (["info_nce_queue", "--n", "16", "--queue", "64", "--dim", "16", "--modes", "full"], "info_nce_queue", None),
    (["e2e", "--batch", "4", "--res", "16", "--providers", "torch", "ssl_fast_nn"], "e2e", ["torch", "ssl_fast_nn"]),
    (["adamw_ema", "--model", "tiny", "--dtype", "fp32-bf16", "--providers", "foreach_lerp", "fused_lerp",
      "ssl_fast_cpp"], "adamw_ema", ["foreach_lerp", "fused_lerp", "ssl_fast_cpp"]),
    (["lars_ema", "--model", "tiny", "--dtype", "fp32", "--providers", "ssl_fast_cpp", "stream_ceiling"], "lars_ema",
     ["ssl_fast_cpp", "stream_ceiling"]),
])
def test_cli_other_ops(tmp_path, args, op, providers):
    proc = _bench(args + ["--repeats", "1", "--threads", "1", "--device", "cpu", "--out", str(tmp_path), "--no-plot"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _rows(os.path.join(_device_dir(tmp_path), f"{op}.csv"))
    got = [r["provider"] for r in rows]
    assert got == (providers or [p.name for p in ops.OPS[op].providers])
    for r in rows:
        if r["provider"] in ("timm", "lightly") and r["status"] == "unavailable":
            continue
        if r["provider"] == "ssl_fast_triton":
            assert r["status"] == "unavailable"
            continue
        if r["provider"] == "stream_ceiling":  # the memory probe: timed, not gated
            assert r["status"] == "ok" and r["gate"] == "probe (no gate)" and float(r["median_ms"]) > 0, r
            continue
        assert r["status"] == "ok" and r["gate"].startswith("pass"), r
        assert float(r["median_ms"]) > 0 and float(r["peak_mem_mib"]) >= 0
        if op in ("sinkhorn", "ema", "adamw_ema"):
            assert float(r["gbps"]) > 0 and float(r["pct_peak"]) > 0
        if op == "sinkhorn":
            assert float(r["max_err"]) < 1e-5
        if op == "e2e":
            assert float(r["images_s"]) > 0 and math.isfinite(float(r["value"]))


def test_cli_largest_batch(tmp_path):
    proc = _bench(["ntxent", "--largest-batch", "--mem-budget-gib", "0.002", "--dim", "16", "--providers", "torch",
                   "--threads", "1", "--device", "cpu", "--out", str(tmp_path)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = _rows(os.path.join(_device_dir(tmp_path), "largest.csv"))
    assert row["provider"] == "torch" and row["batch_key"] == "n2"
    largest, over = int(row["largest"]), int(row["first_over"])
    assert 256 <= largest < over and float(row["mib_at_largest"]) <= 0.002 * 1024
    assert "Largest batch" in open(os.path.join(_device_dir(tmp_path), "largest.md")).read()


CRASH_AT_64 = textwrap.dedent('''
    import os
    import ops
    from ssl_fast import reference

    def build(inputs, hp, device):
        z1, z2 = inputs["z1"], inputs["z2"]
        if z1.shape == (32, 16):  # the measured shape n2 = 64 (the gate's is (32, 32)): the child dies
            os._exit(3)
        return lambda: reference.ntxent_reference(z1, z2, hp["temperature"])

    PROVIDERS = {"ntxent": [ops.Provider("crashes", build)]}
''')


def test_cli_one_child_per_provider_survives_a_crash(tmp_path):
    """--child-per provider: one child runs a provider's shapes in a row; a child that dies on one spec costs
    that row only (status error, the exit code in the note) and the next spec runs in a new child."""
    extra = tmp_path / "crash.py"
    extra.write_text(CRASH_AT_64)
    proc = _bench(["ntxent", "--n2", "64", "128", "--dim", "16", "--providers", "torch", "crashes", "--providers-file",
                   str(extra), "--modes", "fwd", "--repeats", "1", "--threads", "1", "--device", "cpu",
                   "--child-per", "provider", "--out", str(tmp_path / "out"), "--no-plot"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "in 2 child process(es)" in proc.stdout + proc.stderr
    rows = {(r["provider"], r["n2"]): r for r in _rows(os.path.join(_device_dir(tmp_path / "out"), "ntxent.csv"))}
    assert rows["crashes", "64"]["status"] == "error" and "child exit 3" in rows["crashes", "64"]["note"]
    for key in (("crashes", "128"), ("torch", "64"), ("torch", "128")):
        assert rows[key]["status"] == "ok" and float(rows[key]["median_ms"]) > 0, rows[key]
    assert float(rows["crashes", "128"]["speedup"]) > 0  # against the torch row of the same run


def test_threads_default_is_one_and_the_machine_default_on_cpu():
    default = torch.get_num_threads()
    assert runner.parse_threads(None, "cpu") == ([1, default] if default != 1 else [1])
    assert runner.parse_threads(None, "cuda") == [default]
    assert runner.parse_threads(["1,default", "3", "1"], "cpu") == [1] + ([default] if default != 1 else []) + (
        [3] if default != 3 else [])


def test_headline_gives_a_line_per_thread_count(tmp_path):
    """The index's headline: one line per thread count measured at the chosen shape, the count in its column."""
    op = ops.OPS["sinkhorn"]
    rows = []
    for threads, scale in ((1, 1.0), (4, 0.5)):
        for prov, ms in (("swav", 10.0), ("ssl_fast_cpp", 2.0)):
            rows.append(dict(device="cpu", device_name="Test CPU (4 cpus)", threads=threads, op="sinkhorn",
                             provider=prov, mode="fwd", dtype="fp32", b=4096, k=3000, median_ms=ms * scale,
                             peak_mem_mib=8.0, status="ok"))
    report.append_csv(str(tmp_path / "test-cpu" / "sinkhorn.csv"), rows, report.columns(op))
    lines = [ln for ln in report.headline(str(tmp_path)).splitlines() if "[sinkhorn]" in ln]
    assert len(lines) == 2
    assert lines[0].startswith("| Test CPU (4 cpus) | 1 |") and lines[1].startswith("| Test CPU (4 cpus) | 4 |")
    assert all("swav 5x" in ln for ln in lines)


def test_cli_errors():
    proc = _bench(["nosuchop"])
    assert proc.returncode == 2 and "unknown op" in proc.stderr
    proc = _bench(["sinkhorn", "--n2", "64"])
    assert proc.returncode != 0 and "has no shape" in proc.stderr
    proc = _bench(["--list"])
    assert proc.returncode == 0 and "inf_cl" in proc.stdout and "timm" in proc.stdout


def test_pytest_benchmark_entry():
    """bench/test_bench_cpu.py (the pytest-benchmark CPU tier) runs: each case once, gate included."""
    pytest.importorskip("pytest_benchmark")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
                           os.path.join(ROOT, "bench", "test_bench_cpu.py"), "-k", "ntxent or sinkhorn or ema"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout
