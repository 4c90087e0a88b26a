"""Smoke test of the benchmark harness (bench/bench_ntxent.py): it runs, and writes finite numbers.

No timing assertions: this machine is shared. The benchmark runs in a subprocess, as users run it.
"""

import csv
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench", "bench_ntxent.py")


def _run(args, timeout=120):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the benchmark's CPU path never needs the interpreter
    return subprocess.run([sys.executable, BENCH, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def smoke_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = _run(["--n2", "64", "--dim", "16", "--providers", "torch", "ssl_fast", "--modes", "fwd", "full",
                 "--repeats", "1", "--threads", "1", "--device", "cpu", "--out", str(out)])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out, proc.stdout


def test_csv_rows(smoke_out):
    out, _ = smoke_out
    with open(out / "ntxent.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    got = sorted((r["provider"], r["mode"]) for r in rows)
    assert got == sorted((p, m) for p in ("torch", "ssl_fast") for m in ("fwd", "full"))
    for r in rows:
        assert r["status"] == "ok", r
        assert (r["loss"], r["n2"], r["dim"], r["dtype"], r["device"]) == ("ntxent", "64", "16", "fp32", "cpu")
        for col in ("median_ms", "min_ms", "peak_mem_mib", "speedup", "loss_value", "first_call_ms",
                    "process_rss_mib"):
            assert math.isfinite(float(r[col])), (col, r)
        assert float(r["median_ms"]) > 0 and float(r["peak_mem_mib"]) >= 0
        assert r["commit"] and r["torch"] and r["device_name"]
    by = {(r["provider"], r["mode"]): r for r in rows}
    assert float(by["torch", "fwd"]["speedup"]) == 1.0
    # both providers compute the same loss on the same inputs
    assert abs(float(by["torch", "full"]["loss_value"]) - float(by["ssl_fast", "full"]["loss_value"])) < 1e-4
    assert by["ssl_fast", "full"]["backend"] == "cpp"


def test_markdown_and_stdout(smoke_out):
    out, stdout = smoke_out
    md = (out / "ntxent.md").read_text()
    assert "| n2 | dim | mode | torch | ssl_fast |" in md
    body = [ln for ln in md.splitlines() if ln.startswith("| 64 | 16 |")]
    assert len(body) == 6  # (fwd, full) x (time, memory, fresh-process RSS / first call tables)
    for ln in body:
        cells = [c.strip() for c in ln.strip("|").split("|")][3:]
        assert all(c and not c.startswith("nan") for c in cells), ln
    assert "What a fresh process pays" in md
    assert "ssl_fast x faster" in stdout and "1st call ms" in stdout
    assert list(out.glob("ntxent_*.png")), "plot.py wrote no PNG"


def test_missing_library_is_a_nan_row(tmp_path):
    proc = _run(["--loss", "info_nce", "--n2", "16", "--dim", "8", "--providers", "open_clip", "--modes", "fwd",
                 "--repeats", "1", "--device", "cpu", "--no-plot", "--out", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(tmp_path / "ntxent.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    try:
        import open_clip  # noqa: F401
        assert row["status"] == "ok"
    except ImportError:
        assert row["status"] == "unavailable" and math.isnan(float(row["median_ms"])) and row["note"]


def test_cpu_peak_rss_sees_a_known_allocation():
    code = (
        "import sys, torch; sys.path.insert(0, 'bench'); import _harness as H\n"
        "n = 32 * 1024 * 1024 // 4\n"
        "f = lambda: torch.ones(n).sum()\n"
        "f(); print(H.cpu_peak_extra_mib(f))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    extra = float(proc.stdout.strip().splitlines()[-1])
    assert 30 <= extra <= 40, extra  # a 32 MiB tensor, allocated after a warm-up that freed one


def test_default_results_folder_is_ignored_by_git():
    """A user's runs (no --save) go to a folder git ignores, so the checkout stays clean; --save writes the
    committed bench/results/."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import _harness as H

    scratch, saved = H.results_dir(), H.results_dir(save=True)
    assert saved == os.path.join(ROOT, "bench", "results") and scratch.startswith(saved + os.sep)
    probe = os.path.join(scratch, "ntxent.csv")
    res = subprocess.run(["git", "check-ignore", "-q", probe], cwd=ROOT)
    if res.returncode == 128:
        pytest.skip("not a git checkout")
    assert res.returncode == 0, f"{probe} is not ignored by git"
    res = subprocess.run(["git", "check-ignore", "-q", os.path.join(saved, "ntxent.csv")], cwd=ROOT)
    assert res.returncode == 1, "the committed results must not be ignored"
