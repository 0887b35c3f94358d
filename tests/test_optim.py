"""The learning rate as a device tensor: a compiled (or CUDA-graph captured) optimizer step
reads it from memory, so it follows the schedule. A Python-float lr is a constant of a
captured step: replaying it keeps the rate it was captured with, silently."""

from __future__ import annotations

import time

import pytest
import torch

from medcli import optim

CONFIG = {"optimizer": "sgd", "lr": 0.2, "momentum": 0.9, "weight_decay": 5e-4, "epochs": 10, "warmup_epochs": 2.0,
          "compile": True, "deterministic": False, "seed": 0, "device": "cpu"}
STEPS = 10  # one step per "epoch": 2 warm-up steps (WARMUP_MAX_SHARE of 10), then cosine


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads; on a shared 2-core machine they spin-wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch._dynamo.reset()  # no compiled frames left for later tests


def _setup(name: str, lr_on_device: bool, device=torch.device("cpu"), place: bool = True):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(device)
    config = {**CONFIG, "optimizer": name, "lr": 0.2 if name == "sgd" else 0.01, "compile": lr_on_device}
    optimizer = optim.make_optimizer(model, config, device)
    scheduler = optim.make_scheduler(optimizer, config, steps_per_epoch=1)
    if place:
        optim.place_lr(optimizer, config, device)
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 6, generator=generator), torch.randint(0, 3, (32,), generator=generator)
    return model, config, optimizer, scheduler, (x.to(device), y.to(device))


def _backward(model, optimizer, batch) -> None:
    optimizer.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()


def _eager_run(name: str, lr_on_device: bool, frozen: bool = False) -> list[list[torch.Tensor]]:
    """Parameters after every step of an eager run (`frozen`: the first step's lr throughout)."""
    model, _, optimizer, scheduler, batch = _setup(name, lr_on_device)
    seen = []
    for _ in range(STEPS):
        _backward(model, optimizer, batch)
        optimizer.step()
        if not frozen:
            scheduler.step()
        seen.append([p.detach().clone() for p in model.parameters()])
    return seen


def _distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def _close(a: list[torch.Tensor], b: list[torch.Tensor], **tolerance) -> bool:
    return all(torch.allclose(x, y, **tolerance) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_the_compiled_step_reads_the_lr_tensor_and_follows_the_schedule(monkeypatch, name):
    """`optim.compiled_step` under dynamo (the `eager` backend runs the captured graph as it is;
    inductor took 20 s for this step on 2 busy cores): the lr tensor is an input of the captured graph, the
    graph is not recompiled as the rate changes, and the parameters after every step equal an
    eager float-lr run's, not those of a run whose rate stayed at the first step's."""
    graphs, inputs = [], []

    def backend(gm, example_inputs):
        graphs.append(gm)
        inputs.extend(example_inputs)
        return gm.forward

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, backend=backend, **kw))
    torch._dynamo.reset()
    model, config, optimizer, scheduler, batch = _setup(name, lr_on_device=True)
    lr = optimizer.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and lr.dtype == torch.float32 and lr.dim() == 0
    step = optim.compiled_step(optimizer, config, torch.amp.GradScaler("cpu", enabled=False))
    reference, frozen = _eager_run(name, lr_on_device=False), _eager_run(name, lr_on_device=False, frozen=True)
    started, rates, after_two = time.perf_counter(), [], None
    for index in range(STEPS):
        _backward(model, optimizer, batch)
        rates.append(float(lr))
        step()
        assert optimizer.param_groups[0]["lr"] is lr  # filled in place, never replaced by a float
        scheduler.step()
        params = [p.detach().clone() for p in model.parameters()]
        assert _close(params, reference[index], rtol=1e-5, atol=2e-6), index  # float32 rounding
        if index:  # the test can tell: a rate frozen at the first step's is far off
            assert _distance(params, frozen[index]) > 100 * _distance(params, reference[index]), index
        after_two = len(graphs) if index == 1 else after_two
    assert optim.warmup_steps(config, 1) == 2
    assert len(set(rates)) > STEPS // 2 and rates == pytest.approx([optim.lr_factor(s, STEPS, 2) * config["lr"]
                                                                for s in range(STEPS)], rel=1e-6)
    assert graphs and len(graphs) == after_two  # captured once: no recompilation as the rate moves
    assert any(t is lr for t in inputs)  # read from the tensor at every call
    assert time.perf_counter() - started < 30


@pytest.mark.parametrize("name, bitwise", [("sgd", True), ("adamw", False)])
def test_a_tensor_lr_trains_like_the_float_lr(name, bitwise):
    """Eager steps with the float32 lr tensor: SGD's are bit-identical to the float's (its
    kernels round the rate to float32 either way), AdamW's equal within float32 rounding."""
    tensor, plain = _eager_run(name, lr_on_device=True), _eager_run(name, lr_on_device=False)
    for a, b in zip(tensor, plain, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b)) if bitwise else _close(a, b, rtol=1e-5, atol=1e-8)


def test_the_lr_becomes_a_device_tensor_only_with_compile_or_cuda_and_survives_a_checkpoint():
    """`place_lr` after a restore: a float from an old last.pt becomes a tensor, a tensor from a
    compiled run's last.pt becomes a float again for an eager CPU run, and the schedule
    (built on floats) keeps computing on the host (`current_lr`)."""
    cpu = torch.device("cpu")
    assert optim.lr_on_device({"compile": True}, cpu) and not optim.lr_on_device({"compile": False}, cpu)
    assert optim.lr_on_device({"compile": False}, torch.device("cuda"))
    model, config, optimizer, scheduler, batch = _setup("sgd", lr_on_device=True)
    for _ in range(4):
        _backward(model, optimizer, batch)
        optimizer.step()
        scheduler.step()
    assert float(optimizer.param_groups[0]["lr"]) == pytest.approx(optim.current_lr(scheduler), rel=1e-7)
    assert all(isinstance(value, float) for value in scheduler.base_lrs)
    saved, schedule = optimizer.state_dict(), scheduler.state_dict()

    _, _, eager, eager_schedule, _ = _setup("sgd", lr_on_device=False)
    eager.load_state_dict(saved)
    eager_schedule.load_state_dict(schedule)
    optim.place_lr(eager, {"compile": False}, cpu)
    assert all(isinstance(group["lr"], float) for group in eager.param_groups)
    eager_schedule.step()
    assert eager.param_groups[0]["lr"] == optim.current_lr(eager_schedule)

    _, _, compiled, compiled_schedule, _ = _setup("sgd", lr_on_device=True)
    compiled.load_state_dict(eager.state_dict())
    compiled_schedule.load_state_dict(eager_schedule.state_dict())
    optim.place_lr(compiled, config, cpu)
    lr = compiled.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and lr is not compiled.param_groups[1]["lr"]
    compiled_schedule.step()
    assert compiled.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(optim.current_lr(compiled_schedule))


def test_no_compiled_step_where_the_step_stays_eager():
    """Fused optimizers (CUDA: dynamo runs them eagerly; they read the lr tensor themselves)
    and fp16 loss scaling keep the eager step; without --compile there is none."""
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    off, on = torch.amp.GradScaler("cpu", enabled=False), torch.amp.GradScaler("cpu", enabled=True)
    assert optim.compiled_step(optimizer, {"compile": False}, off) is None
    assert optim.compiled_step(optimizer, {"compile": True}, on) is None
    assert optim.compiled_step(optimizer, {"compile": True}, off) is not None
    fused = torch.optim.SGD(model.parameters(), lr=0.1)
    fused.defaults["fused"] = True  # as make_optimizer builds it on CUDA
    assert optim.compiled_step(fused, {"compile": True}, off) is None


def test_strict_mode_with_compile_makes_inductor_deterministic_and_says_so():
    import torch._inductor.config as inductor

    before = inductor.deterministic
    strict = {**CONFIG, "deterministic": True}
    with optim.determinism(strict, torch.device("cpu")):
        assert inductor.deterministic and torch.are_deterministic_algorithms_enabled()
    assert inductor.deterministic == before
    assert optim.determinism_record(strict, [])["inductor_deterministic"] is True
    assert "inductor_deterministic" not in optim.determinism_record({**strict, "compile": False}, [])
    assert optim.determinism_record({**CONFIG, "device": "cuda:0"}, []) == {"strict": False, "cudnn_benchmark": True}
    assert optim.determinism_record(CONFIG, []) == {"strict": False, "cudnn_benchmark": False}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_a_cuda_graph_captured_step_follows_the_schedule(name):
    """The fused step captured once as a CUDA graph and replayed: the schedule fills the lr
    tensor between replays and the parameters follow an eager float-lr run on the GPU."""
    device = torch.device("cuda")

    def run(capture: bool) -> list[list[torch.Tensor]]:
        # the reference keeps the float lr (no place_lr): fused kernels take either
        model, _, optimizer, scheduler, batch = _setup(name, lr_on_device=True, device=device, place=capture)
        assert isinstance(optimizer.param_groups[0]["lr"], torch.Tensor) == capture
        _backward(model, optimizer, batch)  # static gradients: the same every step
        seen, graph = [], None
        for index in range(STEPS):
            if capture and index == 1:  # after the first step made the momentum / moment buffers
                for group in optimizer.param_groups:  # torch's capture check for Adam(W), fused or not
                    group["capturable"] = True
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    optimizer.step()  # recorded, not run
            if graph is None:
                optimizer.step()
            else:
                graph.replay()
            scheduler.step()
            seen.append([p.detach().clone() for p in model.parameters()])
        return seen

    captured, eager = run(capture=True), run(capture=False)
    for a, b in zip(captured, eager, strict=True):
        assert _close(a, b, rtol=1e-5, atol=1e-7)
