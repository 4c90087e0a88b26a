"""ssl_fast's benchmark suite, the command line: every op's providers side by side, time AND peak memory.

    python bench/suite.py --list                              # ops, providers, presets
    python bench/suite.py ntxent --preset quick               # = ssl-fast bench ntxent --preset quick
    python bench/suite.py ntxent --n2 1024 4096 --dim 128 --dtype fp32 bf16 --modes fwd full
    python bench/suite.py sinkhorn --b 4096 --k 3000 --providers swav lightly ssl_fast_cpp
    python bench/suite.py ema --model resnet50 vit_b_16 --dtype fp32 fp32-bf16
    python bench/suite.py e2e --model resnet18 --batch 128 --res 32          # one SimCLR step, only the loss swapped
    python bench/suite.py ntxent --largest-batch --mem-budget-gib 0.25 --dim 128
    python bench/suite.py all --preset cpu --save              # every op, the committed CPU results
    python bench/suite.py --report                             # re-render markdown + PNGs + the index

The suite is four files, one job each (bench/README.md has the whole story):

* ``bench/ops.py``: per op, its shapes, presets, inputs, float64 reference and one adapter per provider;
* ``bench/measure.py``: the measurement child (correctness gate, first call, peak memory, median time);
* ``bench/runner.py``: specs from the command line, the children, rows appended to the CSV as they come,
  the device peaks, the largest-batch search;
* ``bench/report.py``: the CSV schema, the printed summary, markdown tables, the index and its headline.

This file only parses the command line and dispatches (``ssl-fast bench`` calls :func:`main`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import ops  # noqa: E402
import report  # noqa: E402
import runner  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(
        prog="ssl-fast bench", description="Benchmark every provider of an op side by side (time, memory, "
        "TFLOP/s or GB/s vs the measured device peak), after a correctness gate against the float64 reference.",
        epilog="ops: " + ", ".join(f"{o.name} ({'/'.join(o.shape_keys)})" for o in ops.OPS.values())
        + ". See bench/README.md.", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("op", nargs="?", help="op name, or 'all' (every op at the preset's shapes)")
    p.add_argument("--list", action="store_true", help="list ops, providers and presets, then exit")
    p.add_argument("--report", action="store_true",
                   help="re-render markdown tables, PNG plots and the index README.md from every CSV under "
                        "--out (default bench/results), then exit")
    p.add_argument("--preset", help="quick | cpu | gpu | gpu-target: the op's predefined shapes (explicit flags "
                                    "override)")
    for k, typ in runner.SHAPE_FLAGS.items():
        p.add_argument(f"--{k}", type=typ, nargs="+", help=f"shape: {k} (ops that have it)")
    p.add_argument("--dtype", nargs="+", help="fp32 bf16 fp16 (ema also fp32-bf16 fp32-fp16)")
    p.add_argument("--modes", nargs="+", help="fwd bwd full (losses), update (ema), step (e2e)")
    p.add_argument("--providers", nargs="+", help="default: every provider the op has (see --list); with 'all', "
                                                  "each op runs those of its preset's providers that are named")
    p.add_argument("--providers-file", help="a .py file with PROVIDERS = {op: [ops.Provider(...)]} to add")
    p.add_argument("--set", nargs="+", default=[], metavar="NAME=VALUE",
                   help="override a hyperparameter, e.g. --set temperature=0.2")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed samples (default 5 or the preset's); CPU: their median; CUDA: do_bench's budget")
    p.add_argument("--cuda-rep-ms", type=float, default=100.0, help="do_bench measurement budget, ms")
    p.add_argument("--threads", nargs="+", default=None, metavar="N|default",
                   help="torch threads in the children: counts and/or 'default' (the machine's default count), "
                        "e.g. --threads 1 default (each spec is measured at each count; default: 1 and default "
                        "on CPU, default on CUDA)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:K (auto: cuda when present)")
    p.add_argument("--out", default=None, help="results root (default bench/results/_scratch, ignored by git)")
    p.add_argument("--save", action="store_true", help="write to the committed bench/results/<device>/")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per measurement before a NaN row")
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="stop starting measurements after this many seconds (the rest: 'skipped' rows); with "
                        "several ops each op gets an equal share of what is left when it starts")
    p.add_argument("--plan", action="store_true", help="print the measurements and child processes, run nothing")
    p.add_argument("--child-per", choices=("measurement", "provider", "op"), default=None,
                   help="a fresh child process per measurement (default on CPU); one per provider, threads and "
                        "dtype; or one per op and threads (default on CUDA), running its measurements in a row "
                        "with warm compile caches")
    p.add_argument("--mem-budget-gib", type=float, default=None,
                   help="CPU: skip a run whose estimated peak exceeds this and cap each child at budget + 2 GiB "
                        "(default: half of MemAvailable); with --largest-batch: the budget searched")
    p.add_argument("--warm-compile-cache", action="store_true",
                   help="use your inductor/triton caches (default: a fresh one per child: cold compile_ms)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the list this many times interleaving providers; keep the median round")
    p.add_argument("--largest-batch", action="store_true",
                   help="instead of timing: per provider, the largest batch (the op's batch key) whose "
                        "inputs + peak extra memory fit --mem-budget-gib")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    return p


def list_ops() -> str:
    out = []
    for op in ops.OPS.values():
        out.append(f"{op.name}: {op.about}")
        out.append(f"  shape: {', '.join('--' + k for k in op.shape_keys)}; modes: {', '.join(op.modes)}; dtypes: "
                   f"{', '.join(op.dtypes)}; presets: {', '.join(op.presets)}; baseline: {op.baseline}")
        for p in op.providers:
            extra = []
            if p.requires:
                extra.append(f"needs {p.requires}")
            if p.devices != ("cpu", "cuda"):
                extra.append("/".join(p.devices) + " only")
            out.append(f"    {p.name:<16} {p.about}" + (f" [{'; '.join(extra)}]" if extra else ""))
    return "\n".join(out)


def plan(run: runner.Runner, op_list, device: str, dev_name: str) -> str:
    """The measurements each op would take and the child processes they would run in (--plan)."""
    out = [f"plan on {dev_name} ({device}):"]
    total = 0
    for op in op_list:
        specs = run.specs(op, device)
        batches = run.batches(op, specs)
        total += len(specs)
        out.append(f"{op.name}: {len(specs)} measurements in {len(batches)} child process(es)")
        for batch in batches:
            s0 = specs[batch[0]]
            out.append(f"  child: {s0['provider']} {s0['dtype']} {s0['threads']} thr: "
                       + ", ".join(f"{ops.shape_label(op, specs[i])} {specs[i]['mode']}" for i in batch))
    out.append(f"{total} measurements")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = parse_args()
    args = parser.parse_args(argv)
    if args.list:
        print(list_ops())
        return 0
    if args.report:
        root = os.path.abspath(args.out or runner.RESULTS)
        print(f"rendered {report.write_index(root, plot=not args.no_plot)}")
        return 0
    if not args.op:
        parser.error("name an op (or 'all'), or pass --list / --report")
    if args.op != "all" and args.op not in ops.OPS:
        parser.error(f"unknown op {args.op!r}; choose from {', '.join(ops.OPS)} or all")
    ops.load_providers_file(args.providers_file)
    device = runner.resolve_device(args.device)
    dev_name = runner.device_name(device)
    root = os.path.abspath(args.out or (runner.RESULTS if args.save else os.path.join(runner.RESULTS, "_scratch")))
    out_dir = os.path.join(root, runner.device_slug(dev_name))
    run = runner.Runner(args)
    op_list = list(ops.OPS.values()) if args.op == "all" else [ops.OPS[args.op]]
    if args.preset and args.op == "all":  # 'all' with a preset: the ops that define it
        op_list = [op for op in op_list if args.preset in op.presets]
    if args.plan:
        print(plan(run, op_list, device, dev_name))
        return 0
    budget = args.time_budget_s
    for i, op in enumerate(op_list):
        if budget:  # an equal share of what is left; time an op leaves unused goes to the next
            run.set_budget((budget - (time.monotonic() - run.t_start)) / (len(op_list) - i))
        if args.largest_batch:
            if op.batch_key is not None:
                runner.largest_batch(run, op, device, dev_name, out_dir)
            continue
        run.run_op(op, device, dev_name, out_dir)
    if args.save:
        print(f"index {report.write_index(root, plot=not args.no_plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
