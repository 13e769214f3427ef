"""Ahead-of-time compilation of every kernel variant the dispatch can launch, for real GPUs, on a
machine without one: Triton compiles to PTX and the ptxas it ships turns that into a cubin.

What is compiled is each kernel module's `launch_space()`: the real launch builders applied to
meta tensors of every dtype and option the dispatch accepts. Each `Launch` goes through the same
steps as `JITFunction.run` (Triton's binder turns the arguments into a signature, constexprs and
specialisation attributes; `triton.compile` builds the cubin), only with the backend of a chosen
target (sm_80 = A100, sm_90 = H100/H200) instead of the local driver's.

Triton specialises pointers and integers on divisibility by 16 (alignment); that changes the code
(vector width), not the types. Every variant is compiled in two regimes, the extremes of that:
  aligned    every pointer and every specialisable integer divisible by 16 (what training sizes
             such as 1x32x32 and 1x64x64 images with freshly allocated tensors get)
  unaligned  no divisibility known (odd sizes, offset views)
Launches that mix the two take hints from both; they are not compiled separately.

The compiler runs in a subprocess with TRITON_INTERPRET unset (under the interpreter, @triton.jit
returns interpreter objects, Triton's own library functions included) and a fresh cache directory,
so every call really compiles. `python -m kernels.aot --arch 80 --arch 90 --out r.json` is that
subprocess; `compile_all()` runs it and returns one record per (kernel, variant, regime, arch).
The binder/attribute plumbing uses Triton internals (triton.runtime.jit), checked against the
installed Triton (3.8).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kernels.backend import Launch

REGIMES = ("aligned", "unaligned")
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Arch:
    """Per-block limits of one compute capability (CUDA C Programming Guide, Technical Specifications)."""
    name: str
    max_shared_bytes: int       # dynamic + static shared memory per block (opt-in maximum)
    max_regs_per_block: int
    max_regs_per_thread: int
    reg_alloc_unit: int = 256   # registers are allocated per warp in units of this many


ARCHS = {80: Arch("A100 (sm_80)", 163 * 1024, 65536, 255),
         90: Arch("H100/H200 (sm_90)", 227 * 1024, 65536, 255)}


def launch_spaces() -> dict[str, list[Launch]]:
    """Kernel name -> every launch the dispatch can make with it."""
    from kernels import dp_clip, guided_step, noising
    spaces: dict[str, list[Launch]] = {}
    for module in (noising, guided_step, dp_clip):
        for launch in module.launch_space():
            spaces.setdefault(kernel_name(launch), []).append(launch)
    return spaces


def kernel_name(launch: Launch) -> str:
    return launch.kernel.fn.__name__


def _annotation(param) -> str:
    from triton.runtime.jit import _normalize_ty
    a = param.annotation
    return "" if a is param.empty else _normalize_ty(a)


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def variant_key(launch: Launch) -> tuple:
    """What selects a compiled variant, alignment hints aside: the type of each runtime argument
    (pointer element dtype; the declared type of a typed integer; for an untyped integer its width,
    or 1, which Triton makes a constant), the constexpr values and num_warps."""
    import inspect
    params = list(inspect.signature(launch.kernel.fn).parameters.values())
    types = []
    for param, arg in zip(params, launch.args):
        ann = _annotation(param)
        if isinstance(arg, torch.Tensor):
            types.append((param.name, "*" + _dtype_name(arg.dtype)))
        elif isinstance(arg, bool) or not isinstance(arg, int):
            types.append((param.name, type(arg).__name__))
        elif ann:
            types.append((param.name, ann))
        else:
            types.append((param.name, "1" if arg == 1 else ("i32" if -2**31 <= arg < 2**31 else "i64")))
    return (kernel_name(launch), tuple(types), tuple(sorted(launch.constexprs.items())), launch.num_warps)


def variant_label(launch: Launch, varying: set[str]) -> str:
    """Short label: the pointer dtypes that vary within the kernel's launch space, the constexprs
    (BLOCK* sizes as numbers, flags as 0/1) and any unit stride."""
    _, types, constexprs, _ = variant_key(launch)
    parts = [f"{n.removesuffix('_ptr')}={t[1:]}" for n, t in types if n in varying and t.startswith("*")]
    parts += [f"{n}={int(v)}" for n, v in constexprs]
    parts += [f"{n}=1" for n, t in types if t == "1"]
    return " ".join(parts)


def varying_pointers(launches: list[Launch]) -> set[str]:
    seen: dict[str, set[str]] = {}
    for launch in launches:
        for name, t in variant_key(launch)[1]:
            if t.startswith("*"):
                seen.setdefault(name, set()).add(t)
    return {name for name, ts in seen.items() if len(ts) > 1}


# ----------------------------------------------------------------------------- compile (subprocess side)

def _compile_one(launch: Launch, capability: int, regime: str):
    """Compile one launch for sm_<capability> exactly as JITFunction.run would, with the alignment
    attributes of `regime`; returns Triton's CompiledKernel and the ptxas log."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    jit = launch.kernel
    if not isinstance(jit, JITFunction):
        raise RuntimeError(f"{kernel_name(launch)} is a {type(jit).__name__}, not a JITFunction: "
                           "AOT compilation needs TRITON_INTERPRET unset before triton's import")
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    kwargs = dict(launch.constexprs, num_warps=launch.num_warps)
    kwargs["debug"] = jit.debug or knobs.runtime.debug                  # as JITFunction.run sets them
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
    if regime == "aligned":
        attrs = {(i,): backend.parse_attr("D") for i, (param, (ty, _)) in enumerate(zip(jit.params, specialization))
                 if (ty.startswith("*") or ty[0] in "iu") and not param.do_not_specialize}
    else:
        attrs = {}
    log = io.StringIO()
    with contextlib.redirect_stdout(log):       # TRITON_DUMP_PTXAS_LOG prints ptxas -v here
        kernel = triton.compile(ASTSource(jit, signature, constexprs, attrs), target=target,
                                options=options.__dict__)
    return kernel, log.getvalue()


def _resources(kernel, ptxas_log: str) -> dict:
    """Registers, local memory, stack and static shared memory from `cuobjdump --dump-resource-usage`
    on the cubin; spill bytes from the ptxas log; dynamic shared memory from Triton's metadata."""
    from triton import knobs
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        dump = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                              capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in dump.splitlines() if "REG:" in ln)
    usage = {k: int(v) for k, v in re.findall(r"([A-Z]+)(?:\[\d+\])?:(\d+)", line)}
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log)
    if spills is None:
        raise RuntimeError(f"no spill line in the ptxas log:\n{ptxas_log[-2000:]}")
    return dict(registers=usage["REG"], stack=usage["STACK"], local=usage["LOCAL"], static_shared=usage["SHARED"],
                dynamic_shared=int(kernel.metadata.shared), spill_stores=int(spills.group(1)),
                spill_loads=int(spills.group(2)), num_warps=int(kernel.metadata.num_warps))


def _compile_records(capabilities: list[int], shard: int, n_shards: int) -> list[dict]:
    records = []
    jobs = [(name, i, launch, varying_pointers(launches))
            for name, launches in launch_spaces().items() for i, launch in enumerate(launches)]
    jobs = [(name, i, launch, varying, cap, regime) for name, i, launch, varying in jobs
            for cap in capabilities for regime in REGIMES]
    for name, i, launch, varying, cap, regime in jobs[shard::n_shards]:
        rec = dict(kernel=name, index=i, variant=variant_label(launch, varying), arch=cap, regime=regime)
        start = time.perf_counter()
        log = ""
        try:
            kernel, log = _compile_one(launch, cap, regime)
            rec.update(_resources(kernel, log), ok=True)
        except Exception as e:  # reported per variant; the caller fails with kernel, variant and message
            rec.update(ok=False, error=f"{type(e).__name__}: {e}\n{log[-3000:]}".strip())
        rec["seconds"] = round(time.perf_counter() - start, 3)
        records.append(rec)
    return records


# ----------------------------------------------------------------------------- caller side

def compile_all(capabilities=tuple(ARCHS), workers: int = 2, timeout: float = 1800) -> list[dict]:
    """Compile every (kernel, variant, regime) for each capability in `workers` clean subprocesses;
    one record per compile: kernel, variant, arch, regime, ok / error, resources, seconds."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(_PACKAGE_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["TRITON_DUMP_PTXAS_LOG"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="memdiff_aot_") as tmp:
        procs = []
        for shard in range(workers):
            out = Path(tmp) / f"shard{shard}.json"
            cmd = [sys.executable, "-m", "kernels.aot", "--out", str(out), "--shard", str(shard), "--shards", str(workers)]
            cmd += [a for c in capabilities for a in ("--arch", str(c))]
            shard_env = dict(env, TRITON_CACHE_DIR=str(Path(tmp) / f"cache{shard}"))
            procs.append((subprocess.Popen(cmd, env=shard_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                           text=True), out))
        records = []
        deadline = time.monotonic() + timeout
        for proc, out in procs:
            try:
                output, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for p, _ in procs:
                    p.kill()
                raise RuntimeError(f"kernels.aot: compiling did not finish within {timeout:.0f} s")
            if proc.returncode != 0:
                raise RuntimeError(f"kernels.aot subprocess failed (exit {proc.returncode}):\n{output[-4000:]}")
            records += json.loads(out.read_text())
    return sorted(records, key=lambda r: (r["kernel"], r["index"], r["arch"], r["regime"]))


def limit_violations(rec: dict) -> list[str]:
    """Why a compiled variant cannot run well on its architecture (spills, shared memory, registers)."""
    arch = ARCHS[rec["arch"]]
    problems = []
    if rec["spill_stores"] or rec["spill_loads"] or rec["local"]:
        problems.append(f"spills registers ({rec['spill_stores']} B stores, {rec['spill_loads']} B loads, "
                        f"{rec['local']} B local memory)")
    shared = rec["static_shared"] + rec["dynamic_shared"]
    if shared > arch.max_shared_bytes:
        problems.append(f"shared memory {shared} B > {arch.max_shared_bytes} B on {arch.name}")
    per_warp = -(-rec["registers"] * 32 // arch.reg_alloc_unit) * arch.reg_alloc_unit
    if per_warp * rec["num_warps"] > arch.max_regs_per_block:
        problems.append(f"{rec['registers']} registers x {rec['num_warps']} warps ({per_warp} per warp) "
                        f"> {arch.max_regs_per_block} registers per block")
    return problems


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, action="append", required=True, choices=sorted(ARCHS))
    ap.add_argument("--out", required=True)
    ap.add_argument("--shard", type=int, default=0)
    ap.add_argument("--shards", type=int, default=1)
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("kernels.aot: TRITON_INTERPRET is set; AOT compilation needs the real compiler")
    Path(args.out).write_text(json.dumps(_compile_records(args.arch, args.shard, args.shards)))


if __name__ == "__main__":
    main()
