"""One command for a CUDA machine: the GPU paths' tests, every Triton kernel against the fp64 oracle
on the GPU, and the profile of the ResNet-50 and transformer presets; one JSON and one log.

    python benchmarks/gpu_check.py OUT_DIR [--budget-s 480] [--dry-run]

Writes ``OUT_DIR/gpu_check.json`` (schema ``normbench.gpu_check/1``: the environment and one
entry per step with its status, seconds and details; the profile results files beside it) and
``OUT_DIR/gpu_check.log`` (everything the steps printed). Steps, in order, each skipped with a
reason once the time budget (default 8 minutes) is spent:

1. ``pytest -m gpu``: the GPU-marked tests.
2. ``kernels``: every Triton kernel, batch-norm (every p and k, fp32/bf16/fp16/fp64, contiguous and
   channels_last) and rows (layer-norm, RMS-norm and group-norm, every p and k, every dtype, rows
   of 1, 3, 1000 and 16385 values, tied integer input), forward and backward, against
   tests/oracle.py in float64, each with its normwise relative errors and tolerance.
3. ``profile``: ``normbench profile --device cuda --impl torch,fused`` on ``--preset
   resnet50-b256`` and ``--preset transformer`` (``fwd,bwd``; ratios against torch and the copy
   bandwidth in the results files).

``--dry-run`` runs the same steps on the CPU with the Triton kernels under ``TRITON_INTERPRET=1``,
on small shapes and a ``--quick``-sized profile: CI runs it so that the script is known to start
and to write what it should (tests/benchmarks/test_gpu_check.py). It claims no GPU number.
Exit code 0 when every step that ran passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOL = {"fp64": 1e-9, "fp32": 2e-5, "bf16": 3e-2, "fp16": 5e-3}


class Log:
    """Everything printed goes to the terminal and to the log file."""

    def __init__(self, path: Path) -> None:
        self.file = path.open("w")

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        self.file.write(text + "\n")
        self.file.flush()


def _run(cmd: list[str], log: Log, timeout: float, env: dict | None = None) -> tuple[int, str]:
    log(f"$ {' '.join(cmd)}")
    try:
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(1.0, timeout))
        text, rc = out.stdout + out.stderr, out.returncode
    except subprocess.TimeoutExpired as exc:
        text, rc = f"{exc.stdout or ''}{exc.stderr or ''}\ntimed out after {timeout:.0f} s", 124
    for line in text.splitlines():
        log(f"  {line}")
    return rc, text


def step_pytest(dry: bool, log: Log, budget: float) -> dict:
    """The GPU-marked tests (dry run: collected only, as on a machine without a GPU they skip)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"] + (["--co"] if dry else [])
    rc, text = _run(cmd, log, budget)
    tail = text.strip().splitlines()[-1] if text.strip() else ""
    return {"status": "ok" if rc in (0, 5) else "failed", "returncode": rc, "summary": tail}


def _rel(got, want) -> float:
    got, want = got.double(), want.double()
    scale = want.norm().item()
    return (got - want).norm().item() / (scale if scale > 0 else 1.0)


def _kernel_cases(dry: bool):
    """(family, p, k, dtype name, shape, layout, input kind) for every Triton kernel check."""
    pk = [(2.0, None), (1.0, None), (math.inf, None), (math.inf, 3), (math.inf, 40)]
    dtypes = ["fp32", "bf16", "fp16", "fp64"]
    bn_shapes = [((4, 3, 5, 6), "contiguous"), ((4, 3, 5, 6), "channels_last")]
    if not dry:
        bn_shapes += [((6, 5), "contiguous"), ((32, 64, 28, 28), "contiguous"), ((32, 64, 28, 28), "channels_last")]
    rows = [1, 3, 100] if dry else [1, 3, 1000, 16385]
    for p, k in pk:
        for dt in dtypes:
            for shape, layout in bn_shapes:
                if math.prod(shape) // shape[1] >= (k or 1):
                    yield ("batchnorm", p, k, dt, shape, layout, "gaussian")
            for family in ("layernorm", "rmsnorm"):
                for n in rows:  # a row of 1: D is about sqrt(eps), dx all cancellation; fp64 only
                    if n >= (k or 1) and (n > 1 or dt == "fp64"):
                        yield (family, p, k, dt, (4 if dry else 64, n), "contiguous", "gaussian")
                yield (family, p, k, dt, (8, 64), "contiguous", "integers")
            yield ("groupnorm", p, k, dt, (3, 6, 4, 5), "contiguous", "gaussian")
            yield ("groupnorm", p, k, dt, (3, 6, 4, 5), "channels_last", "gaussian")


def _check_case(case, device: str) -> dict:
    import torch

    import oracle
    from normbench.kernels import fused
    from normbench.nn import LpBatchNorm2d, LpBatchNorm1d, LpGroupNorm, LpLayerNorm, LpRMSNorm

    family, p, k, dt, shape, layout, kind = case
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}[dt]
    g = torch.Generator().manual_seed(0)
    if kind == "integers":
        x = torch.randint(-3, 4, shape, generator=g).double()
    else:
        x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5
    gy = torch.randn(shape, generator=g, dtype=torch.float64)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    xd = x.to(dtype).contiguous(memory_format=fmt)
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    if family == "batchnorm":
        m = (LpBatchNorm2d if len(shape) == 4 else LpBatchNorm1d)(shape[1], p=p, k=k, impl="fused")
    elif family == "layernorm":
        m = LpLayerNorm(shape[-1], p=p, k=k, impl="fused")
    elif family == "rmsnorm":
        m = LpRMSNorm(shape[-1], p=p, k=k, eps=1e-6, impl="fused")
    else:
        m = LpGroupNorm(3, shape[1], p=p, k=k, impl="fused")
    m = m.to(device=device, dtype=param_dtype)
    with torch.no_grad():
        for prm in m.parameters():
            prm.copy_(torch.rand(prm.shape, generator=g, dtype=torch.float64) + 0.5)
    params = list(m.parameters())
    xg = xd.to(device).requires_grad_()
    fused.set_backend("triton")
    try:
        y = m(xg)
        grads = torch.autograd.grad(y, [xg, *params], gy.to(dtype).to(device))
    finally:
        fused.set_backend("auto")
    xr = xd.double().requires_grad_()
    leaves = [xr] + [prm.detach().double().cpu().requires_grad_() for prm in params]
    w = leaves[1]
    b = leaves[2] if len(leaves) > 2 else None
    if family == "batchnorm":
        ref = oracle.batch_norm(xr, w, b, p, k)
    elif family == "layernorm":
        ref = oracle.layer_norm(xr, 1, w, b, p, k)
    elif family == "rmsnorm":
        ref = oracle.layer_norm(xr, 1, w, None, p, k, eps=1e-6, center=False)
    else:
        ref = oracle.group_norm(xr, 3, w, b, p, k)
    want = torch.autograd.grad(ref, leaves, gy.to(dtype).double())
    errors = {"y": _rel(y.cpu(), ref)}
    for name, got, exp in zip(["dx", "dweight", "dbias"], grads, want):
        errors[name] = _rel(got.cpu(), exp)
    worst = max(errors.values())
    return {"errors": errors, "tolerance": TOL[dt], "ok": bool(worst < TOL[dt]) and y.dtype == dtype}


def step_kernels(dry: bool, log: Log, budget: float, device: str) -> dict:
    """Every Triton kernel against the fp64 oracle."""
    sys.path.insert(0, str(ROOT / "tests"))
    from normbench.kernels import fused

    fused.set_compile(False)  # top-k batch-norm statistics run as torch stages: eager, no compile time
    start = time.perf_counter()
    results, failed, skipped = [], 0, 0
    for case in _kernel_cases(dry):
        family, p, k, dt, shape, layout, kind = case
        name = f"{family} p={p:g}{'' if k is None else f' k={k}'} {dt} {'x'.join(map(str, shape))} {layout} {kind}"
        if time.perf_counter() - start > budget:
            skipped += 1
            results.append({"case": name, "status": "skipped", "reason": "time budget spent"})
            continue
        try:
            r = _check_case(case, device)
            status = "ok" if r["ok"] else "failed"
        except Exception as exc:  # noqa: BLE001 - one failing case must not end the check
            r, status = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc(limit=3)}, "error"
        failed += status != "ok"
        results.append({"case": name, "status": status, **r})
        errs = r.get("errors")
        log(f"  {status:<7} {name}" + ("" if not errs else "  " + " ".join(f"{n} {e:.1e}" for n, e in errs.items())))
        if status == "error":
            log(f"          {r['error']}")
    log(f"kernels: {len(results) - failed - skipped} ok, {failed} failed, {skipped} skipped")
    return {"status": "ok" if failed == 0 else "failed", "cases": results,
            "passed": len(results) - failed - skipped, "failed": failed, "skipped": skipped}


def step_profile(dry: bool, log: Log, budget: float, out: Path, device: str) -> dict:
    """``normbench profile`` with torch and fused on the ResNet-50 (batch 256) and transformer presets."""
    runs = {}
    start = time.perf_counter()
    jobs = [("resnet50-b256", ["--preset", "resnet50-b256"]), ("transformer", ["--preset", "transformer"])]
    if dry:  # the same command on shapes the CPU takes in seconds
        jobs = [("resnet50-b256", ["--quick", "--shape", "4x8x6x6", "--norm", "l2,l1"]),
                ("transformer", ["--quick", "--shape", "16x64", "--norm", "layernorm,l1-rmsnorm"])]
    status = "ok"
    for name, extra in jobs:
        left = budget - (time.perf_counter() - start)
        if left <= 5:
            runs[name] = {"status": "skipped", "reason": "time budget spent"}
            continue
        path = out / f"profile-{name}.json"
        cmd = [sys.executable, "-m", "normbench", "profile", "--device", device, "--impl", "torch,fused",
               "--pass", "fwd,bwd", "--no-memory", "--quiet", "--force", "--output", str(path), *extra]
        rc, text = _run(cmd, log, left)
        runs[name] = {"status": "ok" if rc == 0 else "failed", "returncode": rc, "results": path.name}
        status = status if rc == 0 else "failed"
    return {"status": status, "runs": runs}


def environment(device: str, dry: bool) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "device": device, "dry_run": dry,
           "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join([sys.executable, *sys.argv])}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    env["triton_interpret"] = os.environ.get("TRITON_INTERPRET")
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--budget-s", type=float, default=480.0, help="seconds for all steps (default 8 minutes)")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, Triton under TRITON_INTERPRET=1, small shapes")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    os.environ.setdefault("NORMBENCH_KERNEL_COMPILE", "wait")
    import torch

    device = "cpu" if args.dry_run else "cuda"
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; --dry-run runs the same steps on the CPU", file=sys.stderr)
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    log = Log(args.out_dir / "gpu_check.log")
    start = time.perf_counter()
    report = {"schema": "normbench.gpu_check/1", "environment": environment(device, args.dry_run), "steps": {}}
    log(f"gpu_check on {report['environment'].get('gpu', 'the CPU (dry run)')}, budget {args.budget_s:.0f} s")
    # shares of the budget: tests a fifth, kernels two fifths, profile what is left
    plan = [("pytest", 0.2, lambda b: step_pytest(args.dry_run, log, b)),
            ("kernels", 0.4, lambda b: step_kernels(args.dry_run, log, b, device)),
            ("profile", 1.0, lambda b: step_profile(args.dry_run, log, b, args.out_dir, device))]
    for name, share, fn in plan:
        left = args.budget_s - (time.perf_counter() - start)
        log(f"\n== {name} ({left:.0f} s left)")
        t0 = time.perf_counter()
        if left <= 5:
            result = {"status": "skipped", "reason": "time budget spent"}
        else:
            try:
                result = fn(left * share if share < 1 else left)
            except Exception as exc:  # noqa: BLE001 - the report must be written
                result = {"status": "error", "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
                log(result["trace"])
        result["seconds"] = round(time.perf_counter() - t0, 2)
        report["steps"][name] = result
        log(f"{name}: {result['status']} in {result['seconds']:.1f} s")
    report["seconds"] = round(time.perf_counter() - start, 2)
    (args.out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1))
    ok = all(s["status"] in ("ok", "skipped") for s in report["steps"].values())
    log(f"\ngpu_check: {'every step passed' if ok else 'FAILED'} in {report['seconds']:.0f} s; "
        f"{args.out_dir / 'gpu_check.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
