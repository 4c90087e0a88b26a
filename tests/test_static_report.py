"""The static performance report (scripts/static_report.py, scripts/sass_analysis.py): no GPU needed.

1. sass_analysis on a hand-written SASS / TTIR fragment: loops from backward branches, trip counts per source
   loop, wgmma MACs per warpgroup against the tt.dot's MACs (a tile computed twice reads 2.0), MUFU, loads.
2. The report's CI subset (`--quick --check`, sm_90, default configs): the kernels compiled for sm_90 with
   triton.compile and read back must keep the invariants of bench/results/static-sm90.md: issued / useful
   tensor-core MACs <= 1.05 in every 16-bit InfoNCE kernel, every 16-bit dot on wgmma with 16-bit operands, no
   register spills at the target shapes (NT-Xent bf16 2N = 65536, D = 256; MoCo's 256 queries x 65792
   candidates, D = 128), >= 132 CTAs in the MoCo forward and backward, a trip count for every loop. ~1-2 min
   cold on 2 cores (its variants are also tests/test_triton_compile.py's: triton's cache serves the second).
3. The committed bench/results/static-sm90.md (every triton section, sm_90 and sm_80): its rows keep the same
   invariants (no triton needed to read them; `python scripts/static_report.py --write` regenerates it).
All skipped when triton is missing; 2 also when its ahead-of-time API is not the one the scripts speak.
"""

import os
import re
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import sass_analysis as S  # noqa: E402

_SRC = textwrap.dedent('''\
    def k(n):
        for j in range(n):
            x = tl.dot(a, b)
''')
# a 128 x 64 x 16 tile on 8 warps (two warpgroups): correct when each warpgroup issues 64 x 64 x 16
_SASS = textwrap.dedent('''\
        /*0000*/                   MOV R1, R2 ;
.L_x_0:
	//## File "{f}", line 3
        /*0010*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R4.64] ;
        /*0020*/                   HGMMA.64x64x16.F32.BF16 R8, gdesc[UR8], R8 ;
        /*0030*/                   MUFU.EX2 R9, R9 ;
	//## File "{f}", line 2
        /*0040*/              @P0 BRA `(.L_x_0) ;
        /*0050*/                   EXIT ;
''')
_TTIR = textwrap.dedent('''\
    module {{
      tt.func @k() {{
        %r = scf.for %j = %c0 to %n step %c1 iter_args(%a = %z) -> (tensor<128x64xf32>) : i32 {{
          %x = tt.dot %p, %q, %a : tensor<128x16xbf16> * tensor<16x64xbf16> -> tensor<128x64xf32> loc(#loc3)
          %v = tt.load %ptr : tensor<64x16x!tt.ptr<bf16>> loc(#loc3)
          scf.yield %x : tensor<128x64xf32>
        }} loc(#loc2)
        tt.return
      }}
    }}
    #loc2 = loc("{f}":2:9)
    #loc3 = loc("{f}":3:13)
''')


def test_sass_analysis_counts(tmp_path, monkeypatch):
    src = tmp_path / "kernels" / "k.py"
    src.parent.mkdir()
    src.write_text(_SRC)
    sass, ttir = _SASS.format(f=src), _TTIR.format(f=src)
    monkeypatch.setattr(S, "disassemble", lambda cubin: sass)
    prog = S.Program(b"", ttir, project_files=[str(src)])
    assert [lp.key for lp in prog.loops] == [("k", "j")]
    for warps, ratio in ((8, 1.0), (4, 0.5)):  # 8 warps: two warpgroups cover 128 rows; 4: half the rows
        c = prog.count(warps, lambda key: {("k", "j"): 10}[key])
        assert c.tc_kind == "wgmma" and c.useful_macs == 128 * 64 * 16 * 10
        assert c.ratio == pytest.approx(ratio)
        assert c.mufu == {"EX2": 32 * warps * 10} and c.logits == 128 * 64 * 10
        assert c.l2_bytes == 64 * 16 * 2 * 10  # the tt.load, once per trip
        assert c.unknown_loops == []
    # a tile computed twice (both warpgroups on the same 64 rows of a 64-row tile) reads 2.0
    dup = prog.count(8, lambda key: 10)
    prog.dots[0]["m"] = 64
    assert prog.count(8, lambda key: 10).ratio == pytest.approx(2 * dup.ratio)


def test_occupancy():
    assert S.occupancy(90, 255, 128 << 10, 8)["ctas"] == 1
    assert S.occupancy(90, 128, 80 << 10, 8)["ctas"] == 2
    assert S.occupancy(90, 32, 0, 4)["ctas"] == 16  # 64 warps / 4


@pytest.fixture(scope="module")
def quick_report():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "static_report.py"), "--quick", "--check",
                           "--jobs", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    out = proc.stdout + proc.stderr
    if "unsupported triton version" in out or "not importable" in out:
        pytest.skip(out.strip().splitlines()[-1])
    return proc.returncode, out


def test_report_invariants(quick_report):
    rc, out = quick_report
    assert rc == 0 and "\n0 invariant failure(s)" in out, out[-6000:]
    # the rows the invariants looked at are there (a report that read nothing would pass the check)
    bwd = [ln for ln in out.splitlines() if ln.startswith("| NT-Xent bf16 2N=65536 D=256 | bwd | _bwd_kernel |")]
    assert bwd and all("| wgmma | 1.000 |" in ln and "| 0 B |" in ln for ln in bwd), bwd
    moco = [ln for ln in out.splitlines() if ln.startswith("| MoCo queue")]
    head = [ln for ln in moco if "|" in ln and ln.count("|") == 10]
    assert head and re.search(r"\| (\d+) / (\d+) \|$", head[0]), head
    fwd_ctas, bwd_ctas = map(int, re.search(r"\| (\d+) / (\d+) \|$", head[0]).groups())
    assert fwd_ctas >= 132 and bwd_ctas >= 132, head[0]


# ----------------------------------------------------------------------------------------------------
# the committed report (bench/results/static-sm90.md, every triton section in it): its own rows must keep the
# invariants, so that a regenerated report that breaks one cannot be committed unnoticed. No triton needed.

REPORT = os.path.join(ROOT, "bench", "results", "static-sm90.md")
_TARGETS = ("NT-Xent bf16 2N=65536 D=256", "MoCo queue bf16 N=256 x 65792 D=128")


def _tables(text):
    """{(triton section, arch): [row cells]} of the per-launch tables (rows with a phase column)."""
    out, sec, arch = {}, None, None
    for ln in text.splitlines():
        if ln.startswith("## triton "):
            sec = ln[3:].split(",")[0]
        elif ln.startswith("### sm_"):
            arch = int(ln[len("### sm_"):].split()[0])
        elif ln.startswith("| ") and sec and arch:
            cells = [c.strip() for c in ln.strip("|").split("|")]
            if len(cells) > 3 and cells[1] in ("fwd", "bwd"):
                out.setdefault((sec, arch), []).append(cells)
    return out


def test_committed_report_invariants():
    text = open(REPORT).read()
    assert text.startswith("# Static performance report") and "python scripts/static_report.py --write" in text
    tables = _tables(text)
    assert any(arch == 90 for _, arch in tables), "no sm_90 section"
    for (sec, arch), rows in tables.items():
        h = ["op", "phase", "kernel", "tile", "w/s"] + (["ctas", "regs", "spill"] if arch == 90 else ["regs", "spill"])
        h += ["smem", "occ", "tc", "ratio"]
        seen = set()
        for cells in rows:
            r = dict(zip(h, cells))
            op, default = r["op"], "(candidate)" not in r["kernel"]
            where = f"{sec} sm_{arch} {op} {r['kernel']}"
            sixteen = " bf16 " in f" {op} " or " fp16 " in f" {op} "
            infonce = op.startswith(("NT-Xent", "InfoNCE", "MoCo", "distributed"))
            if infonce and sixteen and r["ratio"] != "-":
                assert r["tc"] == ("wgmma" if arch == 90 else "mma"), where
                assert float(r["ratio"]) <= 1.05, where
                seen.add(op)
            if default and op in _TARGETS:
                assert r["spill"] == "0 B", where
        assert set(_TARGETS) <= seen, (sec, arch, seen)
    # MoCo's queue shape: >= 132 CTAs in the forward and the backward (the headline's last column)
    moco = [ln for ln in text.splitlines() if ln.startswith("| MoCo queue") and ln.count("|") == 10]
    assert moco
    for ln in moco:
        fwd, bwd = map(int, re.search(r"\| (\d+) / (\d+) \|$", ln).groups())
        assert fwd >= 132 and bwd >= 132, ln
