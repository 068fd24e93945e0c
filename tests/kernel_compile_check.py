"""Compile every Triton kernel ahead of time for an sm_90 GPU, without a GPU.

Triton's wheel ships ``ptxas``, so ``triton.compile`` lowers a kernel to a cubin on any
machine; this catches what the interpreter (``TRITON_INTERPRET=1``, where the CPU tests run)
never checks: type unification across branches, ``tl.dot`` shape rules, shared-memory use
beyond the sm_90 limit. Run by ``tests/test_kernels_compile.py`` in a subprocess with
``TRITON_INTERPRET=0`` (kernels imported under the interpreter cannot be compiled).

Usage: TRITON_INTERPRET=0 python tests/kernel_compile_check.py [bf16 fp16 fp32]
"""

from __future__ import annotations

import sys
from typing import Dict, Iterator, Tuple

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from nemo_dmc.kernels import cache_update, decode_attention, dmc_attention, partial_accumulation

TARGET = GPUTarget("cuda", 90, 32)
SM90_SHARED_BYTES = 227 * 1024
FLOAT_ARGS = {"scale", "init_offset"}

Case = Tuple[str, object, Dict[str, str], Dict[str, object]]


def signature(kernel, pointers: Dict[str, str], constexprs: Dict[str, object]) -> Dict[str, str]:
    """Triton signature: constexprs, the given pointer types, fp32 scalars, i32 otherwise."""
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        else:
            sig[name] = "fp32" if name in FLOAT_ARGS else "i32"
    return sig


def aligned(kernel, sig: Dict[str, str]) -> Dict[tuple, list]:
    """The launcher's specialisation at production sizes: every pointer 16-byte aligned and
    every integer argument (lengths, head dims) a multiple of 16. Layouts then vectorise,
    which is where Triton 3.6 failed to lower a scan of ``_scan_fwd`` on an H100 while the
    unspecialised compile passed."""
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
            if sig[name].startswith("*") or sig[name] == "i32"}


def cases(dt: str) -> Iterator[Case]:
    """Each kernel at the meta-parameters its wrapper launches (head dims 64 and 128)."""
    precision = "ieee" if dt == "fp32" else "tf32"
    decode = dict(q_ptr=f"*{dt}", k_pool=f"*{dt}", v_pool=f"*{dt}", table_ptr="*i64",
                  len_ptr="*i64", m_ptr="*fp32", l_ptr="*fp32", acc_ptr="*fp32", out_ptr=f"*{dt}")
    for groups in (1, 4, 8):
        yield (f"decode partial g={groups}", decode_attention._partial_kernel, decode,
               dict(D=128, BLOCK_D=128, G=groups, BLOCK_G=max(16, triton.next_power_of_2(groups)),
                    BS=16, BLOCK_N=64, PRECISION=precision, DOT_FP32=False))
    yield ("decode combine", decode_attention._combine_kernel, decode,
           dict(D=128, BLOCK_D=128, BLOCK_S=4))
    update = dict(q_ptr=f"*{dt}", k_ptr=f"*{dt}", v_ptr=f"*{dt}", pos_ptr="*i64",
                  rows_ptr="*i64", runs_ptr="*fp32", ring_ptr="*i64", len_ptr="*i64",
                  table_ptr="*i64", k_pool=f"*{dt}", v_pool=f"*{dt}", free_ptr="*i64",
                  taken_ptr="*i32", cos_ptr="*fp32", sin_ptr="*fp32", mate_ptr="*i64",
                  sig_ptr=f"*{dt}")
    for window in (12, None):
        entries = 1 if window is None else window
        meta = dict(D=128, BLOCK_D=128, G=4, BLOCK_G=4, R=entries,
                    BLOCK_R=triton.next_power_of_2(entries), WINDOWED=window is not None,
                    FORCE=-1, BS=16, ADAPTER=False)
        yield f"cache update window={window}", cache_update._update_kernel, update, meta
    yield ("cache update int32 free ids", cache_update._update_kernel,
           dict(update, free_ptr="*i32"), meta)
    yield ("cache update adapter signals", cache_update._update_kernel, update,
           dict(meta, ADAPTER=True))
    scan = dict(x_ptr=f"*{dt}", alpha_ptr="*fp32", omega_ptr="*fp32", out_ptr=f"*{dt}",
                dstate_ptr="*fp32", grad_ptr=f"*{dt}", dx_ptr=f"*{dt}", dalpha_ptr="*fp32",
                domega_ptr="*fp32", weight_ptr="*fp32", carry_ptr="*fp32", dz_ptr="*fp32")
    for name in ("_windowed_fwd", "_windowed_state_grad", "_windowed_bwd"):
        yield (f"accumulation {name}", getattr(partial_accumulation, name), scan,
               dict(BLOCK_S=64, BLOCK_D=64, WINDOW=12))
    for name in ("_scan_fwd", "_scan_state_grad", "_scan_bwd"):
        yield (f"accumulation {name}", getattr(partial_accumulation, name), scan,
               dict(BLOCK_S=64, BLOCK_D=64))
    attn = dict(q_ptr=f"*{dt}", k_ptr=f"*{dt}", v_ptr=f"*{dt}", bias_ptr="*fp32",
                o_ptr=f"*{dt}", lse_ptr="*fp32", do_ptr=f"*{dt}", delta_ptr="*fp32",
                dk_ptr=f"*{dt}", dv_ptr=f"*{dt}", dbias_ptr="*fp32", dq_ptr=f"*{dt}")
    for dim in (64, 128):
        meta = dict(BLOCK_D=dim, PRECISION=precision)
        yield f"attention fwd d={dim}", dmc_attention._attn_fwd, attn, dict(meta, BLOCK_M=64, BLOCK_N=64)
        yield (f"attention bwd_kv d={dim}", dmc_attention._attn_bwd_kv, attn,
               dict(meta, BLOCK_M=32, BLOCK_N=64))
        yield (f"attention bwd_q d={dim}", dmc_attention._attn_bwd_q, attn,
               dict(meta, BLOCK_M=64, BLOCK_N=32))


def main(dtypes) -> int:
    failures = 0
    for dt in dtypes:
        for label, kernel, pointers, constexprs in cases(dt):
            sig = signature(kernel, pointers, constexprs)
            try:
                compiled = triton.compile(
                    ASTSource(fn=kernel, signature=sig, constexprs=constexprs,
                              attrs=aligned(kernel, sig)), target=TARGET)
                shared = compiled.metadata.shared
                ok = shared <= SM90_SHARED_BYTES
                print(f"{'OK' if ok else 'FAIL'} {dt} {label}: shared memory {shared} B")
            except Exception as err:  # report every kernel, then fail
                ok = False
                print(f"FAIL {dt} {label}: {type(err).__name__}: {str(err).strip()[-600:]}")
            failures += not ok
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["bf16", "fp32"]))
