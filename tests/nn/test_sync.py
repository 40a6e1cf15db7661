"""SyncLpBatchNorm across 2 and 3 processes (gloo on the CPU, loopback) against LpBatchNorm on the
concatenated batch and the fp64 oracle: outputs, input / weight / bias gradients, running
statistics, the collectives made, for every p and k, unequal and empty per-rank batches, tied
values, channels_last, 2-D to 5-D input, eval mode, DistributedDataParallel, torch.compile, and a
hung collective that must time out.

One process group per world size for the whole module: this file is also the worker script
(``python test_sync.py RANK WORLD PORT OUT``); each worker runs every case of :func:`cases` and
writes what failed to ``OUT``, and the tests read it. Subprocesses (not multiprocessing) because
pytest imports this file in a way a spawned child could not re-import; every wait has a timeout
(the collectives' own, ``init_process_group(timeout=)``, and the parent's on the processes).
"""

from __future__ import annotations

import copy
import json
import math
import os
import socket
import subprocess
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # oracle, when run as a worker script

import oracle  # noqa: E402
from normbench.nn import LpBatchNorm1d, LpBatchNorm2d, LpBatchNorm3d, SyncLpBatchNorm  # noqa: E402
from normbench.nn.sync import collectives  # noqa: E402

WORLDS = (2, 3)
COLLECTIVE_TIMEOUT_S = 60  # a hung collective raises on its rank after this (ranks may compile for seconds)
WORKERS_TIMEOUT_S = 240  # the parent kills the workers after this (a missing rank, a deadlock)
HANG_TIMEOUT_S = 4  # the deliberately hung collective's group (it also bounds the group's creation)
PK = [(2.0, None), (1.0, None), (math.inf, None), (math.inf, 3), (math.inf, "big")]
PK_IDS = ["l2", "l1", "linf", "top3", "topbig"]
SHAPES = {"2d": (3,), "3d": (3, 4), "4dcl": (3, 3, 2), "5dcl": (3, 2, 2, 2)}
# one global batch size per world (the constants for small n are computed once per n)
SPLITS = {
    2: {"equal": [3, 3], "unequal": [1, 5], "empty": [0, 6]},
    3: {"equal": [3, 3, 3], "unequal": [1, 5, 3], "empty": [4, 0, 5]},
}
REF_MODULE = {2: LpBatchNorm1d, 3: LpBatchNorm1d, 4: LpBatchNorm2d, 5: LpBatchNorm3d}
WEIGHT, BIAS = [0.5, 1.5, -2.0], [0.1, -0.3, 2.0]


def cases(world: int) -> list[str]:
    """Every case name the workers of this world size run (and the tests expect)."""
    names = [f"{pk}-{shape}-{split}-{data}"
             for pk in PK_IDS for shape in SHAPES for split in SPLITS[world] for data in ("gauss", "tied")
             if data == "gauss" or shape == "3d"]
    return names + ["options", "float32", "collectives", "eval", "k-too-large", "ddp", "sharded-training", "compile",
                    "gradcheck", "hang-times-out"]


# ---------------------------------------------------------------- worker side


class _Counter:
    """Counts the collectives made through torch.distributed's all_gather and all_reduce."""

    def __init__(self, dist) -> None:
        self.calls: list[str] = []
        for op in ("all_gather", "all_reduce"):
            original = getattr(dist, op)
            setattr(dist, op, self._wrap(op, original))

    def _wrap(self, op, original):
        def counted(*args, **kwargs):
            self.calls.append(op)
            return original(*args, **kwargs)
        return counted


def _global_batch(case_seed: int, shape: tuple[int, ...], total: int, tied: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(case_seed)
    if tied:  # few distinct values: ties at the maximum and at the k-th largest, across ranks
        return torch.randint(-2, 3, (total, *shape), generator=g).double()
    return torch.randn((total, *shape), generator=g, dtype=torch.float64) * 3 + 1


def _layers(p, k, ndim, group=None):
    ref = REF_MODULE[ndim](3, p=p, k=k, impl="eager").double()
    sync = SyncLpBatchNorm(3, p=p, k=k, process_group=group).double()
    with torch.no_grad():
        for m in (ref, sync):
            m.weight.copy_(torch.tensor(WEIGHT))
            m.bias.copy_(torch.tensor(BIAS))
    return ref, sync


def _fmt(ndim):
    return {4: torch.channels_last, 5: torch.channels_last_3d}.get(ndim, torch.contiguous_format)


def _check_against_concatenated(dist, rank, world, name: str) -> None:
    pk_id, shape_id, split_id, data = name.split("-")
    p, k = PK[PK_IDS.index(pk_id)]
    shape, sizes = SHAPES[shape_id], SPLITS[world][split_id]
    total, start = sum(sizes), sum(sizes[:rank])
    ndim = len(shape) + 1
    n_global = total * math.prod(shape[1:])
    if k == "big":  # larger than every rank's count: the all-values path and the global tie rule
        k = n_global - 1
    seed = sum(map(ord, name))  # the same on every rank (str hashes are salted per process)
    ref, sync = _layers(p, k, ndim)
    for step in range(2):  # two steps: the running statistics' momentum too
        x_all = _global_batch(seed + step, shape, total, data == "tied").contiguous(memory_format=_fmt(ndim))
        gy_all = _global_batch(seed + 100 + step, shape, total, False)
        xr = x_all.clone().requires_grad_()
        y_ref = ref(xr)
        y_ref.backward(gy_all)
        x = x_all[start:start + sizes[rank]].clone().requires_grad_()
        sync.weight.grad = sync.bias.grad = None
        y = sync(x)
        assert y.shape == x.shape and y.is_contiguous(memory_format=_fmt(ndim)) or x.numel() == 0
        y.backward(gy_all[start:start + sizes[rank]])
        torch.testing.assert_close(y, y_ref[start:start + sizes[rank]], msg=lambda m: f"output: {m}")
        torch.testing.assert_close(x.grad, xr.grad[start:start + sizes[rank]], msg=lambda m: f"input grad: {m}")
        if step == 0:  # the oracle: output and running statistics, independently of LpBatchNorm
            w, b = torch.tensor(WEIGHT, dtype=torch.float64), torch.tensor(BIAS, dtype=torch.float64)
            torch.testing.assert_close(y, oracle.batch_norm(x_all, w, b, p, k)[start:start + sizes[rank]])
            mean, var = oracle.batch_norm_statistics(x_all, p, k)
            torch.testing.assert_close(sync.running_mean, 0.1 * mean, msg=lambda m: f"running_mean: {m}")
            torch.testing.assert_close(sync.running_var, 0.9 + 0.1 * var, msg=lambda m: f"running_var: {m}")
        grads = torch.stack([sync.weight.grad, sync.bias.grad])
        dist.all_reduce(grads)  # what DDP does with them (it averages: the rank losses' sum here)
        torch.testing.assert_close(grads[0], ref.weight.grad, msg=lambda m: f"weight grad: {m}")
        torch.testing.assert_close(grads[1], ref.bias.grad, msg=lambda m: f"bias grad: {m}")
        ref.weight.grad = ref.bias.grad = None
    torch.testing.assert_close(sync.running_mean, ref.running_mean)
    torch.testing.assert_close(sync.running_var, ref.running_var)
    assert int(sync.num_batches_tracked) == 2


def _check_options(dist, rank, world) -> None:
    """momentum=None (the cumulative average), affine=False, track_running_stats=False."""
    sizes = SPLITS[world]["unequal"]
    start = sum(sizes[:rank])
    for kwargs in ({"momentum": None}, {"affine": False}, {"track_running_stats": False}):
        for p, k in PK[:4]:
            ref = LpBatchNorm2d(3, p=p, k=k, impl="eager", **kwargs).double()
            sync = SyncLpBatchNorm(3, p=p, k=k, **kwargs).double()
            for step in range(2):
                x_all = _global_batch(step, (3, 3, 2), sum(sizes), False)
                torch.testing.assert_close(sync(x_all[start:start + sizes[rank]]), ref(x_all)[start:start + sizes[rank]])
            for a, b in zip(sync.buffers(), ref.buffers()):
                torch.testing.assert_close(a, b)
            assert (sync.running_mean is None) == (kwargs.get("track_running_stats") is False)


def _check_float32(dist, rank, world) -> None:
    """float32 and bfloat16 input (statistics in float32) against LpBatchNorm in float64 of the
    same values, at their precision."""
    sizes = SPLITS[world]["unequal"]
    start = sum(sizes[:rank])
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        for p, k in PK[:4]:
            ref, _ = _layers(p, k, 4)
            sync = _layers(p, k, 4)[1].to(dtype)
            x_all = _global_batch(5, (3, 3, 2), sum(sizes), False).to(dtype).contiguous(memory_format=torch.channels_last)
            gy_all = _global_batch(6, (3, 3, 2), sum(sizes), False)
            xr = x_all.double().requires_grad_()
            y_ref = ref(xr)
            y_ref.backward(gy_all)
            x = x_all[start:start + sizes[rank]].clone().requires_grad_()
            y = sync(x)
            assert y.dtype == dtype
            y.backward(gy_all[start:start + sizes[rank]].to(dtype))
            sl = slice(start, start + sizes[rank])
            torch.testing.assert_close(y.double(), y_ref[sl].detach(), rtol=tol, atol=tol)
            scale = xr.grad.abs().max()
            torch.testing.assert_close(x.grad.double() / scale, xr.grad[sl] / scale, rtol=tol, atol=tol)
            torch.testing.assert_close(sync.running_var.double(), ref.running_var, rtol=tol, atol=tol)


def _check_collectives(dist, counter, rank, world) -> None:
    """The collectives made per training call are those documented; eval and the fallback make none."""
    for p, k in PK[:4]:
        _, sync = _layers(p, k, 3)
        x = _global_batch(rank, (3, 4), 2, False).requires_grad_()
        before = len(counter.calls)
        sync(x).sum().backward()
        made = counter.calls[before:]
        expected = [c["op"] for c in collectives(p, k, 3, world)]
        assert made == expected, f"p={p}, k={k}: made {made}, documented {expected}"
        before = len(counter.calls)
        with torch.no_grad():
            sync(x)  # no backward: forward's collectives only
        assert len(counter.calls) - before == len(expected) - 1
        sync.eval()
        before = len(counter.calls)
        sync(x).sum().backward()
        assert counter.calls[before:] == [], "eval mode communicates"


def _check_eval(dist, rank, world) -> None:
    for p, k in PK[:4]:
        ref, sync = _layers(p, k, 4)
        sizes = SPLITS[world]["unequal"]
        start = sum(sizes[:rank])
        for step in range(3):
            x_all = _global_batch(step, (3, 3, 2), sum(sizes), False)
            ref(x_all)
            sync(x_all[start:start + sizes[rank]])
        ref.eval(), sync.eval()
        x_all = _global_batch(9, (3, 3, 2), sum(sizes), False)
        torch.testing.assert_close(sync(x_all[start:start + sizes[rank]]), ref(x_all)[start:start + sizes[rank]])


def _check_k_too_large(dist, rank, world) -> None:
    """k above the global count fails alike on every rank (no rank left in a collective)."""
    _, sync = _layers(math.inf, 10 ** 6, 3)
    try:
        sync(_global_batch(0, (3, 4), 2, False))
    except ValueError as err:
        assert "over all ranks" in str(err)
    else:
        raise AssertionError("no ValueError for k > n")
    dist.barrier()


def _small_model(p, k):
    from normbench.nn import convert

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.BatchNorm2d(3), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5)).double()
    return convert(model, p=p, k=k)


def _check_ddp(dist, rank, world) -> None:
    """DDP over SyncLpBatchNorm: the averaged gradients of equal per-rank batches are the gradients
    of the one-process model on the concatenated batch, step after step."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    for p, k in PK[:4]:
        ref = _small_model(p, k)
        ddp = DDP(SyncLpBatchNorm.convert_sync_batchnorm(copy.deepcopy(ref)))
        opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        per = 3
        for step in range(3):
            g = torch.Generator().manual_seed(step)
            x_all = torch.randn(per * world, 2, 4, 4, generator=g, dtype=torch.float64)
            t_all = torch.randint(0, 5, (per * world,), generator=g)
            for model, opt_, x, t in ((ref, opt_ref, x_all, t_all),
                                      (ddp, opt, x_all[rank * per:(rank + 1) * per], t_all[rank * per:(rank + 1) * per])):
                opt_.zero_grad()
                torch.nn.functional.cross_entropy(model(x), t).backward()
                opt_.step()
            for (name, a), b in zip(ddp.module.named_parameters(), ref.parameters()):
                torch.testing.assert_close(a, b, msg=lambda m: f"p={p} k={k} step {step} {name}: {m}")
        for a, b in zip(ddp.module.buffers(), ref.buffers()):
            torch.testing.assert_close(a, b)


def _check_sharded_training(dist, rank, world) -> None:
    """normbench.experiments.distributed.wrap (what ``plot equivalence`` trains under torchrun):
    a global batch of 7 rows in unequal shares, the loss of the gathered logits; after each SGD
    step the parameters are the one-process model's, for BN of every p and for the weight-norm
    model's mean-only batch-norm."""
    from normbench.experiments.distributed import wrap
    from normbench.experiments.models import build_model

    for norm, p in (("bn", 2.0), ("bn", 1.0), ("bn", math.inf), ("wn", 2.0)):
        torch.manual_seed(0)
        ref = build_model("small", norm, p, (1, 8, 8), 10, 2).double()
        model = copy.deepcopy(ref)
        net = wrap(model)
        for step in range(2):
            g = torch.Generator().manual_seed(step)
            x, t = torch.randn(7, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (7,), generator=g)
            for m, f in ((ref, ref), (model, net)):
                for q in m.parameters():
                    q.grad = None
                torch.nn.functional.cross_entropy(f(x), t).backward()
                with torch.no_grad():
                    for q in m.parameters():
                        q.sub_(0.1 * q.grad)
            for (name, a), b in zip(model.named_parameters(), ref.parameters()):
                torch.testing.assert_close(a, b, msg=lambda m: f"{norm} p={p} step {step} {name}: {m}")
        for a, b in zip(model.buffers(), ref.buffers()):
            torch.testing.assert_close(a, b)
    from normbench.errors import UserError

    try:  # batch statistics it cannot synchronize: refused, naming the layer
        wrap(torch.nn.Sequential(torch.nn.InstanceNorm2d(3, track_running_stats=True)))
    except UserError as err:
        assert "0 (InstanceNorm2d)" in str(err), err
    else:
        raise AssertionError("an unsynchronized batch statistic was accepted")


def _check_compile(dist, rank, world) -> None:
    """torch.compile of a model holding a SyncLpBatchNorm trains as the eager model does."""
    torch._dynamo.reset()
    for p, k in [(math.inf, 3)]:  # the longest path (the gather, the tie rule); compiling takes seconds
        eager = SyncLpBatchNorm.convert_sync_batchnorm(_small_model(p, k))
        compiled_model = copy.deepcopy(eager)
        compiled = torch.compile(compiled_model, backend="aot_eager")
        x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
        y0, y1 = eager(x), compiled(x)
        torch.testing.assert_close(y1, y0)
        y0.square().sum().backward()
        y1.square().sum().backward()
        for a, b in zip(compiled_model.parameters(), eager.parameters()):
            torch.testing.assert_close(a.grad, b.grad)


def _check_gradcheck(dist, rank, world) -> None:
    """gradcheck of the synchronized Function itself over a group of one rank (a numerical
    Jacobian needs one process to perturb everything; across ranks the comparison with
    LpBatchNorm on the concatenated batch checks the gradients)."""
    from normbench.nn.sync import SyncLpNormFunction

    solo = [dist.new_group([r]) for r in range(world)][rank]
    g = torch.Generator().manual_seed(rank)
    for p, k in PK[:4]:
        x = torch.randn(4, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
        w = torch.tensor(WEIGHT, dtype=torch.float64, requires_grad=True)
        b = torch.tensor(BIAS, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, w, b: SyncLpNormFunction.apply(x, w, b, p, k, 1e-5, solo)[0], (x, w, b))


def _check_hang(dist, rank, world) -> None:
    """Rank 0 alone enters a collective: it must raise after the group's timeout, not hang."""
    dist.barrier()  # all ranks together: connecting the new group must not take its short timeout
    group = dist.new_group(list(range(world)), timeout=timedelta(seconds=HANG_TIMEOUT_S))
    if rank == 0:
        _, sync = _layers(2.0, None, 3, group)
        start = time.monotonic()
        try:
            sync(_global_batch(0, (3, 4), 2, False))
        except RuntimeError as err:
            waited = time.monotonic() - start
            assert HANG_TIMEOUT_S * 0.9 < waited < HANG_TIMEOUT_S + 20, f"failed after {waited:.1f} s: {err}"
            assert "timed out" in str(err).lower(), err
        else:
            raise AssertionError("a collective with one rank missing returned")
    dist.barrier()  # the other ranks wait here (in the default group) while rank 0 times out


def worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    counter = _Counter(dist)
    checks = {"options": lambda: _check_options(dist, rank, world),
              "float32": lambda: _check_float32(dist, rank, world),
              "collectives": lambda: _check_collectives(dist, counter, rank, world),
              "eval": lambda: _check_eval(dist, rank, world),
              "k-too-large": lambda: _check_k_too_large(dist, rank, world),
              "ddp": lambda: _check_ddp(dist, rank, world),
              "sharded-training": lambda: _check_sharded_training(dist, rank, world),
              "compile": lambda: _check_compile(dist, rank, world),
              "gradcheck": lambda: _check_gradcheck(dist, rank, world),
              "hang-times-out": lambda: _check_hang(dist, rank, world)}
    results = {}
    for name in cases(world):
        start = time.perf_counter()
        try:
            checks[name]() if name in checks else _check_against_concatenated(dist, rank, world, name)
            results[name] = {"error": None}
        except Exception:  # recorded, and the next case runs (a rank stuck in it times out)
            results[name] = {"error": traceback.format_exc()}
        results[name]["seconds"] = time.perf_counter() - start
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


# ---------------------------------------------------------------- pytest side


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, tmp: Path) -> tuple[list[subprocess.Popen], list[Path]]:
    port = _free_port()
    outs = [tmp / f"world{world}-rank{r}.json" for r in range(world)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")])))
    procs = [subprocess.Popen([sys.executable, __file__, str(r), str(world), str(port), str(o)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r, o in enumerate(outs)]
    return procs, outs


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[int, list[dict]]:
    """Both worlds run at once; each worker's per-case results (a killed or crashed worker's
    missing cases are reported as such by the tests)."""
    tmp = tmp_path_factory.mktemp("sync")
    launched = {world: _launch(world, tmp) for world in WORLDS}
    deadline = time.monotonic() + WORKERS_TIMEOUT_S
    out: dict[int, list[dict]] = {}
    for world, (procs, outs) in launched.items():
        logs = []
        for proc in procs:
            try:
                logs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0].decode()[-3000:])
            except subprocess.TimeoutExpired:
                proc.kill()
                logs.append(f"killed after {WORKERS_TIMEOUT_S} s: " + proc.communicate()[0].decode()[-3000:])
        out[world] = [dict(json.loads(o.read_text()) if o.exists() else {}, _log=log) for o, log in zip(outs, logs)]
    return out


@pytest.mark.parametrize("world,name", [(w, c) for w in WORLDS for c in cases(w)])
def test_sync_case(results, world, name):
    for rank, ranked in enumerate(results[world]):
        if name not in ranked:
            pytest.fail(f"rank {rank} of {world} did not report {name!r}; its output:\n{ranked['_log']}")
        assert ranked[name]["error"] is None, f"rank {rank} of {world}:\n{ranked[name]['error']}"


# ---------------------------------------------------------------- one process


def test_without_process_group_is_lp_batch_norm():
    """No process group initialized: the layer computes locally, as torch's SyncBatchNorm."""
    for p, k in PK[:4]:
        ref, sync = _layers(p, k, 4)
        x = _global_batch(0, (3, 3, 2), 4, False)
        torch.testing.assert_close(sync(x), ref(x))
        torch.testing.assert_close(sync.running_var, ref.running_var)


def test_convert_sync_batchnorm_keeps_parameters_and_statistics():
    from normbench.nn import convert

    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3), torch.nn.Sequential(
        torch.nn.SyncBatchNorm(3), LpBatchNorm1d(3, p=math.inf, k=2, momentum=None)))
    model[1].running_mean.fill_(0.5)
    model[1].weight.requires_grad_(False)
    model.eval()
    params = {name: p for name, p in model.named_parameters()}
    buffers = {name: b for name, b in model.named_buffers()}
    out = SyncLpBatchNorm.convert_sync_batchnorm(model)
    assert out is model
    for name in ("1", "2.0", "2.1"):
        assert type(model.get_submodule(name)) is SyncLpBatchNorm
    assert (model[1].p, model[1].k, model[2][1].p, model[2][1].k, model[2][1].momentum) == (2.0, None, math.inf, 2, None)
    assert {n: id(p) for n, p in model.named_parameters()} == {n: id(p) for n, p in params.items()}
    assert {n: id(b) for n, b in model.named_buffers()} == {n: id(b) for n, b in buffers.items()}
    assert not model[1].weight.requires_grad and not model[1].training
    single = SyncLpBatchNorm.convert_sync_batchnorm(convert(torch.nn.BatchNorm3d(4), p=1), process_group="g")
    assert type(single) is SyncLpBatchNorm and single.p == 1.0 and single.process_group == "g"
    with pytest.raises(ValueError, match="not initialized"):
        SyncLpBatchNorm.convert_sync_batchnorm(torch.nn.LazyBatchNorm1d())


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="2D to 5D"):
        SyncLpBatchNorm(3)(torch.randn(3))
    with pytest.raises(ValueError, match="3 channels"):
        SyncLpBatchNorm(3)(torch.randn(4, 2))
    with pytest.raises(ValueError, match="k .top-k. goes only"):
        SyncLpBatchNorm(3, p=1, k=2)


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
