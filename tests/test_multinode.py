"""Several nodes without a cluster: torchrun across network namespaces (tests/_multinode.py), gloo on CPU.

Each "node" is a network namespace with its own address on a private bridge; one torchrun agent per node
(c10d rendezvous hosted by node 0) runs ``ssl-fast train`` on the embedded digits. The run directory is on
the machine's file system, which every node sees: the cluster's shared storage.

Checks (final weights = the model state_dict of the run's final checkpoint, written by global rank 0):
- a multi-node job equals the single-host job of the same world size (``torchrun --standalone``: the same
  global batch, split the same way over the same global ranks), bit for bit: SimCLR with gathered negatives
  (2 nodes x 2 processes, node 1 on a slow link) and SwAV with the distributed Sinkhorn (3 nodes x 1
  process). A single process cannot be the reference of a trainer run bit for bit (BatchNorm statistics,
  data shards and augmentation seeds are per rank); that the distributed losses and gradients equal one
  process on the concatenated batch is tests/test_distributed.py's check.
- node 1 (its agent and its worker) is killed right after the step-3 checkpoint and started again: the job
  re-forms, every rank resumes from that checkpoint, and the final weights equal the uninterrupted job's;
  a node that does not come back ends the job with a clear error, and the last checkpoint is intact.
- every finished job exits 0 on every node, with no abort at exit.

Needs root for the namespaces: skipped, with the reason, where they cannot be made.
"""

import csv
import os
import subprocess
import sys
import time

import pytest
import torch

from _multinode import Cluster, cli_args, read_logs, start_job, torchrun_cmd, wait_all, worker_env
from ssl_fast.train import latest_good_checkpoint, load_checkpoint
from test_train import tiny

WHY = Cluster.unavailable()
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"multi-node tests need network namespaces: {WHY}")

STEPS = 6
JOB_TIMEOUT = 300


def _config(method, run_dir, **kw):
    base = dict(max_steps=STEPS, gather_distributed=True, batch_size=48)
    if method == "swav":
        base.update(freeze_prototypes_epochs=0)  # the prototypes train from step 1 (and are compared)
    base.update(kw)
    return tiny(method, run_dir, **base)


def _final_model(run_dir, step):
    return load_checkpoint(os.path.join(run_dir, f"ckpt_{step:08d}.pt"))["model"]


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a
               if a[k].is_floating_point())


def _assert_equal_models(a, b):
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}; max abs difference {_max_diff(a, b):.3g}"


def _assert_clean_exit(logs):
    for needle in ("terminate called", "SIGABRT", "exitcode: -6", "Fatal Python error"):
        assert needle not in logs, f"{needle!r} in the logs:\n{logs[-4000:]}"


def _standalone(tmp_path, name, overrides, nproc):
    """The single-host reference: ``torchrun --standalone --nproc-per-node nproc``; returns its final model."""
    run = tmp_path / name
    over = dict(overrides, run_dir=str(run))
    r = subprocess.run(torchrun_cmd(1, nproc, cli_args(over)), env=worker_env(), capture_output=True, text=True,
                       timeout=JOB_TIMEOUT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    _assert_clean_exit(r.stdout + r.stderr)
    return _final_model(run, over["max_steps"])


def _multinode(tmp_path, name, overrides, nnodes, nproc, slow=None):
    run, logs = tmp_path / name, tmp_path / f"{name}_logs"
    over = dict(overrides, run_dir=str(run))
    with Cluster(nnodes) as c:
        applied = c.slow_link(slow) if slow is not None else None
        t0 = time.time()
        codes = wait_all(start_job(c, nproc, cli_args(over), str(logs), rdzv_conf="join_timeout=120"), JOB_TIMEOUT)
        seconds = time.time() - t0
    text = read_logs(str(logs))
    assert all(v == 0 for v in codes.values()), f"exit codes {codes}\n{text[-6000:]}"
    _assert_clean_exit(text)
    assert f"run directory: {run}" in text and (run / "backbone.pt").exists()  # rank 0's summary and files
    return _final_model(run, over["max_steps"]), applied, seconds


@pytest.fixture(scope="module")
def simclr_w4(tmp_path_factory):
    """SimCLR with gathered negatives, 4 ranks on one host: the reference of the 2 nodes x 2 processes jobs."""
    tmp = tmp_path_factory.mktemp("simclr_w4")
    over = _config("simclr", tmp / "unused")
    return over, _standalone(tmp, "ref", over, nproc=4)


def test_two_nodes_two_processes_simclr_on_a_slow_link_equals_single_host(simclr_w4, tmp_path):
    # node 1's link slowed down (netem delay, or a tbf rate limit where the kernel has no netem): the result
    # must not depend on the link
    over, ref = simclr_w4
    got, applied, seconds = _multinode(tmp_path, "mn", over, nnodes=2, nproc=2, slow=1)
    print(f"slow link: {applied}; job {seconds:.1f} s; max abs difference {_max_diff(got, ref)}")
    _assert_equal_models(got, ref)


def test_three_nodes_swav_distributed_sinkhorn_equals_single_host(tmp_path):
    over = _config("swav", tmp_path / "unused")
    ref = _standalone(tmp_path, "ref", over, nproc=3)
    got, _, seconds = _multinode(tmp_path, "mn", over, nnodes=3, nproc=1)
    print(f"3 nodes x 1 process, SwAV: job {seconds:.1f} s; max abs difference {_max_diff(got, ref)}")
    _assert_equal_models(got, ref)
    assert any(k.startswith("prototypes.") for k in got)


# ---------------------------------------------------------------------------------------------- node faults
KILL_AFTER = 3  # node 1 dies right after the step-3 checkpoint (ckpt_every 3)
FAULT_RDZV = "join_timeout={},keep_alive_interval=1,keep_alive_max_attempt=3"
# a node that is replaced gets a fresh agent whose restart count starts at 0 again: with torchrun's default
# (the agent's rendezvous store shared with the workers) the new agent waits forever for the store address of
# the new round (pytorch/pytorch#135712); every node of a job that may lose a node runs with this variable
ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def _wait_for(path, procs, timeout=JOB_TIMEOUT):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert time.time() < deadline, f"{path} did not appear"
        assert all(p.poll() is None for p in procs.values()), {i: p.poll() for i, p in procs.items()}
        time.sleep(0.02)


def _logged_steps(run):
    with open(run / "metrics.csv") as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


def _kill_node_1_after_checkpoint(c, run, procs):
    _wait_for(run / f"ckpt_{KILL_AFTER:08d}.pt", procs)
    n = c.kill_node(1)
    assert n >= 2, "expected the agent and its worker"
    procs[1].wait(timeout=30)
    return _logged_steps(run)[-1]


def test_node_killed_and_restarted_resumes_from_last_checkpoint(tmp_path):
    # 2 nodes x 1 process; node 1 (its agent and its worker) is killed after the step-3 checkpoint, then
    # started again with the same command: torchrun (--max-restarts) re-forms the job and every rank continues
    # from the checkpoint rank 0 wrote (--resume auto). 2 ranks: with more, the first step after any
    # (re)start differs from an uninterrupted run's in float rounding (DDP re-buckets the gradients after
    # the first step of every process, and a 3+-rank all-reduce sums in an order that depends on the layout)
    run, logs = tmp_path / "run", tmp_path / "logs"
    over = _config("simclr", run, resume="auto", ckpt_every=KILL_AFTER)
    ref = _standalone(tmp_path, "ref", dict(over, resume=None, ckpt_every=100), nproc=2)
    with Cluster(2) as c:
        procs = start_job(c, 1, cli_args(over), str(logs), max_restarts=2, rdzv_conf=FAULT_RDZV.format(120), env=ENV)
        killed_at = _kill_node_1_after_checkpoint(c, run, procs)
        procs[1] = start_job(c, 1, cli_args(over), str(logs), nodes=[1], max_restarts=2,
                             rdzv_conf=FAULT_RDZV.format(120), env=ENV, log_suffix="_restarted")[1]
        codes = wait_all(procs, JOB_TIMEOUT)
    text = read_logs(str(logs))
    assert all(v == 0 for v in codes.values()), f"exit codes {codes}\n{text[-6000:]}"
    _assert_clean_exit(text)
    steps = _logged_steps(run)
    print(f"node 1 killed at logged step {killed_at}; logged steps {steps}")
    # the resumed job logged from the step after the checkpoint (a job that started over would log 1 again)
    assert steps.count(1) == 1 and set(steps) == set(range(1, STEPS + 1)) and steps[-1] == STEPS, steps
    assert all(b == KILL_AFTER + 1 for a, b in zip(steps, steps[1:]) if b <= a), steps
    assert "lost contact" in text, text[-6000:]  # node 0's workers saw node 1 go (the CLI's one-line error)
    got = _final_model(run, STEPS)
    print(f"max abs difference after resume: {_max_diff(got, ref)}")
    _assert_equal_models(got, ref)


def test_node_that_does_not_come_back_ends_the_job_with_a_clear_error(tmp_path):
    run, logs = tmp_path / "run", tmp_path / "logs"
    over = _config("simclr", run, resume="auto", ckpt_every=KILL_AFTER, max_steps=40)
    with Cluster(2) as c:
        procs = start_job(c, 1, cli_args(over), str(logs), max_restarts=1, rdzv_conf=FAULT_RDZV.format(5), env=ENV)
        _kill_node_1_after_checkpoint(c, run, procs)
        code = procs[0].wait(timeout=JOB_TIMEOUT)
    text = read_logs(str(logs))
    assert code != 0
    agent_error = "torch.distributed.elastic.rendezvous.api.RendezvousTimeoutError"
    print("\n".join(line for line in text.splitlines() if "lost contact" in line or line.startswith(agent_error)))
    assert "lost contact" in text, text[-6000:]  # the worker's one-line error
    assert "RendezvousTimeoutError" in text, text[-6000:]  # the agent gave up waiting for node 1
    state = latest_good_checkpoint(str(run))  # verifies the SHA-256 of the newest checkpoint
    assert state is not None and state["step"] >= KILL_AFTER and state["step"] % KILL_AFTER == 0
    assert not [p for p in os.listdir(run) if ".tmp" in p]
