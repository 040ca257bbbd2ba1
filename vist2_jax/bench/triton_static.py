"""Static resource report of the Triton attention kernels, no GPU needed:
``python -m vist2_jax.bench.triton_static [--block 64 128] [--head-dim 128] [--dtype bfloat16]``.

Lowers forward + backward of :mod:`vist2_jax.kernels.pallas_gpu` for ``cuda``, captures
each kernel's Triton IR with its launch parameters (:func:`kernel_ir`, needs only jax),
then compiles it for an NVIDIA arch with the ``triton`` package and reads ptxas' report
(:func:`resources`): registers a thread, spilled bytes and shared memory, hence how many
programs fit on an SM. Needs ``pip install triton`` (its bundled ``ptxas-blackwell``);
the IR of jaxlib's Triton is parsed by the pip one, so versions far apart may disagree.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

# Per SM: registers, shared bytes; and the shared bytes one program may use.
SM = {80: (65536, 164 << 10, 163 << 10), 90: (65536, 228 << 10, 227 << 10)}


def kernel_ir(block: int, head_dim: int, dtype: str, heads=(16, 8)) -> dict:
    """{kernel name: (Triton IR text, num_warps, num_stages)} of forward + backward."""
    import jax
    import jax.numpy as jnp
    from jax import export
    from jax._src.pallas.triton import pallas_call_registration as registration

    from vist2_jax.kernels.attention import block_sparse_visual_first
    from vist2_jax.kernels.mask import RowMeta
    from vist2_jax.kernels.pallas_gpu import gpu_lowering_target

    captured, real = {}, registration.lowering.lower_jaxpr_to_triton_module

    def capture(jaxpr, *args, **kwargs):
        result = real(jaxpr, *args, **kwargs)
        captured[jaxpr.debug_info.func_name] = result.module.operation.get_asm()
        return result

    def loss(q, k, v, meta):
        out = block_sparse_visual_first(q, k, v, meta, impl="pallas_gpu", interpret=False,
                                        block=block)
        return jnp.sum(out.astype(jnp.float32))

    seq, spec = 4 * block, jax.ShapeDtypeStruct
    args = (spec((1, seq, heads[0], head_dim), dtype), spec((1, seq, heads[1], head_dim), dtype),
            spec((1, seq, heads[1], head_dim), dtype),
            RowMeta(spec((1, seq), jnp.int8), *[spec((1, seq), jnp.int32)] * 3))
    registration.lowering.lower_jaxpr_to_triton_module = capture
    try:
        with gpu_lowering_target():
            text = export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=["cuda"],
                                 disabled_checks=[export.DisabledSafetyCheck.custom_call(
                                     "__gpu$xla.gpu.triton")])(*args).mlir_module()
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = real
    launch = re.findall(r'name = "(\w+)", num_stages = (\d+) : i32, num_warps = (\d+) : i32', text)
    return {name: (captured[name], int(warps), int(stages)) for name, stages, warps in launch}


def resources(ir: str, num_warps: int, num_stages: int, arch: int = 90) -> dict:
    """Compile Triton IR for ``sm_{arch}``: registers, spill bytes, shared memory (an
    error past what one program may use) and the programs an SM holds."""
    import triton
    from triton.backends.compiler import GPUTarget

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ttir")
        with open(path, "w") as f:
            f.write(ir)
        kernel = triton.compile(path, target=GPUTarget("cuda", arch, 32),
                                options={"num_warps": num_warps, "num_stages": num_stages})
        with open(os.path.join(tmp, "kernel.ptx"), "w") as f:
            f.write(kernel.asm["ptx"])
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                             "ptxas-blackwell")
        log = subprocess.run([ptxas, "-v", "--gpu-name", f"sm_{arch}a" if arch >= 90 else f"sm_{arch}", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    shared = kernel.metadata.shared
    if shared > SM[arch][2]:
        raise ValueError(f"{shared} B of shared memory; sm_{arch} allows {SM[arch][2]} a program")
    return {"num_warps": num_warps, "num_stages": num_stages, "registers": registers,
            "spill_bytes": int(re.search(r"(\d+) bytes spill stores", log).group(1)),
            "shared_bytes": shared,
            "programs_per_sm": min(SM[arch][0] // (registers * 32 * num_warps),
                                   SM[arch][1] // max(shared, 1))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--arch", type=int, default=90)
    args = parser.parse_args(argv)
    for block in args.block:
        for name, (ir, warps, stages) in sorted(kernel_ir(block, args.head_dim, args.dtype).items()):
            try:
                r = resources(ir, warps, stages, args.arch)
            except ValueError as error:
                print(f"block {block} {name}: {warps} warps, {stages} stages: {error}")
                continue
            print(f"block {block} {name}: {warps} warps, {stages} stages, {r['registers']} "
                  f"registers, {r['spill_bytes']} B spilled, {r['shared_bytes'] >> 10} KiB shared, "
                  f"{r['programs_per_sm']} programs / SM")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
