"""Every Triton kernel variant the runtime launches, compiled for Hopper (sm_90) on this machine, no GPU needed.

The Triton interpreter (the other CPU kernel tests) runs the kernels' Python, not Triton's compiler: code that
the interpreter accepts can still fail to compile for a GPU (found on the H200: an early ``return`` of another
dtype than the function's last one). This compiles each kernel through ptxas for sm_90 with the argument types
and constexprs of its launch, and checks what the PTX must hold where a variant's point is an instruction choice.
"""
import os
import re
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
triton = pytest.importorskip("triton")
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import triton.backends.nvidia  # noqa: F401 - the CUDA backend (and its ptxas) ships in Triton's wheel
except ImportError as e:  # pragma: no cover - Triton builds without the CUDA backend
    pytest.skip(f"Triton's CUDA backend is not importable: {e}", allow_module_level=True)

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("compiles for a GPU: not under the Triton interpreter", allow_module_level=True)

HOPPER = GPUTarget("cuda", 90, 32)


def compile_sm90(fn, types: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 3, aligned=(),
                 sass: bool = False):
    """PTX of ``fn`` for sm_90: ``types`` for its non-constexpr arguments (default i32), ``constexprs`` for the
    others (an omitted one takes its default). As at a real launch, pointers are 16-byte aligned and the integer
    arguments named in ``aligned`` divisible by 16 (Triton specializes on both: without it, loads would compile
    as single bytes and not be what the GPU runs). ``sass``: the machine code instead of the PTX."""
    c = _compile_sm90(fn, types, constexprs, num_warps, num_stages, aligned)
    return c.asm["ptx"] if not sass else _disassemble(c.asm["cubin"])


def _signature(fn, types: dict, constexprs: dict, aligned=()):
    """(signature, constexprs, attrs) of ``fn`` for ASTSource as a real launch specializes it: ``types`` for its
    non-constexpr arguments (default i32; a non-string is mangled, e.g. a Gluon TensorDescriptor), pointers and the
    integers named in ``aligned`` divisible by 16."""
    from triton.runtime.jit import mangle_type
    sig, const, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            const[p.name] = constexprs[p.name] if p.name in constexprs else p.default
        else:
            v = types.get(p.name, "i32")
            sig[p.name] = v if isinstance(v, str) else mangle_type(v)
            if sig[p.name].startswith("*") or p.name in aligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
    unknown = set(types) - set(sig) | set(constexprs) - set(const) | set(aligned) - set(sig)
    assert not unknown, f"not arguments of {fn.__name__}: {unknown}"
    return sig, const, attrs


def _compile_sm90(fn, types: dict, constexprs: dict, num_warps: int, num_stages: int, aligned=()):
    """The compiled kernel of :func:`compile_sm90` (both its PTX and its cubin)."""
    sig, const, attrs = _signature(fn, types, constexprs, aligned)
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs), target=HOPPER,
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _disassemble(cubin: bytes) -> str:
    """SASS of a cubin (nvdisasm from Triton's CUDA backend)."""
    import subprocess
    import tempfile
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    if not os.path.exists(nvdisasm):
        pytest.skip("Triton's wheel has no nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout


def _gemm_types(fmt: str, c_block=None):
    el = "i8" if fmt == "int8" else "fp8e4nv"
    t = {"a_desc": f"tensordesc<{el}[128, 128]>", "b_desc": f"tensordesc<{el}[256, 128]>",
         "sa_ptr": "*fp32", "sb_ptr": "*fp32", "bias_ptr": "*bf16"}
    if c_block:
        t["c_desc"] = f"tensordesc<{el}[128, {c_block}]>"
    return t


@pytest.mark.parametrize("fmt", ["e4m3", "int8"])
@pytest.mark.parametrize("ws,sub", [(False, False), (True, False), (True, True)])
def test_fc1_kernel_compiles_for_hopper(fmt, ws, sub):
    from sd35fp8.kernels.mlp import _fc1_gelu_q
    ptx = compile_sm90(_fc1_gelu_q, dict(_gemm_types(fmt, 128 if sub else 256), inv_ptr="*fp32"),
                       dict(NUM_SMS=132, BM=128, BN=256, BK=128, G=8, PER_CHANNEL=fmt == "int8", HAS_BIAS=True,
                            TANH=True, WARP_SPEC=ws, SUBTILE=sub, INT8=fmt == "int8"), num_warps=8, num_stages=4)
    if fmt == "int8":  # exact int32 MMA; rounding by the FP32 magic-number add, no float-to-int conversion
        assert "wgmma" in ptx and ".s8.s8" in ptx and "0f4B400000" in ptx and "cvt.rzi" not in ptx
        # NaN -> 0 is decided on the value before the clamp: CUDA's min/max return the non-NaN operand, so a test
        # after the clamp would never see a NaN (it would come out as ±127)
        tested = set(re.findall(r"setp\.(?:num|nan)\.f32\s+%p\d+, (%r\d+), \1;", ptx))
        clamped = set(re.findall(r"\bmin\.[\w.]*f32\s+%r\d+, (%r\d+),", ptx))
        assert tested and tested <= clamped, (len(tested), len(tested & clamped))
    else:
        assert "e4m3" in ptx and "cvt.rn.satfinite.e4m3x2.f32" in ptx


@pytest.mark.parametrize("fmt,precise", [("e4m3", False), ("e4m3", True), ("int8", False)])
@pytest.mark.parametrize("ws,sub", [(False, False), (True, True)])
def test_fc2_kernel_compiles_for_hopper(fmt, precise, ws, sub):
    from sd35fp8.kernels.mlp import _fc2_residual
    compile_sm90(_fc2_residual, dict(_gemm_types(fmt), res_ptr="*bf16", gate_ptr="*bf16", out_ptr="*bf16"),
                 dict(NUM_SMS=132, BM=128, BN=256, BK=128, G=8, PER_CHANNEL=fmt == "int8", HAS_BIAS=True,
                      PRECISE=precise, WARP_SPEC=ws, SUBTILE=sub, INT8=fmt == "int8"), num_warps=8)


def _fc1_sass_ops(fmt: str, impl: int) -> tuple[str, int]:
    from sd35fp8.kernels.mlp import _fc1_gelu_q
    types = dict(_gemm_types(fmt, 256), inv_ptr="*fp32")
    consts = dict(NUM_SMS=132, BM=128, BN=256, BK=128, G=8, PER_CHANNEL=fmt == "int8", HAS_BIAS=True, TANH=True,
                  WARP_SPEC=True, SUBTILE=False, INT8=fmt == "int8", IMPL=impl)
    c = _compile_sm90(_fc1_gelu_q, types, consts, num_warps=8, num_stages=4)
    sass = _disassemble(c.asm["cubin"])
    return c.asm["ptx"], sum(1 for line in sass.splitlines() if re.search(r"/\*[0-9a-f]{4,}\*/\s+\S", line))


@pytest.mark.parametrize("fmt", ["e4m3", "int8"])
def test_fc1_epilogue_gelu_variants_compile_to_fewer_instructions(fmt):
    """sd35fp8.kernels.mlp.GELU_IMPL: 1 runs the tanh GELU's exp2 and reciprocal as single ftz MUFU instructions, 2 as
    one tanh.approx; Triton's sigmoid (0) adds denormal fix-ups around both. The epilogue does not overlap the MMAs
    on Hopper, so its instruction count is kernel time: both variants must cut the kernel's machine code by at
    least a quarter (5504 → 3792 / 3392 for E4M3, 7488 → 5184 / 4672 for INT8, compiled with Triton 3.7)."""
    ptx0, n0 = _fc1_sass_ops(fmt, 0)
    ptx1, n1 = _fc1_sass_ops(fmt, 1)
    ptx2, n2 = _fc1_sass_ops(fmt, 2)
    assert "ex2.approx.f32" in ptx0 and "tanh.approx" not in ptx0
    assert "ex2.approx.ftz.f32" in ptx1 and "rcp.approx.ftz.f32" in ptx1 and "ex2.approx.f32" not in ptx1
    assert "tanh.approx.f32" in ptx2 and "ex2.approx" not in ptx2
    assert n1 < 0.75 * n0 and n2 < 0.75 * n0, (n0, n1, n2)


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("res", [False, True])
def test_norm_kernel_compiles_for_hopper(int8, res):
    from sd35fp8.kernels.norm import _ln_mod_q
    ptx = compile_sm90(_ln_mod_q, dict(x_ptr="*bf16", y_ptr="*bf16", g_ptr="*bf16", sh_ptr="*bf16", sc_ptr="*bf16",
                                       inv_ptr="*fp32", xo_ptr="*bf16", h_ptr="*i8" if int8 else "*fp8e4nv",
                                       eps="fp32"),
                       dict(HAS_RES=res, BLOCK=4096, INT8=int8, MIN_SCALE=1e-12), num_warps=8)
    assert ("0f4B400000" in ptx) == int8


def compile_attention(block_n: int, exp: int = 1, split: bool = False, sass: bool = False) -> str:
    """The attention kernel as sd35fp8.kernels.attention.attend launches it (BF16 q, E4M3 K/V, BF16 or split E4M3
    output)."""
    from sd35fp8.kernels.attention import _attn_fwd
    o = "*fp8e4nv" if split else "*bf16"
    return compile_sm90(_attn_fwd, dict(q_ptr="*bf16", k8_ptr="*fp8e4nv", vt8_ptr="*fp8e4nv", ks_ptr="*fp32",
                                        vs_ptr="*fp32", o_ptr=o, o2_ptr=o, inv_ptr="*fp32", inv2_ptr="*fp32",
                                        qk_scale="fp32"),
                        dict(D=64, BLOCK_M=64, BLOCK_N=block_n, WARP_SPEC=False, EXP=exp & 1, SPLIT_FP8=split,
                             PV_IN_MMA=bool(exp & 2)), num_warps=4, num_stages=3, sass=sass,
                        aligned=("S_PAD", "stride_qb", "stride_qs", "stride_ob", "stride_os"))


@pytest.mark.parametrize("exp,block_n", [(0, 64), (1, 64), (2, 64), (3, 64), (1, 128)])
@pytest.mark.parametrize("split", [False, True])
def test_attention_kernel_compiles_for_hopper(exp, block_n, split):
    """Both exp2 forms and both P·V accumulations (by default a fresh MMA per key block added with an FMA, with
    exp mode bit 1 inside the MMA's accumulator), BF16 or split E4M3 output."""
    from sd35fp8.kernels.attention import _quant_kv
    ptx = compile_attention(block_n, exp, split)
    assert "wgmma" in ptx and "e4m3" in ptx and "ex2.approx" in ptx
    assert "cp.async" in ptx and "ld.global.u8" not in ptx  # K/V tiles pipelined, in 16-byte copies
    compile_sm90(_quant_kv, dict(k_ptr="*bf16", v_ptr="*bf16", k8_ptr="*fp8e4nv", vt8_ptr="*fp8e4nv",
                                 ks_ptr="*fp32", vs_ptr="*fp32"), dict(D=64, BLOCK_N=block_n, V_FP8=True),
                 aligned=("S_PAD", "stride_kb", "stride_ks", "stride_vb", "stride_vs"))


@pytest.mark.parametrize("block_n", [64, 128])
def test_attention_promotes_pv_out_of_the_fp8_mma_accumulator(block_n):
    """By default every FP8 MMA chain of the attention loop starts from a zero accumulator (``RZ``): each key
    block's P·V is added to the fp32 accumulator outside the MMA (Hopper's FP8 MMA keeps fewer accumulator bits:
    over 4250 keys that was measurable error on the GPU). Exp mode bit 1 (the old kernel) chains P·V onto the
    running accumulator inside the MMA: the same check sees it."""
    import re

    def chain_starts(in_mma):
        code = compile_attention(block_n, exp=3 if in_mma else 1, sass=True)
        # each MMA chain (one tl.dot: K in steps of 32) opens with WARPGROUP.ARRIVE; its first MMA's accumulator
        # operand is RZ (starts from zero) or a register (adds onto that accumulator)
        starts = re.findall(r"WARPGROUP\.ARRIVE[^;]*;(?:(?!QGMMA).)*?QGMMA\.\S+ R\d+, \S+, gdesc\[\w+\], (\w+)",
                            code, re.S)
        assert starts, "no FP8 MMA in the attention kernel"
        return starts

    assert set(chain_starts(False)) == {"RZ"}
    assert set(chain_starts(True)) != {"RZ"}


@pytest.mark.parametrize("fp8_kv,block_n", [(False, 64), (True, 64), (True, 128)])
def test_joint_prologue_compiles_for_hopper(fp8_kv, block_n):
    from sd35fp8.kernels.joint import _joint_prologue
    kv = "*fp8e4nv" if fp8_kv else "*bf16"
    compile_sm90(_joint_prologue, dict(c_ptr="*bf16", x_ptr="*bf16", wqc_ptr="*bf16", wkc_ptr="*bf16",
                                       wqx_ptr="*bf16", wkx_ptr="*bf16", q_ptr="*bf16", k_ptr=kv, v_ptr=kv,
                                       ks_ptr="*fp32", vs_ptr="*fp32", eps="fp32"),
                 dict(D=64, BLOCK_N=block_n, NORM=True, FP8_KV=fp8_kv))


def compile_gluon_sm90(fn, types: dict, constexprs: dict, num_warps: int, maxnreg=None):
    """A Gluon kernel compiled for sm_90, its arguments as :func:`_signature` takes them (N and K divisible by 16)."""
    from triton.experimental.gluon._runtime import GluonASTSource
    sig, const, attrs = _signature(fn, types, constexprs, tuple(n for n in ("N", "K") if n in types))
    options = {"num_warps": num_warps, **({"maxnreg": maxnreg} if maxnreg else {})}
    return triton.compile(GluonASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs), target=HOPPER,
                          options=options)


@pytest.mark.parametrize("layer", ["fc1", "fc2"])
def test_pingpong_int8_mlp_kernels_compile_async_and_without_spills(layer):
    """The study bench/studies/int8_pingpong's ping-pong INT8 kernels, default configs, at Large's shapes: they compile
    for Hopper with register reallocation between the partitions (setmaxnreg), keep one MMA in flight (a wait for
    <= 1 outstanding wgmma: the point of them, as Triton waits for every int32 MMA) and spill nothing."""
    import torch
    gluon_mod = pytest.importorskip("triton.experimental.gluon")  # noqa: F841
    from bench.studies.int8_pingpong import gluon_int8 as g
    if not g.AVAILABLE:
        pytest.skip("this Triton has no Gluon")
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    bm, bn, bk, grp, stages, split, regs = g.PP_CONFIG_FC1 if layer == "fc1" else g.PP_CONFIG_FC2
    k_dim, n_dim = (2432, 9728) if layer == "fc1" else (9728, 2432)
    x, w = torch.empty(8192, k_dim, dtype=torch.int8), torch.empty(n_dim, k_dim, dtype=torch.int8)
    layout = gl.NVMMASharedLayout.get_default_for
    descs = {"a_desc": TensorDescriptor.from_tensor(x, [bm, bk], layout([bm, bk], gl.int8)),
             "b_desc": TensorDescriptor.from_tensor(w, [bn, bk], layout([bn, bk], gl.int8))}
    scalars = {n: "i32" for n in ("M", "N", "K", "L", "stride_gate")}
    if layer == "fc1":
        fn, ptrs = g.fc1_int8_pingpong, {"sa_ptr": "*fp32", "sb_ptr": "*fp32", "bias_ptr": "*bf16", "inv_ptr": "*fp32",
                                         "out_ptr": "*i8"}
        del scalars["L"], scalars["stride_gate"]
    else:
        fn, ptrs = g.fc2_int8_pingpong, {"sa_ptr": "*fp32", "sb_ptr": "*fp32", "bias_ptr": "*bf16", "res_ptr": "*bf16",
                                         "gate_ptr": "*bf16", "out_ptr": "*bf16"}
    k = compile_gluon_sm90(fn, {**descs, **ptrs, **scalars},
                           dict(NUM_SMS=132, G=grp, STAGES=stages, HAS_BIAS=True, HALVES=split, CONSUMER_REGS=regs),
                           4, g.MAXNREG)
    sass = _disassemble(k.asm["cubin"])
    assert "USETMAXREG" in sass  # setmaxnreg: the loader warp gives its registers to the consumer warpgroups
    assert re.search(r"WARPGROUP\.DEPBAR\.LE gsb0, 0x1", sass), "no wgmma left in flight: the MMAs are synchronous"
    assert not re.search(r"\b(STL|LDL)\b", sass), "the kernel spills to local memory"
