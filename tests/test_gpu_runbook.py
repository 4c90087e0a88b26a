"""scripts/gpu_check.sh without a GPU, as its dry run: both calls ("prove" and "tune") run their stages with this
interpreter and CUDA hidden, skip every GPU part with a "skipped (no CUDA)" line, leave their three files under
$OUT and print the summary table. The build stage is left out (it rebuilds the package: minutes); the sweep
runs in the Triton interpreter at tiny shapes, two configurations of two kernel families. Both calls run at
once (two processes) to keep this test short. Budget and stage caps are generous (CAP_SCALE): this checks the
stages, not the GPU machine's time plan, and a loaded CI machine must not fail it.
"""

import csv
import io
import os
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the runbook is a bash script for the GPU machines")


def _start(call, stages, out, **extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SSL_FAST_BACKEND")}
    env.update(CUDA_VISIBLE_DEVICES="", OUT=str(out), PYTHON=sys.executable, STAGES=stages, BUDGET_S="3000",
               CAP_SCALE="20", **extra)
    return subprocess.Popen(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), call], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _members(path):
    with tarfile.open(path) as tar:
        return {m.name: m for m in tar.getmembers()}, tar


def _read(path, name):
    with tarfile.open(path) as tar:
        return io.TextIOWrapper(tar.extractfile(name)).read()


@pytest.fixture(scope="module")
def calls(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_out")
    procs = {"prove": _start("prove", "env info tests bench", out),
             "tune": _start("tune", "env wheels sweep peers", out,
                            TUNE_ARGS="--max-configs 2 --families infonce_fwd ema")}
    stdout = {k: p.communicate(timeout=3600)[0] for k, p in procs.items()}
    return out, stdout, {k: p.returncode for k, p in procs.items()}


def test_both_calls_end_with_their_files_and_summary(calls):
    out, stdout, rc = calls
    assert rc == {"prove": 0, "tune": 0}, stdout
    assert sorted(os.listdir(out)) == sorted(f"{c}_{k}" for c in ("prove", "tune")
                                             for k in ("logs.tgz", "results.tgz", "summary.txt"))
    for call in ("prove", "tune"):
        summary = open(out / f"{call}_summary.txt").read()
        assert f"scripts/gpu_check.sh {call}: summary" in stdout[call] and summary.strip() in stdout[call]
        assert "budget is spent" not in summary and " fail " not in summary and "timeout" not in summary, summary
        assert "total" in summary and "wall time of the call" in summary


def test_prove_collects_the_gpu_matrix_and_plans_the_target_benchmarks(calls):
    out, stdout, _ = calls
    summary = open(out / "prove_summary.txt").read()
    for stage in ("test_infonce_triton", "test_infonce_rect", "test_sinkhorn", "test_ema", "test_requires_cuda"):
        line = next(ln for ln in summary.splitlines() if ln.strip().startswith(stage + " "))
        assert " skipped " in line and "skipped (no CUDA)" in line and "collected" in line, line
    bench = next(ln for ln in summary.splitlines() if ln.strip().startswith("bench "))
    assert "plan: 25 measurements" in bench, bench
    info = next(ln for ln in summary.splitlines() if ln.strip().startswith("info "))
    assert " ok " in info, info
    logs, _ = _members(out / "prove_logs.tgz")
    assert {"logs/env.log", "logs/info.log", "logs/test_ema.log", "logs/bench.log", "stages.tsv"} <= set(logs)
    plan = _read(out / "prove_logs.tgz", "logs/bench.log")
    for op in ("ntxent: ", "info_nce_queue: ", "sinkhorn: ", "ema: ", "e2e: "):
        assert op in plan, plan


def test_tune_sweeps_in_the_interpreter_and_plans_the_peers(calls):
    out, _, _ = calls
    summary = open(out / "tune_summary.txt").read()
    sweep = next(ln for ln in summary.splitlines() if ln.strip().startswith("sweep "))
    assert "skipped (no CUDA)" in sweep and "interpreter" in sweep, sweep
    assert "tile sweep" in summary
    rows = list(csv.DictReader(io.StringIO(_read(out / "tune_results.tgz", "results/tune.csv"))))
    assert {r["family"] for r in rows} == {"infonce_fwd", "ema"}, rows
    assert [r["status"] for r in rows] == ["ok"] * 4, rows  # 2 configurations x 2 families
    assert [r["config"] for r in rows if r["family"] == "ema"][0] == "table"
    peers = next(ln for ln in summary.splitlines() if ln.strip().startswith("peers "))
    assert "plan:" in peers, peers
    wheels = next(ln for ln in summary.splitlines() if ln.strip().startswith("wheels ") or
                  ln.strip().startswith("peer_imports "))
    assert "skipped" in wheels or " ok " in wheels, wheels
