"""The runner: expands a benchmark request into specs, runs them in measurement children, appends the rows.

``ssl-fast bench`` (bench/suite.py) parses the command line and hands it to :class:`Runner`. For every op the
runner expands the preset (or the explicit shape flags) into specs, one per (threads, dtype, shape, mode,
provider) (:meth:`Runner.specs`), and runs them in child processes of ``bench/measure.py``:

* ``--child-per measurement`` (the default on CPU): a FRESH process per spec, so the CPU peak-RSS measurement
  starts from a clean allocator and ``compile_ms`` / ``process_rss_mib`` are what a user's fresh process pays;
* ``--child-per op`` (the default on CUDA): one process per op and thread count runs its specs provider by
  provider, so a process starts once (CUDA context, imports) and Triton / inductor compile caches stay warm
  between shapes (times are taken after warm-up either way); ``--child-per provider``: one per (provider,
  threads, dtype).

Each result is appended to ``<out>/<device>/<op>.csv`` the moment the child reports it (a timeout or a crash
loses only the spec it was on; the rest of that child's specs go to a new child). Speedups are against the
op's baseline provider of the same run (measured first), ``pct_peak`` against the device peak measured by a
child with the same threads and dtype (``peak.csv``). ``--time-budget-s`` stops starting new measurements
when the budget is spent (the rest are ``skipped`` rows). :func:`largest_batch` searches the largest batch
within a memory budget with one child per probe. Thread counts: ``--threads 1 default`` (the CPU default)
measures every spec at 1 thread and at the machine's default count (torch's default in this process).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, Iterator, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import measure  # noqa: E402
import ops  # noqa: E402
import report  # noqa: E402

MEASURE = os.path.join(HERE, "measure.py")
RESULTS = os.path.join(HERE, "results")
NAN = float("nan")
SHAPE_FLAGS = {"n2": int, "dim": int, "n": int, "queue": int, "b": int, "k": int, "crops": int, "model": str,
               "batch": int, "res": int}


# ----------------------------------------------------------------------------------------------------
# environment facts


def repo_root() -> str:
    return os.path.dirname(HERE)


def git_commit(root: Optional[str] = None) -> str:
    """``git rev-parse --short HEAD``, with ``+dirty`` when tracked files other than saved results differ."""
    root = root or repo_root()
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)bench/results"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch
        return torch.cuda.get_device_name(torch.device(device))
    return f"{cpu_name()} ({os.cpu_count()} cpus)"


def device_slug(name: str) -> str:
    """Folder name of a device: 'AMD EPYC (2 cpus)' -> 'amd-epyc-2-cpus', 'NVIDIA H200' -> 'nvidia-h200'."""
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()[:60] or "device"


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return ""


def mem_available_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024 ** 2
    except OSError:
        pass
    return NAN


def default_threads() -> int:
    """The machine's default torch thread count (what a user's process gets without set_num_threads)."""
    import torch
    return torch.get_num_threads()


def parse_threads(values: Optional[List[str]], device: str) -> List[int]:
    """``--threads`` values (ints, 'default', comma lists) -> distinct counts in order. Default: 1 and the
    machine's default on CPU (every CPU number exists at both); the default alone on CUDA."""
    if not values:
        values = ["default"] if device.startswith("cuda") else ["1", "default"]
    out: List[int] = []
    for v in ",".join(str(x) for x in values).split(","):
        v = v.strip()
        if not v:
            continue
        n = default_threads() if v == "default" else int(v)
        if n < 1:
            raise SystemExit(f"--threads: {v} is not a positive count")
        if n not in out:
            out.append(n)
    return out


def resolve_device(requested: str) -> str:
    import torch
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {requested}: no CUDA device on this machine")
    if requested != "cpu" and not requested.startswith("cuda"):
        raise SystemExit(f"--device must be auto, cpu or cuda[:K], got {requested!r}")
    return requested


# ----------------------------------------------------------------------------------------------------
# jobs: a preset (or the default shape) with the explicit flags applied


def expand_jobs(op: ops.Op, args, device: str) -> List[Dict]:
    """The preset's jobs (or one default job) with the explicit flags applied to every job."""
    preset = args.preset or ("gpu" if device.startswith("cuda") and args.op == "all" else None)
    if preset and preset not in op.presets:
        raise SystemExit(f"--preset must be one of {', '.join(op.presets)}, got {preset!r}")
    base = op.presets[preset] if preset else [dict(op.default_shape)]
    jobs = []
    for job in base:
        job = dict(job)
        for k in SHAPE_FLAGS:
            v = getattr(args, k)
            if v is not None:
                if k not in op.shape_keys:
                    raise SystemExit(f"--{k}: op {op.name} has no shape {k!r}; its shape is "
                                     f"{', '.join('--' + s for s in op.shape_keys)}")
                job[k] = v
        for k in op.shape_keys:
            job.setdefault(k, op.default_shape[k])
        job["dtype"] = args.dtype or job.get("dtype") or [op.dtypes[0]]
        job["modes"] = args.modes or job.get("modes") or list(op.modes)
        if args.providers and args.op == "all":  # with every op: the named ones among the job's providers
            listed = job.get("providers") or [p.name for p in op.providers]
            job["providers"] = [p for p in listed if p in args.providers]
        else:
            job["providers"] = args.providers or job.get("providers") or [p.name for p in op.providers]
        job["repeats"] = args.repeats if args.repeats is not None else job.get("repeats", 5)
        for dt in job["dtype"]:
            if dt not in op.dtypes:
                raise SystemExit(f"--dtype {dt}: op {op.name} takes {', '.join(op.dtypes)}")
        for m in job["modes"]:
            if m not in op.modes:
                raise SystemExit(f"--modes {m}: op {op.name} has modes {', '.join(op.modes)}")
        for prov in job["providers"]:
            op.provider(prov)  # KeyError with the list of names
        jobs.append(job)
    return jobs


def hparams(op: ops.Op, args) -> Dict:
    hp = dict(op.hparams)
    for item in args.set:
        name, _, value = item.partition("=")
        if name in hp:
            hp[name] = float(value)
    return hp


def grid(job: Dict, keys) -> List[Dict]:
    shapes = [{}]
    for k in keys:
        shapes = [dict(s, **{k: v}) for s in shapes for v in job[k]]
    return shapes


# ----------------------------------------------------------------------------------------------------
# measurement children


def _last_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):  # the exception line of a traceback, not the warnings around it
        if "Error" in ln or "error" in ln or "Killed" in ln:
            return ln[:300]
    return lines[-1][:300] if lines else ""


def run_child(specs: List[Dict], *, env: Optional[Dict[str, str]] = None, timeout: float = 1200.0,
              stop_at: Optional[float] = None) -> Iterator[Tuple[int, Dict]]:
    """Run ``specs`` in one ``bench/measure.py`` child; yield ``(index, result)`` as each result arrives.

    A spec that takes longer than ``timeout`` seconds is a ``timeout`` result and the child is killed; at
    ``stop_at`` (``time.monotonic()``) the current spec is ``skipped`` and the child is killed; a child that
    dies gives its current spec an ``error`` result. Each of these ends the generator early: the caller
    decides what to do with the specs that got no result."""
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen([sys.executable, MEASURE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=err, env=full_env, text=True, start_new_session=True)
        lines: "queue.Queue[Optional[str]]" = queue.Queue()

        def pump():
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        try:
            proc.stdin.write(json.dumps(specs))
            proc.stdin.close()
        except BrokenPipeError:
            pass
        done = 0
        t_spec = time.monotonic()
        try:
            while done < len(specs):
                wait = timeout - (time.monotonic() - t_spec)
                if stop_at is not None:
                    wait = min(wait, stop_at - time.monotonic())
                try:
                    line = lines.get(timeout=max(0.1, wait))
                except queue.Empty:
                    if stop_at is not None and time.monotonic() >= stop_at:
                        yield done, {"status": "skipped", "note": "--time-budget-s spent during this measurement"}
                    else:
                        yield done, {"status": "timeout", "note": f"child timed out after {timeout:.0f} s"}
                    return
                if line is None:  # the child ended before reporting every spec
                    proc.wait()
                    err.seek(0)
                    rc = proc.returncode
                    if rc is not None and rc < 0:
                        why = " (killed: out of memory?)" if -rc == 9 else ""
                        note = f"child died with signal {-rc}{why}"
                    else:
                        note = f"child exit {rc}: {_last_error_line(err.read())}"
                    yield done, {"status": "error", "note": note}
                    return
                if line.startswith(measure.RESULT_MARK):
                    res = json.loads(line[len(measure.RESULT_MARK):])
                    yield int(res.pop("index")), res
                    done += 1
                    t_spec = time.monotonic()
        finally:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    proc.kill()
            proc.wait()


class Runner:
    """One benchmark invocation: versions, commit and timestamp of its rows, the children, the device peaks."""

    def __init__(self, args):
        import torch
        self.args = args
        self.torch_v = torch.__version__
        self.triton_v = package_version("triton")
        self.commit = git_commit()
        self.stamp = datetime.datetime.now().isoformat(timespec="seconds")
        avail = mem_available_gib()
        self.default_budget = 0.5 * avail if not math.isnan(avail) else 0.0
        self.peaks: Dict[tuple, Dict] = {}
        self.t_start = time.monotonic()
        self._stop_at: Optional[float] = None
        if threading.current_thread() is threading.main_thread():  # `timeout` sends SIGTERM: kill the child too
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
        try:
            from tqdm import tqdm
            self.tqdm = tqdm
        except ImportError:
            self.tqdm = None

    def set_budget(self, seconds: float) -> None:
        """From now on, stop starting measurements after ``seconds`` (one op's share of --time-budget-s)."""
        self._stop_at = time.monotonic() + max(0.0, seconds)

    def stop_at(self) -> Optional[float]:
        """``time.monotonic()`` at which the time budget is spent (None: no budget)."""
        if self._stop_at is not None:
            return self._stop_at
        budget = getattr(self.args, "time_budget_s", None)
        return self.t_start + budget if budget else None

    def out_of_time(self) -> bool:
        stop = self.stop_at()
        return stop is not None and time.monotonic() >= stop

    def _env(self, threads: int, cache: Optional[str]) -> Dict[str, str]:
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        if cache:
            env.update(TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"),
                       TRITON_CACHE_DIR=os.path.join(cache, "triton"))
        return env

    def run_specs(self, specs: List[Dict], timeout: Optional[float] = None) -> Iterator[Tuple[int, Dict]]:
        """Results of ``specs`` (all of one threads count) in one child, or a fresh child after a spec that
        timed out or crashed; yields ``(index into specs, result)`` as they come."""
        start = 0
        while start < len(specs):
            if self.out_of_time():
                for i in range(start, len(specs)):
                    yield i, {"status": "skipped", "note": "--time-budget-s spent before this measurement"}
                return
            cache = None if self.args.warm_compile_cache else tempfile.mkdtemp(prefix="ssl_fast_bench_cache_")
            nxt = start
            try:
                for i, res in run_child(specs[start:], env=self._env(specs[start]["threads"], cache),
                                        timeout=timeout or self.args.timeout, stop_at=self.stop_at()):
                    yield start + i, res
                    nxt = start + i + 1
            finally:
                if cache:
                    shutil.rmtree(cache, ignore_errors=True)
            start = max(nxt, start + 1)

    def child(self, spec: Dict, timeout: Optional[float] = None) -> Dict:
        """One spec in a fresh child."""
        return next(iter(self.run_specs([spec], timeout)))[1]

    def peak(self, device: str, dtype: str, threads: int) -> Dict:
        key = (device, dtype, threads)
        if key not in self.peaks:
            self.peaks[key] = self.child(dict(kind="peak", device=device, dtype=dtype, threads=threads), timeout=600)
        return self.peaks[key]

    def specs(self, op: ops.Op, device: str) -> List[Dict]:
        """Every measurement of the op, the baseline provider first in each (threads, dtype, shape, mode)."""
        hp = hparams(op, self.args)
        budget = self.args.mem_budget_gib if self.args.mem_budget_gib is not None else self.default_budget
        out = []
        for threads in parse_threads(self.args.threads, device):
            for job in expand_jobs(op, self.args, device):  # (a job without providers adds nothing)
                provs = sorted(job["providers"], key=lambda p: p != op.baseline)
                for dtype in job["dtype"]:
                    for shape in grid(job, op.shape_keys):
                        for mode in job["modes"]:
                            for prov in provs:
                                out.append(dict(kind="measure", op=op.name, provider=prov, mode=mode, dtype=dtype,
                                                device=device, threads=threads, repeats=job["repeats"],
                                                cuda_rep_ms=self.args.cuda_rep_ms,
                                                providers_file=self.args.providers_file,
                                                requires=op.provider(prov).requires,
                                                mem_budget_gib=budget if device == "cpu" else 0.0,
                                                mem_limit_gib=budget + 2.0 if device == "cpu" and budget else 0,
                                                ref_budget_gib=min(2.0, budget or 2.0), **shape, **hp))
        return out

    def batches(self, op: ops.Op, specs: List[Dict]) -> List[List[int]]:
        """Indices of the specs per child (--child-per): one each; one child per (threads, dtype, provider); or
        one per thread count with the op's specs provider by provider. The baseline provider comes first."""
        per = self.args.child_per or ("op" if specs and specs[0]["device"].startswith("cuda") else "measurement")
        if per == "measurement":
            return [[i] for i in range(len(specs))]
        rank: Dict[str, int] = {}  # providers in the order they first appear (the baseline first)
        for s in specs:
            rank.setdefault(s["provider"], len(rank))
        groups: Dict[tuple, List[int]] = {}
        for i, s in enumerate(specs):
            key = (s["threads"],) if per == "op" else (s["threads"], s["dtype"], s["provider"])
            groups.setdefault(key, []).append(i)
        # in a child, provider by provider: a time budget that runs out cuts the providers listed last
        batches = [sorted(g, key=lambda i: rank[specs[i]["provider"]]) for g in groups.values()]
        return sorted(batches, key=lambda g: specs[g[0]]["provider"] != op.baseline)  # stable

    def _measure(self, op: ops.Op, batch: List[Dict]) -> Iterator[Tuple[int, Dict]]:
        """Results for a batch of specs: the ones that cannot run answer at once, the rest from a child."""
        todo = []
        for i, s in enumerate(batch):
            why = op.provider(s["provider"]).unavailable(s["device"], s["dtype"])
            est = op.estimate_gib(s["provider"], {k: s[k] for k in op.shape_keys}, s["dtype"])
            if why:
                yield i, dict(status="unavailable", note=why)
            elif s["mem_budget_gib"] and est > s["mem_budget_gib"]:
                yield i, dict(status="skipped", note=f"estimated peak {est:.1f} GiB > budget "
                                                     f"{s['mem_budget_gib']:.1f} GiB (--mem-budget-gib)"
                                                     + ("; pml's NTXentLoss is cubic in 2N"
                                                        if s["provider"] == "pml" else ""))
            else:
                todo.append(i)
        for j, res in self.run_specs([batch[i] for i in todo]):
            yield todo[j], res

    def _row(self, op: ops.Op, s: Dict, rs: List[Dict], dev_name: str) -> Dict:
        row = {c: "" for c in report.columns(op)}
        row.update({c: NAN for c in report.FLOAT_METRICS})
        row.update(timestamp=self.stamp, commit=self.commit, device=s["device"], device_name=dev_name,
                   threads=s["threads"], torch=self.torch_v, triton=self.triton_v, op=op.name,
                   provider=s["provider"], mode=s["mode"], dtype=s["dtype"], repeats=s["repeats"])
        row.update({k: s[k] for k in op.shape_keys})
        row.update({k: s[k] for k in op.hparams})
        ok = sorted((r for r in rs if r.get("status") == "ok"), key=lambda r: r["median_ms"])
        res = dict(ok[(len(ok) - 1) // 2]) if ok else dict(rs[-1])
        if len(rs) > 1:
            res["note"] = (res.get("note") or "") + f" median of {len(ok)}/{len(rs)} rounds: " + ", ".join(
                report.fmt_num(r["median_ms"]) for r in ok) + " ms"
        row.update({k: (NAN if v is None else v) for k, v in res.items() if k in row})
        if row["status"] == "ok":
            pk = self.peak(s["device"], s["dtype"], s["threads"])
            if pk.get("status") == "ok":
                row["peak_tflops"], row["peak_gbps"] = pk["peak_tflops"], pk["peak_gbps"]
                if not math.isnan(report.to_float(row["tflops"])):
                    row["pct_peak"] = 100.0 * row["tflops"] / pk["peak_tflops"]
                elif not math.isnan(report.to_float(row["gbps"])):
                    row["pct_peak"] = 100.0 * row["gbps"] / pk["peak_gbps"]
        return row

    def run_op(self, op: ops.Op, device: str, dev_name: str, out_dir: str) -> List[Dict]:
        """Measure every spec of the op; each row is appended to ``<out_dir>/<op>.csv`` as soon as it is taken."""
        specs = self.specs(op, device)
        if not specs:
            print(f"{op.name}: none of the named providers")
            return []
        batches = self.batches(op, specs)
        rounds = max(1, self.args.rounds)
        say = print
        bar = None
        if self.tqdm is not None:
            bar = self.tqdm(total=len(specs) * rounds, desc=f"bench {op.name}", unit="run", file=sys.stderr,
                            dynamic_ncols=True)
            say = bar.write
        say(f"{op.name}: {len(specs)} measurements in {len(batches)} child process(es); {dev_name}; commit "
            f"{self.commit}; torch {self.torch_v}; triton {self.triton_v or '-'}")
        csv_path = os.path.join(out_dir, f"{op.name}.csv")
        os.makedirs(out_dir, exist_ok=True)
        # the device peaks first: a peak child must not run beside a measuring child
        for key in dict.fromkeys((s["device"], s["dtype"], s["threads"]) for s in specs):
            self.peak(*key)
        self.save_peaks(out_dir, device, dev_name)
        results: List[List[Dict]] = [[] for _ in specs]
        rows: List[Optional[Dict]] = [None] * len(specs)
        baseline_ms: Dict[tuple, float] = {}
        same = lambda s: tuple(str(s[k]) for k in op.shape_keys) + (s["dtype"], s["mode"], s["device"],  # noqa: E731
                                                                     s["threads"])
        for rnd in range(rounds):
            for batch in batches:
                for j, res in self._measure(op, [specs[i] for i in batch]):
                    i = batch[j]
                    s = specs[i]
                    results[i].append(res)
                    say(f"  {s['provider']:>15} {s['mode']:>6} {ops.shape_label(op, s):<28} {s['dtype']:<9} "
                        f"{s['threads']} thr" + (f" (round {rnd + 1})" if rounds > 1 else "")
                        + f": {report.fmt_num(res.get('median_ms', NAN))} ms, "
                          f"{report.fmt_num(res.get('peak_mem_mib', NAN))} MiB"
                        + (f"  [{res.get('status')}: {res.get('note')}]" if res.get("status") != "ok" else ""))
                    if bar is not None:
                        bar.update(1)
                    if rnd < rounds - 1:
                        continue
                    row = self._row(op, s, results[i], dev_name)
                    if s["provider"] == op.baseline:
                        baseline_ms[same(s)] = report.to_float(row["median_ms"])
                    t, m = baseline_ms.get(same(s), NAN), report.to_float(row["median_ms"])
                    row["speedup"] = t / m if m and not math.isnan(t) and not math.isnan(m) else NAN
                    report.append_csv(csv_path, [row], report.columns(op))
                    rows[i] = row
        if bar is not None:
            bar.close()
        done = [r for r in rows if r is not None]
        print(report.summary(op, done))
        paths = report.render_op(op, out_dir, plot=not self.args.no_plot)
        print("\nappended {} rows to {}\nrendered {}".format(len(done), csv_path, ", ".join(paths)))
        return done

    def save_peaks(self, out_dir: str, device: str, dev_name: str) -> None:
        rows = [dict(timestamp=self.stamp, commit=self.commit, device=device, device_name=dev_name, threads=thr,
                     torch=self.torch_v, dtype=dt, peak_tflops=pk.get("peak_tflops", NAN),
                     peak_gbps=pk.get("peak_gbps", NAN), how=pk.get("how", pk.get("note", "")))
                for (dev, dt, thr), pk in self.peaks.items() if dev == device and not pk.get("_saved")]
        for pk in self.peaks.values():
            pk["_saved"] = True
        if rows:
            report.append_csv(os.path.join(out_dir, "peak.csv"), rows, report.PEAK_COLS)


# ----------------------------------------------------------------------------------------------------
# largest batch under a memory budget


def largest_batch(runner: Runner, op: ops.Op, device: str, dev_name: str, out_dir: str) -> List[Dict]:
    """Per provider, the largest batch (the op's batch key) whose inputs + peak extra memory of one forward +
    backward fit the budget: doubling, then bisection to 1/8 of the last step; one fresh child per probe,
    at the machine's default thread count (memory does not depend on it)."""
    args = runner.args
    if op.batch_key is None:
        raise SystemExit(f"--largest-batch: op {op.name} has no batch dimension")
    threads = parse_threads(args.threads, device)[-1]
    budget_gib = args.mem_budget_gib if args.mem_budget_gib is not None else (0.25 if device == "cpu" else 80.0)
    budget_mib = budget_gib * 1024
    hp = hparams(op, args)
    mode = "full" if "full" in op.modes else op.modes[0]
    default_provs = [op.baseline] + [p.name for p in op.providers if p.name.startswith("ssl_fast")]
    rows = []
    for job in expand_jobs(op, args, device):
        fixed_keys = [k for k in op.shape_keys if k != op.batch_key]
        provs = args.providers or default_provs
        for dtype in job["dtype"]:
            for fixed in grid(job, fixed_keys):
                for prov in provs:
                    if op.provider(prov).unavailable(device, dtype):
                        continue

                    def probe(x):
                        spec = dict(kind="measure", op=op.name, provider=prov, mode=mode, dtype=dtype, device=device,
                                    threads=threads, repeats=1, memory_only=True, requires=None,
                                    providers_file=args.providers_file, ref_budget_gib=0.0,
                                    mem_limit_gib=(budget_gib + 1.0) if device == "cpu" else 0, **fixed, **hp)
                        spec[op.batch_key] = x
                        r = runner.child(spec)
                        if r.get("status") != "ok":
                            return dict(fits=False, mib=NAN, ms=NAN, backend="", note=f"{r.get('status')}: "
                                        f"{r.get('note')}")
                        mib = float(r["inputs_mib"]) + float(r["peak_mem_mib"])
                        return dict(fits=mib <= budget_mib, mib=mib, ms=float(r["median_ms"]),
                                    backend=r.get("backend", ""), note="")

                    x, lo, lo_res, hi, probes = 256 if op.batch_key != "batch" else 16, 0, None, None, 0
                    while hi is None:
                        r = probe(x)
                        probes += 1
                        print(f"  {prov:>14} {op.batch_key}={x:<8} {report.fmt_num(r['mib'])} MiB "
                              f"{'fits' if r['fits'] else 'does not fit'}" + (f" [{r['note']}]" if r["note"] else ""))
                        if r["fits"]:
                            lo, lo_res, x = x, r, x * 2
                        else:
                            hi = x
                    quantum = 64 if op.batch_key != "batch" else 8
                    step = max(quantum, (hi - lo) // 8)
                    while lo and hi - lo > step:
                        mid = (lo + hi) // 2 // quantum * quantum
                        r = probe(mid)
                        probes += 1
                        print(f"  {prov:>14} {op.batch_key}={mid:<8} {report.fmt_num(r['mib'])} MiB "
                              f"{'fits' if r['fits'] else 'does not fit'}")
                        if r["fits"]:
                            lo, lo_res = mid, r
                        else:
                            hi = mid
                    rows.append(dict(timestamp=runner.stamp, commit=runner.commit, device=device, device_name=dev_name,
                                     threads=threads, torch=runner.torch_v, triton=runner.triton_v, op=op.name,
                                     provider=prov, backend=lo_res["backend"] if lo_res else "", mode=mode,
                                     dtype=dtype, fixed=ops.shape_label(op, fixed) if fixed else "",
                                     batch_key=op.batch_key, budget_mib=budget_mib, largest=lo,
                                     mib_at_largest=lo_res["mib"] if lo_res else NAN,
                                     ms_at_largest=lo_res["ms"] if lo_res else NAN, first_over=hi, probes=probes,
                                     note="" if lo else "the smallest probe does not fit"))
    os.makedirs(out_dir, exist_ok=True)
    report.append_csv(os.path.join(out_dir, "largest.csv"), rows, report.LARGEST_COLS)
    print(report.render_largest(out_dir))
    return rows
