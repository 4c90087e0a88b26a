"""The CPU tier as a pytest-benchmark suite: every op's main providers at one representative shape.

    pytest bench/test_bench_cpu.py --benchmark-only                       # time them (pytest-benchmark table)
    pytest bench/test_bench_cpu.py --benchmark-only --benchmark-autosave  # keep the run in .benchmarks/
    pytest bench/test_bench_cpu.py --benchmark-disable                    # run each once: a smoke test

The same provider adapters and correctness gate as ``ssl-fast bench`` (each provider must match the float64
reference before it is timed), in-process and without the memory measurement: ``ssl-fast bench`` is the tool
for side-by-side tables with peak memory; this file plugs the CPU tier into pytest-benchmark's tooling
(comparison between saved runs, ``--benchmark-compare``). torch.compile is left out (its compile would
dominate a pytest run; the suite measures it).
"""

import os
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pytest_benchmark")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import measure  # noqa: E402
import ops  # noqa: E402

CASES = {
    "ntxent": (dict(n2=1024, dim=128), "full", ["torch", "lightly", "pml", "ssl_fast_cpp", "ssl_fast_nn"]),
    "info_nce": (dict(n2=2048, dim=128), "full", ["torch", "open_clip", "ssl_fast_cpp"]),
    "info_nce_queue": (dict(n=256, queue=4096, dim=128), "full", ["torch", "ssl_fast_cpp"]),
    "sinkhorn": (dict(b=1024, k=3000), "fwd", ["swav", "lightly", "ssl_fast_cpp"]),
    "ema": (dict(model="resnet50"), "update", ["loop", "foreach_lerp", "lightly", "timm", "ssl_fast_cpp"]),
    "swav": (dict(b=256, k=3000, crops=4), "full", ["torch", "lightly", "ssl_fast_nn"]),
    "directclr": (dict(n2=1024, dim=2048), "full", ["torch", "lightly", "ssl_fast_nn"]),
}
PARAMS = [pytest.param(op, prov, id=f"{op}-{prov}") for op, (_, _, provs) in CASES.items() for prov in provs]


@pytest.mark.parametrize("op_name,provider", PARAMS)
def test_cpu_tier(benchmark, op_name, provider):
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    op = ops.OPS[op_name]
    prov = op.provider(provider)
    why = prov.unavailable("cpu", "fp32")
    if why:
        pytest.skip(why)
    device = torch.device("cpu")
    hp = dict(op.hparams)
    err = measure.gate(op, prov, device, hp)
    assert err <= op.gate_tol, f"{provider} differs from the float64 reference by {err:.2e}"
    shape, mode, _ = CASES[op_name]
    if provider == "pml":  # cubic in 2N: (2N, 2N(2N-2)) mask; keep it small
        shape = dict(shape, n2=256)
    inputs = op.make_inputs(shape, "fp32", device, "bwd" in op.modes)
    fn = prov.build(inputs, hp, device)
    prep, run = measure.make_step(op, fn, op.grad_inputs(inputs), mode, {})
    benchmark.extra_info.update(op=op_name, provider=provider, mode=mode, shape=ops.shape_label(op, shape))
    if prep is None:
        benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    else:
        benchmark.pedantic(run, setup=prep, rounds=5, warmup_rounds=1)
