"""Several "nodes" on one machine: Linux network namespaces joined by veth pairs to a bridge, and
``torchrun`` jobs across them (used by tests/test_multinode.py; run directly for the repeated-run check).

Topology: a private "switch" namespace holds a bridge; node i is namespace ``<tag>n<i>`` with one veth
``eth0`` (address 10.231.0.<i+1>/24) whose peer is a port of the bridge. Nothing is added to the machine's
own network namespace, and every namespace (and with it every veth and the bridge) is deleted on exit,
processes first. All nodes see the same file system: the run directory plays the cluster's shared storage.

Every namespace shares the machine's hostname, so torchrun cannot tell by name which node hosts the c10d
rendezvous store, and workers would look for the master under the shared hostname: each node's agent gets
``--rdzv-conf is_host=1`` (node 0) or ``is_host=0`` and ``--local-addr <its address>``. On a real cluster the
hostnames differ and neither flag is needed.

Needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN) and the ``ip`` command; ``Cluster.unavailable()`` says why
not where namespaces cannot be made.

Repeated runs (the exit-abort check), e.g. 40 two-node SimCLR jobs:
    python tests/_multinode.py repeat --runs 40 --nnodes 2 --nproc 1
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional

PORT = 29400


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


class Cluster:
    """``n`` network namespaces on one bridge; a context manager that always cleans up.

    Args:
        n: number of nodes.
        tag: name prefix of the namespaces (unique per process by default, so parallel runs do not clash).
    """

    def __init__(self, n: int, tag: Optional[str] = None):
        self.n = n
        self.tag = tag or f"sslf{os.getpid()}"
        self.switch = f"{self.tag}sw"
        self.nodes = [f"{self.tag}n{i}" for i in range(n)]
        self.procs: List[subprocess.Popen] = []

    @staticmethod
    def unavailable() -> Optional[str]:
        """Why namespaces cannot be made here, or None when they can."""
        if shutil.which("ip") is None:
            return "the 'ip' command (iproute2) is not installed"
        if hasattr(os, "geteuid") and os.geteuid() != 0:
            return "network namespaces need root (CI runs the suite as root)"
        name = f"sslfprobe{os.getpid()}"
        r = _ip("netns", "add", name, check=False)
        if r.returncode != 0:
            return f"'ip netns add' failed: {r.stderr.strip()}"
        try:
            r = _ip("-n", name, "link", "add", "p0", "type", "veth", "peer", "name", "p1", check=False)
            if r.returncode != 0:
                return f"cannot create a veth pair: {r.stderr.strip()}"
            r = _ip("-n", name, "link", "add", "br0", "type", "bridge", check=False)
            if r.returncode != 0:
                return f"cannot create a bridge: {r.stderr.strip()}"
        finally:
            _ip("netns", "del", name, check=False)
        return None

    def addr(self, i: int) -> str:
        return f"10.231.0.{i + 1}"

    def __enter__(self) -> "Cluster":
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> None:
        self.down()  # leftovers of a crashed run with the same tag
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i, ns in enumerate(self.nodes):
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            # create the pair inside the node, then move the bridge end into the switch namespace
            _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{i}")
            _ip("-n", ns, "link", "set", f"p{i}", "netns", self.switch)
            _ip("-n", self.switch, "link", "set", f"p{i}", "master", "br0")
            _ip("-n", self.switch, "link", "set", f"p{i}", "up")
            _ip("-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")

    def pids(self, i: int) -> List[int]:
        r = _ip("netns", "pids", self.nodes[i], check=False)
        return [int(p) for p in r.stdout.split()] if r.returncode == 0 else []

    def kill_node(self, i: int, timeout: float = 30.0) -> int:
        """SIGKILL every process in node i's namespace (agent and workers); returns how many were killed."""
        killed = 0
        deadline = time.time() + timeout
        while time.time() < deadline:
            pids = self.pids(i)
            if not pids:
                return killed
            for p in pids:
                try:
                    os.kill(p, signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"processes of {self.nodes[i]} survive SIGKILL: {self.pids(i)}")

    def slow_link(self, i: int, delay_ms: int = 20, rate: str = "4mbit") -> str:
        """Slow down node i's link in both directions; returns what was applied.

        ``netem delay`` where the kernel has it (sch_netem), else a token-bucket rate limit (``tbf``) whose
        queueing makes every message wait for the link: the point is a link much slower than the others.
        """
        applied = None
        for dev, ns in (("eth0", self.nodes[i]), (f"p{i}", self.switch)):
            r = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "netem", "delay",
                                f"{delay_ms}ms", "rate", rate], capture_output=True, text=True)
            if r.returncode == 0:
                applied = f"netem delay {delay_ms} ms, rate {rate}"
                continue
            r = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate",
                                rate, "burst", "4kb", "latency", "2s"], capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"tc on {ns}/{dev} failed (neither netem nor tbf): {r.stderr.strip()}")
            applied = f"tbf rate {rate} (the kernel has no netem)"
        return applied

    def popen(self, i: int, cmd: List[str], log_path: str, env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
        """Start ``cmd`` in node i's namespace, stdout+stderr to ``log_path``."""
        log = open(log_path, "ab")
        p = subprocess.Popen(["ip", "netns", "exec", self.nodes[i], *cmd], stdout=log, stderr=subprocess.STDOUT,
                             env=env, start_new_session=True)
        log.close()
        self.procs.append(p)
        return p

    def down(self) -> None:
        for i in range(self.n):
            try:
                self.kill_node(i, timeout=10)
            except RuntimeError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for ns in [*self.nodes, self.switch]:
            _ip("netns", "del", ns, check=False)


def cli_args(overrides: Dict) -> List[str]:
    """``ssl-fast train`` flags for a dict of TrainConfig values (True -> --flag, False -> --no-flag)."""
    out = []
    for k, v in overrides.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            out.append(flag)
        elif v is False:
            out.append("--no-" + k.replace("_", "-"))
        elif v is not None:
            out += [flag, str(v)]
    return out


def torchrun_cmd(nnodes: int, nproc: int, args: List[str], *, endpoint: Optional[str] = None,
                 local_addr: Optional[str] = None, is_host: Optional[bool] = None, max_restarts: int = 0,
                 rdzv_conf: str = "", job_id: str = "sslf") -> List[str]:
    """``python -m torch.distributed.run ... -m ssl_fast.cli train ARGS`` (standalone when ``endpoint`` is None)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
           "--monitor-interval=0.5"]
    if endpoint is None:
        cmd += ["--standalone"]
    else:
        conf = ",".join(c for c in (f"is_host={int(bool(is_host))}", rdzv_conf) if c)
        cmd += [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={job_id}",
                f"--rdzv-conf={conf}", f"--local-addr={local_addr}"]
    return cmd + ["-m", "ssl_fast.cli", "train", *args]


def worker_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1", GLOO_SOCKET_IFNAME="eth0")
    for k in ("SSL_FAST_FAULT_STEP", "SSL_FAST_FAULT_RANK", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
              "LOCAL_RANK", "TORCHELASTIC_RESTART_COUNT"):
        env.pop(k, None)
    env.update(extra or {})
    return {k: v for k, v in env.items() if v != ""}  # "" removes a variable


def start_job(cluster: Cluster, nproc: int, args: List[str], log_dir: str, *, nodes: Optional[List[int]] = None,
              max_restarts: int = 0, rdzv_conf: str = "", env: Optional[Dict[str, str]] = None,
              job_id: str = "sslf", log_suffix: str = "") -> Dict[int, subprocess.Popen]:
    """One torchrun agent per node (all nodes by default); returns {node: Popen}. Node 0 hosts the store."""
    nodes = list(range(cluster.n)) if nodes is None else nodes
    os.makedirs(log_dir, exist_ok=True)
    endpoint = f"{cluster.addr(0)}:{PORT}"
    procs = {}
    for i in nodes:
        cmd = torchrun_cmd(cluster.n, nproc, args, endpoint=endpoint, local_addr=cluster.addr(i), is_host=i == 0,
                           max_restarts=max_restarts, rdzv_conf=rdzv_conf, job_id=job_id)
        procs[i] = cluster.popen(i, cmd, os.path.join(log_dir, f"node{i}{log_suffix}.log"), env=worker_env(env))
    return procs


def wait_all(procs: Dict[int, subprocess.Popen], timeout: float) -> Dict[int, Optional[int]]:
    """Exit codes by node (None: still running at the deadline)."""
    deadline = time.time() + timeout
    codes = {}
    for i, p in procs.items():
        try:
            codes[i] = p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            codes[i] = None
    return codes


def read_logs(log_dir: str) -> str:
    out = []
    for name in sorted(os.listdir(log_dir)):
        if name.endswith(".log"):
            with open(os.path.join(log_dir, name), errors="replace") as f:
                out.append(f"===== {name}\n{f.read()}")
    return "\n".join(out)


def _repeat(opts) -> int:
    """Run the same job ``--runs`` times; count clean runs, failed runs and exit aborts."""
    import tempfile

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_train import tiny  # the tests' tiny configuration

    why = Cluster.unavailable()
    if why:
        print(f"cannot run: {why}")
        return 2
    results = {"ok": 0, "failed": 0, "abort": 0}
    t0 = time.time()
    for k in range(opts.runs):
        with tempfile.TemporaryDirectory() as tmp, Cluster(opts.nnodes) as c:
            run = os.path.join(tmp, "run")
            if opts.config == "tiny":
                args = cli_args(tiny(opts.method, run, max_steps=opts.steps, gather_distributed=True, batch_size=48))
                env = None
            else:  # the command: the method's digits recipe, torch's default thread count
                args = ["--method", opts.method, "--max-steps", str(opts.steps), "--no-knn", "--run-dir", run]
                env = {"OMP_NUM_THREADS": ""}
            procs = start_job(c, opts.nproc, args, os.path.join(tmp, "logs"), job_id=f"rep{k}",
                              rdzv_conf="join_timeout=60", env=env)
            codes = wait_all(procs, timeout=opts.timeout)
            logs = read_logs(os.path.join(tmp, "logs"))
            abort = "terminate called" in logs or "SIGABRT" in logs or "exitcode: -6" in logs
            ok = all(v == 0 for v in codes.values()) and not abort
            results["ok" if ok else ("abort" if abort else "failed")] += 1
            print(f"run {k + 1}/{opts.runs}: exit codes {codes} {'ok' if ok else ('ABORT' if abort else 'FAILED')} "
                  f"({time.time() - t0:.0f} s)", flush=True)
            if not ok and opts.keep_failed:
                dst = os.path.join(opts.keep_failed, f"run{k}")
                shutil.copytree(os.path.join(tmp, "logs"), dst)
                print(f"  logs -> {dst}")
    print(f"{opts.runs} runs of {opts.nnodes} nodes x {opts.nproc} processes ({opts.method}, {opts.steps} steps): "
          f"{results['ok']} clean, {results['abort']} aborted at exit, {results['failed']} failed otherwise")
    return 0 if results["ok"] == opts.runs else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sp = ap.add_subparsers(dest="cmd", required=True)
    r = sp.add_parser("repeat", help="run one multi-node job repeatedly; count exit aborts")
    r.add_argument("--runs", type=int, default=20)
    r.add_argument("--nnodes", type=int, default=2)
    r.add_argument("--nproc", type=int, default=1)
    r.add_argument("--method", default="simclr")
    r.add_argument("--steps", type=int, default=6)
    r.add_argument("--config", choices=("tiny", "recipe"), default="tiny",
                   help="tiny: the tests' 16 px width-4 model, 1 thread; recipe: the method's digits recipe")
    r.add_argument("--timeout", type=float, default=300)
    r.add_argument("--keep-failed", metavar="DIR", help="copy the logs of failed runs here")
    sys.exit(_repeat(ap.parse_args()))
