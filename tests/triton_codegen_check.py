"""Compile Triton kernels for Hopper (sm_90) without a GPU and check the generated TTGIR.

Run as a script in a process without TRITON_INTERPRET (tests/test_triton_codegen.py does):
    python tests/triton_codegen_check.py
Prints one line per kernel and exits non-zero if a check fails.

The check: every tensor-core dot must start from a zero accumulator or from another dot of
the same chain, never from a value carried around the loop.  Triton folds ``acc + dot(a, b, 0)``
into ``dot(a, b, acc)``; then the whole loop accumulates on the tensor cores, whose fp32
accumulation is not IEEE (the post backward's dh_res drifted to 8e-5 at D = 65536 on the H200,
against 2e-5 allowed).  The interpreter has no such pass, so only a compile can catch it.

Each line also gives the compiled kernel's registers per thread and stack bytes (spilled
registers), from ``cuobjdump -res-usage`` of its cubin (the tool ships with Triton's NVIDIA
backend; where it is missing, "regs ?"), and the check fails if a kernel for 16-bit x spills:
spills cost time without changing a result, so no accuracy test sees them.  (fp32 x, the
precise path, may: three-piece products in 255 registers.)
"""
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as exc:  # exit 77: this environment cannot run the check (the test skips)
    print(f"triton unavailable: {exc}")
    sys.exit(77)

import torch  # noqa: E402

try:
    from mhc_multi.backends import _common
    from mhc_multi.backends.triton import _util, config, post, pre_backward, pre_forward, precision
except ImportError:  # a checkout that is not installed
    from backends import _common
    from backends.triton import _util, config, post, pre_backward, pre_forward, precision

DOT = re.compile(r"=\s*(tt\.dot|ttng\.warp_group_dot)\s+(%[\w.#]+),\s*(%[\w.#]+),\s*(%[\w.#]+)")
DEF = re.compile(r"^\s*(%[\w.]+)(?::\d+)?\s*=\s*(.*)$")


def compile_sm90(fn, types, consts, num_warps=4, num_stages=3):
    """(TTGIR text, cubin bytes) of fn compiled for sm_90 with these argument types and
    constexprs."""
    # a constexpr left out would compile as a runtime i32 (both sides of its branches)
    missing = [p.name for p in fn.params if p.is_constexpr and p.name not in consts]
    if missing:
        raise ValueError(f"{fn.__name__}: constexprs without a value: {missing}")
    sig = {a: ("constexpr" if a in consts else
               types.get(a, "*fp32" if a.endswith("_ptr") else "i32")) for a in fn.arg_names}
    # pointers 16-byte aligned, as the launcher specializes them (vector loads, pipelining)
    attrs = {(k,): [["tt.divisibility", 16]] for k, a in enumerate(fn.arg_names)
             if sig[a].startswith("*")}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=num_warps, num_stages=num_stages))
    return k.asm["ttgir"], k.asm["cubin"]


def resources(cubin):
    """(registers per thread, stack bytes) of a compiled kernel, or None where Triton's
    cuobjdump is missing or says nothing we read."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def bad_accumulators(ttgir):
    """The dots whose accumulator is neither a zero constant nor another dot's result."""
    zeros, dots, bad = set(), set(), []
    lines = ttgir.splitlines()
    for line in lines:
        m = DEF.match(line)
        if not m:
            continue
        name, rhs = m.groups()
        if rhs.startswith("arith.constant") and re.search(r"dense<0\.0+e\+00>", rhs):
            zeros.add(name)
        if DOT.search(line) or "ttng.warp_group_dot_wait" in rhs:
            dots.add(name)
        elif rhs.startswith("ttg.convert_layout") and rhs.split()[1].split("#")[0] in dots:
            dots.add(name)   # a dot's result moved to another dot's layout, same iteration
    for line in lines:
        m = DOT.search(line)
        if m:
            acc = m.group(4).split("#")[0]
            if acc not in zeros and acc not in dots:
                bad.append(line.strip()[:160])
    return bad


def cases():
    ptypes = {"x_ptr": "*{0}", "f_ptr": "*{0}", "g_ptr": "*{0}", "dx_ptr": "*{0}", "df_ptr": "*{0}"}
    for dt, n, bt, bd, npc in (("bf16", 4, 4, 256, 1), ("fp16", 3, 4, 256, 1), ("fp32", 4, 4, 128, 3),
                               ("bf16", 8, 2, 512, 1), ("bf16", 1, 16, 256, 1)):
        np_ = _util._next_pow2(n)
        yield (f"_post_bwd_kernel {dt} n={n}", post._post_bwd_kernel,
               {k: v.format(dt) for k, v in ptypes.items()},
               dict(N=n, NP=np_, D=4096, BLOCK_T=bt, BLOCK_D=bd, FR=max(16, bt), NPC=npc,
                    INTERP=False, EXACT=False))
    # a few elements (_common.FEW_POST): both post kernels sum x's outputs in float64 (FEW; the
    # backward's dh_post and dh_res stay tensor-core dots)
    yield ("_post_bwd_kernel bf16 n=2 FEW", post._post_bwd_kernel,
           {k: v.format("bf16") for k, v in ptypes.items()},
           dict(N=2, NP=2, D=1, BLOCK_T=8, BLOCK_D=16, FR=16, NPC=1, INTERP=False, EXACT=True))
    yield ("_post_fwd_kernel fp32 n=1 FEW", post._post_fwd_kernel,
           {"x_ptr": "*fp32", "f_ptr": "*fp32", "out_ptr": "*fp32"},
           dict(N=1, NP=1, D=1, BLOCK_T=16, BLOCK_D=16, INTERP=False, EXACT=True))
    fwd = {"x_ptr": "*{0}", "hin_ptr": "*{0}", "pg_ptr": "*bf16", "norm_eps": "fp32", "hc_eps": "fp32"}
    for dt in ("bf16", "fp32"):
        npa, npb = precision._PIECES[dt][0]
        yield (f"_pre_fwd_kernel {dt}", pre_forward._pre_fwd_kernel, {k: v.format(dt) for k, v in fwd.items()},
               dict(N=4, D=4096, F=24, F_PAD=32, BLOCK_T=64, BLOCK_D=128, BLOCK_D2=128, NPA=npa,
                    NPB=npb, INTERP=False, K=0, NP=1, SEP=False, CAT=config._cat(npa, npb, 32)))
    for dt in ("fp16", "bf16"):   # the few-h_res-entries forward (SEP: separate dots)
        npa = precision._PIECES[dt][0][0]
        yield (f"_pre_fwd_kernel {dt} SEP", pre_forward._pre_fwd_kernel,
               {k: v.format(dt) for k, v in fwd.items()},
               dict(N=1, D=1, F=3, F_PAD=16, BLOCK_T=64, BLOCK_D=16, BLOCK_D2=16, NPA=npa, NPB=3,
                    INTERP=False, K=0, NP=1, SEP=True, CAT=False))
    part = {"x_ptr": "*{0}", "pg_ptr": "*bf16"}
    for dt, n in (("bf16", 4), ("bf16", 8), ("fp16", 8), ("fp32", 4), ("fp32", 8)):   # pass 1
        cfg = config._make_config(n, 4096, dt, torch.device("cuda"))
        npa, npb = precision._PIECES[dt][0]
        F = n * n + 2 * n
        F_pad = max(16, _util._next_pow2(F))
        fa, fb = config._f_blocks(F, F_pad)
        yield (f"_pre_fwd_part_kernel {dt} n={n} F{fa}+{fb}", pre_forward._pre_fwd_part_kernel,
               {k: v.format(dt) for k, v in part.items()},
               dict(N=n, D=4096, F=F, F_PAD=F_pad, BLOCK_T=cfg["fwd_split_bt"],
                    BLOCK_D=cfg["fwd_split_bd"], NPA=npa, NPB=npb, INTERP=False, FA=fa, FB=fb,
                    CAT=config._cat(npa, npb, F_pad), ILV=n == 4, SEP=False, PREP=False,
                    HAS_G=False, PDL="end"),   # ILV, PDL: as at short T on sm_90
               cfg["fwd_split_warps"], cfg["fwd_split_stages"])
    for dt in ("fp32", "bf16"):   # pass 1 for few h_res entries (SEP: separate dots), with
        #                             phi*g's pieces read, or made in pass 1 (PREP, one token block)
        for prep in (False, True):
            yield (f"_pre_fwd_part_kernel {dt} SEP{' PREP' if prep else ''}",
                   pre_forward._pre_fwd_part_kernel, {k: v.format(dt) for k, v in part.items()},
                   dict(N=1 if not prep else 4, D=1 if not prep else 4096, F=3 if not prep else 24,
                        F_PAD=16 if not prep else 32, BLOCK_T=64, BLOCK_D=32,
                        NPA=precision._PIECES[dt][0][0], NPB=3, INTERP=False,
                        FA=16 if not prep else 32, FB=0, CAT=False, ILV=False, SEP=True,
                        PREP=prep, HAS_G=prep, PDL=""))
    col = {"x_ptr": "*{0}", "dhin_ptr": "*{0}", "dx_ptr": "*{0}", "dm_ptr": "*bf16",
           "hc_eps": "fp32", "dxadd_ptr": "*{0}"}
    no_exact = dict.fromkeys(("rms_ptr", "hmix_ptr", "hpost_ptr", "dhpost_ptr", "dres_ptr",
                              "alpha_ptr"))
    for dt, D, n, add in (("bf16", 4096, 4, False), ("bf16", 4096, 4, True), ("bf16", 16, 4, False),
                          ("fp32", 4096, 4, False), ("bf16", 4096, 8, False),
                          ("fp16", 4096, 6, False), ("fp32", 4096, 8, False), ("fp32", 3, 2, True),
                          ("bf16", 1, 1, False)):
        cfg = config._col_cfg(config._make_config(n, D, dt, torch.device("cuda")), add)
        (nwa, nwb), (npa, npb) = cfg["w_pieces"], cfg["p_pieces"]   # the rule's pieces, tiles
        F = n * n + 2 * n
        fa, fb = config._f_blocks(F, max(16, _util._next_pow2(F)))
        exact = n * D <= _common.SMALL_ND   # short rows: _dx_exact, as the launch takes it
        if exact:
            fa, fb = max(16, _util._next_pow2(F)), 0
        yield (f"_pre_bwd_col_kernel {dt} n={n} D={D} w{nwa}{nwb} P{npa}{npb} F{fa}+{fb}"
               + " EXACT" * exact + " ADD" * add,
               pre_backward._pre_bwd_col_kernel,
               dict({k: v.format(dt) for k, v in col.items()},
                    **({"wscol_ptr": "*fp64"} if exact else {})),
               dict(N=n, D=D, F=F, F_PAD=max(16, _util._next_pow2(F)), BLOCK_T=cfg["col_bt"],
                    BLOCK_D=cfg["col_bd"], HAS_G=True, NWA=nwa, NWB=nwb, NPA=npa, NPB=npb,
                    NDM=max(nwa, npa), INTERP=False, EXACT=exact, FA=fa, FB=fb, HAS_ADD=add,
                    **({} if exact else no_exact), **({} if add else {"dxadd_ptr": None})),
               cfg["col_warps"], cfg["col_stages"])


def main():
    failed = ncases = 0
    for name, fn, types, consts, *launch in cases():
        ncases += 1
        ttgir, cubin = compile_sm90(fn, types, consts, *launch)
        ndots = len(DOT.findall(ttgir))
        bad = bad_accumulators(ttgir)
        res = resources(cubin)
        regs = "regs ?" if res is None else f"regs {res[0]}, stack {res[1]}"
        print(f"{name}: {ndots} dots, {len(bad)} accumulating across the loop, {regs}")
        for line in bad:
            print("   ", line)
        # short rows (EXACT) are float64 throughout and the post forward is elementwise: no
        # tensor-core dot; every other kernel has some
        failed += bool(bad) or (ndots == 0) != ("EXACT" in name or name.startswith("_post_fwd"))
        spills = res is not None and res[1] > 0 and ("bf16" in name or "fp16" in name)
        if spills:
            print("    spills: a kernel for 16-bit x uses stack")
        failed += spills
    print(f"cases checked: {ncases}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
