"""Reading a compiled Triton kernel without a GPU: its SASS (the cubin, through the nvdisasm that triton ships)
and its TTIR, into counts per program (one CTA).

What it reads
  * loops: every backward branch of the SASS is a loop (branches to one header merged); the branch's source
    line (nvdisasm -gi line info) names the Python `for` statement it closes, so a trip count can be given
    per source loop: `trips[(function, loop variable)]`. An instruction executes prod(trips of the loops
    around it) times per program; code inside an `if` counts as executed (an upper bound).
  * tensor cores: HGMMA.MxNxK (sm_90 wgmma: one per warpgroup, M x N x K MACs) and HMMA.<m><n><k> (sm_80
    mma.sync: one per warp), with the shared-memory bytes a wgmma reads for its operands (A from registers
    when its second operand is a register); FFMA inside a `tl.dot` call (the FMA path of fp32 dots).
  * per tt.dot of the TTIR its M x N x K (the useful MACs of one execution), matched to the tensor-core
    instructions by the outermost source line of both (the line in the kernel function itself): issued over
    useful MACs is 1.0 when no warp computes what another warp computes too.
  * MUFU by function (EX2, LG2, RCP, ...), global loads (LDG / LDGSTS bytes per thread, from the width
    suffix), stores, local memory (LDL / STL: spill traffic), shared-memory loads and stores, and every
    instruction (issue slots; each warp issues each instruction).
Nothing here runs a kernel; the counts are the instructions of the compiled code on its straight-line path.
"""

from __future__ import annotations

import ast
import functools
import math
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field

_INSTR = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)\s*([^;]*);")
_LINE = re.compile(r'//## File "([^"]+)", line (\d+)(?: inlined at "([^"]+)", line (\d+))?')
_LABEL = re.compile(r"^\s*(\.L_[\w]+):\s*$")
_TARGET = re.compile(r"`?\((\.L_[\w]+)\)|\b(0x[0-9a-f]+)\b")


def tool(name: str) -> str:
    """Path of a CUDA binary utility: the copy inside the triton package, else PATH, else ''."""
    try:
        import triton
        p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.exists(p):
            return p
    except ImportError:
        pass
    return shutil.which(name) or ""


def _run_on_cubin(cmd, cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run(cmd + [f.name], capture_output=True, text=True).stdout


def disassemble(cubin: bytes) -> str:
    """SASS with source lines (nvdisasm -gi); cuobjdump -sass (no lines) when nvdisasm is missing."""
    nv = tool("nvdisasm")
    if nv:
        return _run_on_cubin([nv, "-gi", "-c"], cubin)
    cu = tool("cuobjdump")
    return _run_on_cubin([cu, "-sass"], cubin) if cu else ""


def resources(cubin: bytes):
    """dict(reg, stack, local) from cuobjdump --dump-resource-usage, or None."""
    cu = tool("cuobjdump")
    if not cu:
        return None
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", _run_on_cubin([cu, "--dump-resource-usage"],
                                                                                          cubin))
    return dict(reg=int(m[1]), stack=int(m[2]), local=int(m[4])) if m else None


# ----------------------------------------------------------------------------------------------------
# SASS


@dataclass
class Instr:
    addr: int
    pred: str
    op: str
    args: str
    frames: tuple  # ((file, line), ...), innermost first


@dataclass
class Loop:
    start: int
    end: int  # address of the (last) backward branch
    frames: tuple  # source frames of that branch
    key: tuple = None  # (function, loop variable), filled by the caller
    depth: int = 0


def _chain(run):
    """Frames of one block of '//## File' lines: the first line's frame, then each 'inlined at' frame."""
    chain = [(run[0][0], int(run[0][1]))]
    for f, ln, f2, ln2 in run:
        if f2 and (f, int(ln)) == chain[-1]:
            chain.append((f2, int(ln2)))
    if run[0][2] and len(chain) == 1:
        chain.append((run[0][2], int(run[0][3])))
    return tuple(chain)


def parse_sass(text: str):
    """(instructions, label -> address)."""
    out, labels, pending_labels = [], {}, []
    run, frames = [], ()
    for line in text.splitlines():
        m = _LINE.search(line)
        if m:
            run.append(m.groups())
            continue
        m = _LABEL.match(line)
        if m:
            pending_labels.append(m[1])
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        if run:
            frames, run = _chain(run), []
        addr = int(m[1], 16)
        for lb in pending_labels:
            labels[lb] = addr
        pending_labels = []
        out.append(Instr(addr, (m[2] or "").strip(), m[3], m[4].strip(), frames))
    return out, labels


def find_loops(instrs, labels):
    """Loops (start, end) from backward branches, outermost first, with their nesting depth."""
    heads = {}
    for ins in instrs:
        if not ins.op.startswith(("BRA", "JMP")):
            continue
        m = _TARGET.search(ins.args)
        if not m:
            continue
        tgt = labels.get(m[1]) if m[1] else int(m[2], 16)
        if tgt is None or tgt >= ins.addr:
            continue  # forward branch, or the self-branch after EXIT
        if tgt not in heads or heads[tgt].end < ins.addr:
            heads[tgt] = Loop(tgt, ins.addr, ins.frames)
    loops = sorted(heads.values(), key=lambda lp: (lp.start, -lp.end))
    for lp in loops:
        lp.depth = sum(1 for o in loops if o is not lp and o.start <= lp.start and lp.end <= o.end)
    return loops


# ----------------------------------------------------------------------------------------------------
# source: `for` statements and `tl.dot` calls of the kernel files


@functools.lru_cache(maxsize=None)
def _source_index(path: str):
    """(fors, dots) of a Python file: fors = [(lineno, end_lineno, function, variable)], dots = {lines of
    tl.dot calls}."""
    try:
        tree = ast.parse(open(path).read())
    except (OSError, SyntaxError):
        return [], frozenset()
    fors, dots = [], set()
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef):
            continue
        fors.append((fn.lineno, fn.end_lineno, fn.name, None))  # the function itself (variable None)
        for node in ast.walk(fn):
            if isinstance(node, ast.For):
                var = node.target.id if isinstance(node.target, ast.Name) else ast.unparse(node.target)
                fors.append((node.lineno, node.end_lineno, fn.name, var))
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "dot":
                dots.add(node.lineno)
    return fors, frozenset(dots)


def _tail(path: str) -> str:
    return "/".join(os.path.normpath(path).split(os.sep)[-2:])


def _proj(f: str, project_files):
    """The project file a frame's path names (by its last two components: a kernel compiled from another
    checkout of the same source, e.g. taken from triton's cache, carries that checkout's path), or None."""
    if f in project_files:
        return f
    tails = {_tail(p): p for p in project_files}
    return tails.get(_tail(f))


def loop_key(frames, project_files):
    """(function, loop variable) of the `for` a backward branch closes: the first frame (innermost out) in a
    project file that is a `for` header line, else the innermost `for` around the first project frame."""
    proj = [(_proj(f, project_files), ln) for f, ln in frames if _proj(f, project_files)]
    for f, ln in proj:
        for lo, hi, fn, var in _source_index(f)[0]:
            if lo == ln and var is not None:
                return (fn, var)
    if proj:
        f, ln = proj[0]
        inner = [(lo, hi, fn, var) for lo, hi, fn, var in _source_index(f)[0]
                 if lo <= ln <= hi and var is not None]
        if inner:
            lo, hi, fn, var = max(inner, key=lambda t: t[0])
            return (fn, var)
    return None


def _functions(frames, project_files):
    """Names of the project functions the frames are in (the chain of inlined calls)."""
    out = set()
    for f, ln in frames:
        rp = _proj(f, project_files)
        if rp:
            out.update(fn for lo, hi, fn, var in _source_index(rp)[0] if var is None and lo <= ln <= hi)
    return out


def _in_dot(frames, project_files) -> bool:
    return any(_proj(f, project_files) and ln in _source_index(_proj(f, project_files))[1] for f, ln in frames)


def _inner(frames, project_files):
    """The innermost frame in a project file."""
    for f, ln in frames:
        if _proj(f, project_files):
            return (_proj(f, project_files), ln)
    return None


def _outer(frames, project_files):  # noqa: D401
    """The outermost frame in a project file (the line in the kernel function itself)."""
    proj = [(_proj(f, project_files), ln) for f, ln in frames if _proj(f, project_files)]
    return proj[-1] if proj else None


# ----------------------------------------------------------------------------------------------------
# TTIR dots and their loops

_LOC_DEF = re.compile(r'^#(loc\d*)\s*=\s*loc\((.*)\)\s*$')


def _loc_resolver(ttir: str):
    defs = {}
    for line in ttir.splitlines():
        m = _LOC_DEF.match(line.strip())
        if m:
            defs[m[1]] = m[2]

    @functools.lru_cache(maxsize=None)
    def resolve(name, depth=0):
        body = defs.get(name, "")
        if depth > 64 or not body:
            return ()
        m = re.match(r'^"([^"]+)":(\d+):\d+$', body)
        if m:
            return ((m[1], int(m[2])),)
        m = re.match(r'^callsite\(#(loc\d*) at #(loc\d*)\)$', body)
        if m:
            return resolve(m[1], depth + 1) + resolve(m[2], depth + 1)
        m = re.match(r'^"[^"]*"\(#(loc\d*)\)$', body)
        if m:
            return resolve(m[1], depth + 1)
        return ()
    return resolve


_ELT_BYTES = {"f32": 4, "i32": 4, "f16": 2, "bf16": 2, "i64": 8, "f64": 8, "i8": 1, "i1": 1, "i16": 2}


def _unused_ttir_vector_loads(ttir: str):
    """{frames: bytes} of the tt.load ops of at most one dimension (norms, statistics, scalars): every thread
    that holds a copy issues its own load, so the SASS counts them many times; the memory sees them once."""
    resolve = _loc_resolver(ttir)
    out = {}
    for line in ttir.splitlines():
        if " tt.load " not in line:
            continue
        m = re.search(r":\s*(tensor<(\d+)x!tt\.ptr<(\w+)>>|!tt\.ptr<(\w+)>)\s*loc\(#(loc\d*)\)\s*$", line.strip())
        if not m:
            continue
        n = int(m[2]) if m[2] else 1
        elt = _ELT_BYTES.get(m[3] or m[4], 4)
        out[resolve(m[5])] = out.get(resolve(m[5]), 0) + n * elt
    return out


def ttir_dots(ttir: str, _all=False):
    """[dict(m, n, k, dtype, frames, loops)] of every tt.dot in program order; loops = frames of the scf.for
    ops around it, outermost first (a for's location is on its closing line). _all: with the tt.load /
    tt.store ops (dict(mem, bytes, rank, frames, loops))."""
    resolve = _loc_resolver(ttir)
    loc_of = lambda line: (lambda m: resolve(m[1]) if m else ())(re.search(r"loc\(#(loc\d*)\)\s*$", line.strip()))  # noqa: E731
    depth, stack, fors, dots = 0, [], [], []  # stack: (depth at open, for index)
    ifs, nif = [], 0  # open scf.if regions: [depth at open, id, branch]; branch 1 after "} else {"
    for line in ttir.splitlines():
        code = re.sub(r'"[^"]*"', '""', line)
        if ifs and re.match(r"^\s*\} else \{", code) and depth - 1 == ifs[-1][0]:
            ifs[-1][2] = 1
        if " scf.for " in code and code.rstrip().endswith("{"):
            fors.append(None)
            stack.append((depth, len(fors) - 1))
        if " scf.if " in code and code.rstrip().endswith("{"):
            ifs.append([depth, nif, 0])
            nif += 1
        if " tt.dot " in code:
            m = re.search(r":\s*tensor<(\d+)x(\d+)x(\w+)>\s*\*\s*tensor<(\d+)x(\d+)x\w+>\s*->\s*tensor<(\d+)x(\d+)x", line)
            if m:
                dots.append(dict(m=int(m[1]), n=int(m[7]), k=int(m[2]), dtype=m[3], frames=loc_of(line),
                                 loops=[i for _, i in stack]))
        if " tt.load " in code or " tt.store " in code:  # the pointer operand's type: tensor<AxBx!tt.ptr<T>>
            m = re.search(r":\s*(?:tensor<([\dx]+)x)?!tt\.ptr<(\w+)>", line)
            if m:
                n = 1
                for dim in (m[1] or "").split("x"):
                    n *= int(dim) if dim else 1
                dots.append(dict(mem="load" if " tt.load " in code else "store", bytes=n * _ELT_BYTES.get(m[2], 4),
                                 rank=len(m[1].split("x")) if m[1] else 0, frames=loc_of(line),
                                 loops=[i for _, i in stack], path=tuple((i, b) for _, i, b in ifs)))
        depth += code.count("{") - code.count("}")
        while stack and depth <= stack[-1][0]:
            _, i = stack.pop()
            fors[i] = loc_of(line)
        while ifs and depth <= ifs[-1][0]:
            ifs.pop()
    for dt in dots:
        dt["loops"] = [fors[i] or () for i in dt["loops"]]
    # an if / else runs one branch: the memory operations of the smaller one are dropped (innermost first)
    mems = [x for x in dots if "mem" in x]
    for i in sorted({i for x in mems for i, _ in x["path"]}, key=lambda i: -max(
            len(x["path"]) for x in mems if any(j == i for j, _ in x["path"]))):
        size = [sum(x["bytes"] for x in mems if (i, b) in x["path"]) for b in (0, 1)]
        if size[1]:  # an else branch exists
            drop = (i, 1 if size[0] >= size[1] else 0)
            mems = [x for x in mems if drop not in x["path"]]
    keep = {id(x) for x in mems}
    dots = [x for x in dots if "mem" not in x or id(x) in keep]
    return dots if _all else [x for x in dots if "mem" not in x]


def ttir_memops(ttir: str):
    return [x for x in ttir_dots(ttir, _all=True) if "mem" in x]


# ----------------------------------------------------------------------------------------------------
# counting


def _width(op: str) -> int:
    """Bytes per thread of a load / store opcode from its width suffix."""
    for suf, b in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if suf in op:
            return b
    return 4


def _ldsm_bytes(op: str) -> int:
    m = re.search(r"\.M[T]?88\.(\d)", op)
    return 4 * int(m[1]) if m else 4


_ELT = {"BF16": 2, "F16": 2, "TF32": 4, "E4M3": 1, "E5M2": 1, "S8": 1, "U8": 1}


def _mma_shape(ins):
    """(M, N, K, per 'warpgroup' | 'warp', smem operand bytes of one instruction) or None."""
    if ins.op.startswith("HGMMA."):
        m = re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)\.\w+(?:\.(\w+))?", ins.op)  # no type suffix: F16
        if not m:
            return None
        mm, nn, kk, t = int(m[1]), int(m[2]), int(m[3]), m[4] or "F16"
        eb = _ELT.get(t, 2)
        args = [a.strip() for a in ins.args.split(",")]
        a_smem = len(args) > 1 and args[1].startswith("gdesc")
        return mm, nn, kk, "warpgroup", (mm * kk * eb if a_smem else 0) + nn * kk * eb
    if ins.op.startswith("HMMA."):
        m = re.match(r"HMMA\.(\d+)\.", ins.op)
        if not m:
            return None
        s = m[1]  # 16816 -> m16 n8 k16, 1688 -> m16 n8 k8, 1684 -> m16 n8 k4
        return 16, 8, int(s[3:]), "warp", 0
    return None


@dataclass
class Counts:
    """Per program (CTA): dynamic counts on the straight-line path."""
    warps: int
    issued_macs: float = 0.0  # tensor-core (or FMA-dot) MACs issued
    useful_macs: float = 0.0  # sum over tt.dot of M N K x executions
    tc_kind: str = "-"  # wgmma | mma | fma | -
    dots: list = field(default_factory=list)  # per tt.dot: dict(shape, dtype, loops, useful, line)
    tc_hist: dict = field(default_factory=dict)  # tensor-core instruction -> executions per program
    mufu: dict = field(default_factory=dict)  # function -> count (threads)
    gld_bytes: float = 0.0  # global loads (LDG + LDGSTS)
    l2_bytes: float = 0.0  # bytes the tt.load ops of the TTIR ask for (x loop trips): the L2 -> SM traffic
    gst_bytes_ttir: float = 0.0  # bytes the tt.store ops write
    narrow_ldg_bytes: float = 0.0  # of gld_bytes: 1-4 byte LDG / LDGSTS (norms, statistics: many copies, L1)
    gst_bytes: float = 0.0
    local_bytes: float = 0.0  # LDL + STL (spill traffic)
    smem_bytes: float = 0.0  # LDS / LDSM / STS / STSM + wgmma operand reads
    warp_instrs: float = 0.0  # issue slots (per warp, summed over warps)
    logits: float = 0.0  # M x N of the first dot x its non-reduction executions
    loops: list = field(default_factory=list)  # (key, depth, trips)
    unknown_loops: list = field(default_factory=list)
    tma: bool = False

    @property
    def ratio(self):
        return self.issued_macs / self.useful_macs if self.useful_macs else float("nan")


class Program:
    """A compiled kernel, parsed once (SASS instructions, loops, TTIR dots); `count` gives the counts of one
    program for given trip counts."""

    def __init__(self, cubin: bytes, ttir: str, project_files=()):
        self.project_files = frozenset(os.path.realpath(p) for p in project_files)
        self.instrs, labels = parse_sass(disassemble(cubin))
        self.loops = find_loops(self.instrs, labels)
        for lp in self.loops:
            lp.key = loop_key(lp.frames, self.project_files)
        self.dots = ttir_dots(ttir)
        self.memops = ttir_memops(ttir)
        for x in self.memops:
            x["keys"] = [loop_key(fr, self.project_files) for fr in x["loops"]]
        for dt in self.dots:
            dt["keys"] = [loop_key(fr, self.project_files) for fr in dt["loops"]]

    def count(self, num_warps: int, trips, reduction_loops=(), cold=()):
        """cold: functions whose inlined code is not counted (the branch not taken at the shape)."""
        return _count(self, num_warps, trips, reduction_loops, frozenset(cold))


def analyze(cubin: bytes, ttir: str, num_warps: int, trips, reduction_loops=(), project_files=()):
    """Counts of one program. trips: callable((function, variable)) -> int (None: unknown, counted once);
    reduction_loops: loop keys that run over the dot's K dimension (they do not multiply the logits)."""
    return Program(cubin, ttir, project_files).count(num_warps, trips, reduction_loops)


def _count(prog, num_warps, trips, reduction_loops, cold=frozenset()):
    instrs, project_files = prog.instrs, prog.project_files
    c = Counts(warps=num_warps)
    loops = []
    for lp0 in prog.loops:
        lp = Loop(lp0.start, lp0.end, lp0.frames, lp0.key, lp0.depth)
        t = trips(lp.key) if lp.key else None
        if t is None:
            c.unknown_loops.append((lp.key, hex(lp.start)))
            t = 1
        lp.trips = max(0, int(t))
        c.loops.append((lp.key, lp.depth, lp.trips))
        loops.append(lp)

    def mult(addr, skip_reduction=False):
        out = 1
        for lp in loops:
            if lp.start <= addr <= lp.end and not (skip_reduction and lp.key in reduction_loops):
                out *= lp.trips
        return out

    threads = 32 * num_warps
    hist = {}  # tensor-core instruction -> dynamic count (per warpgroup / warp)
    for ins in instrs:
        if cold and _functions(ins.frames, project_files) & cold:
            continue
        k = mult(ins.addr)
        c.warp_instrs += k * num_warps
        op = ins.op
        shape = _mma_shape(ins)
        if shape:
            mm, nn, kk, unit, sbytes = shape
            units = num_warps / 4 if unit == "warpgroup" else num_warps
            c.issued_macs += mm * nn * kk * units * k
            c.smem_bytes += sbytes * units * k
            c.tc_kind = "wgmma" if unit == "warpgroup" else "mma"
            name = op.split(".")[0] + "." + op.split(".")[1] + ("" if unit == "warp" or sbytes > nn * kk * 2
                                                                 else ".rA")
            hist[name] = hist.get(name, 0) + units * k
        elif op.startswith("FFMA") and _in_dot(ins.frames, project_files):
            c.issued_macs += threads * k
            c.tc_kind = "fma" if c.tc_kind == "-" else c.tc_kind
            hist["FFMA(dot)"] = hist.get("FFMA(dot)", 0) + threads * k
        elif op.startswith("MUFU."):
            f = op.split(".")[1]
            c.mufu[f] = c.mufu.get(f, 0) + threads * k
        elif op.startswith(("LDGSTS", "LDG")):
            b = _width(op) * threads * k
            c.gld_bytes += b
            if op.startswith("LDGSTS"):
                c.smem_bytes += b  # cp.async writes shared memory
            if not (".BYPASS" in op or _width(op) >= 8):  # cp.async.ca / 1-4 byte ld.global: norms, statistics
                c.narrow_ldg_bytes += b
        elif op.startswith(("UTMALDG", "UBLKCP")):
            c.tma = True
        elif op.startswith(("STG", "RED", "ATOM")):
            c.gst_bytes += _width(op) * threads * k
        elif op.startswith(("LDL", "STL")):
            c.local_bytes += _width(op) * threads * k
        elif op.startswith(("LDSM", "STSM")):
            c.smem_bytes += _ldsm_bytes(op) * threads * k
        elif op.startswith(("LDS", "STS")):
            c.smem_bytes += _width(op) * threads * k
    c.tc_hist = hist
    # the bytes the program asks of L2: every tt.load / tt.store of the TTIR, times the trips of its loops
    # (a vector of norms loads once, not once per thread that holds a copy; masked elements count)
    c.l2_bytes = 0.0
    for x in prog.memops:
        execs = 1
        for key in x["keys"]:
            t = trips(key) if key else None
            execs *= 1 if t is None else max(0, int(t))
        if x["mem"] == "load":
            c.l2_bytes += x["bytes"] * execs
        else:
            c.gst_bytes_ttir = getattr(c, "gst_bytes_ttir", 0.0) + x["bytes"] * execs
    # useful MACs: every tt.dot, M N K times the trips of the source loops around it (from the TTIR)
    for i, dt in enumerate(prog.dots):
        keys = dt["keys"]
        execs, logit_execs = 1, 1
        for key in keys:
            t = trips(key) if key else None
            t = 1 if t is None else max(0, int(t))
            execs *= t
            if key not in reduction_loops:
                logit_execs *= t
        useful = dt["m"] * dt["n"] * dt["k"] * execs
        c.useful_macs += useful
        c.dots.append(dict(shape=(dt["m"], dt["n"], dt["k"]), dtype=dt["dtype"], loops=keys, useful=useful,
                           line=(_outer(dt["frames"], project_files) or (None, None))[1]))
        if i == 0:
            c.logits = dt["m"] * dt["n"] * logit_execs
    return c


# ----------------------------------------------------------------------------------------------------
# occupancy

ARCH = {  # per SM: registers, shared memory (bytes), max warps, max CTAs; shared memory per CTA; reserved
    80: dict(regs=65536, smem=167936, warps=64, ctas=32, smem_cta=166912, reserved=1024),
    90: dict(regs=65536, smem=233472, warps=64, ctas=32, smem_cta=232448, reserved=1024),
}


def occupancy(arch: int, regs: int, smem: int, num_warps: int) -> dict:
    """CTAs per SM from registers (256-register allocation units per warp), shared memory and warps."""
    a = ARCH[arch]
    per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = a["regs"] // (per_warp * num_warps) if regs else a["ctas"]
    by_smem = a["smem"] // (smem + a["reserved"]) if smem else a["ctas"]
    by_warps = a["warps"] // num_warps
    ctas = max(0, min(by_regs, by_smem, by_warps, a["ctas"]))
    limit = min(("regs", by_regs), ("smem", by_smem), ("warps", by_warps), key=lambda t: t[1])[0]
    return dict(ctas=ctas, warps=ctas * num_warps, limit=limit if ctas < a["ctas"] else "ctas",
                fits=smem <= a["smem_cta"])
