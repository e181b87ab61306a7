"""The adapter compute: the fused Triton kernel (run by the Triton interpreter on CPU) and the dispatcher.

``TRITON_INTERPRET=1`` must be set before the kernel module is imported, since ``triton.jit`` reads it
when decorating; the kernel module is imported only by the dispatcher's Triton path, so setting it here
at collection time is early enough even when Triton itself was imported earlier (the kernels use no
``triton.jit`` functions of Triton's standard library), and on CPU it changes nothing for code that
does not use Triton: the automatic dispatch picks the fused kernel only for CUDA tensors.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import importlib
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils.flop_counter import FlopCounterMode

from adamix_ds.kernels import KERNEL_ENV_VAR, FusedFasterRule, adapter_forward, fused_measured_faster
from adamix_ds.kernels.eager import adapter_forward_eager

REPO_ROOT = Path(__file__).resolve().parents[1]
ACTIVATIONS = ("gelu", "gelu_tanh", "relu")
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2}
KERNELS = ("_adapter_fwd_kernel", "_adapter_bwd_dz_kernel", "_adapter_bwd_main_kernel", "_adapter_bwd_reduce_kernel")

# (leading dims of hidden, d, r, M_down, M_up, routes): token counts, hidden sizes and ranks that are not
# multiples of the kernel's blocks (64 tokens x 64 columns, rank padded to >= 16), M = 1, 2, 4 and 8, a
# shared (M = 1) and unshared up projection, experts other than 0, the merged single adapter, and stacked
# passes (dim 0 split into len(routes) chunks) with different experts, one expert shared by two passes and
# experts no pass chose.
SHAPES = {
    "3d-hidden": ((2, 37), 100, 7, 3, 2, [(2, 1)]),
    "rank48": ((130,), 72, 48, 2, 3, [(1, 2)]),
    "rank64-few-tokens": ((5,), 33, 64, 4, 4, [(3, 0)]),
    "merged": ((67,), 40, 16, 1, 1, [(0, 0)]),
    "8-experts-shared-up-2-passes": ((2, 45), 70, 16, 8, 1, [(5, 0), (2, 0)]),
    "3-passes-unshared": ((6, 11), 65, 9, 4, 4, [(1, 3), (1, 0), (2, 3)]),
}


def adapter_inputs(shape_key: str, dtype: torch.dtype, seed: int = 0) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
    """Fresh random ``[hidden, down_weight, down_bias, up_weight, up_bias]`` of ``dtype`` and the routes."""
    lead, d, r, n_down, n_up, routes = SHAPES[shape_key]
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(dtype)

    tensors = [
        randn(*lead, d),
        randn(n_down, r, d, scale=d**-0.5),
        randn(n_down, r),
        randn(n_up, d, r, scale=r**-0.5),
        randn(n_up, d),
    ]
    return tensors, routes


def eager_reference(tensors: list[torch.Tensor], routes: list[tuple[int, int]], activation: str) -> torch.Tensor:
    """The eager chain in float64, one ``adapter_forward_eager`` call per pass: the definition, not the dispatcher."""
    chunks = tensors[0].chunk(len(routes))
    return torch.cat([adapter_forward_eager(chunk, *tensors[1:], d, u, activation) for chunk, (d, u) in zip(chunks, routes, strict=True)])


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).norm() / expected.norm()).item()


@contextmanager
def poisoned_allocations():
    """Fill every fresh ``torch.empty`` / ``empty_like`` buffer with NaN, so unwritten outputs show up."""
    factories = {name: getattr(torch, name) for name in ("empty", "empty_like")}

    def poisoning(factory):
        def allocate(*args, **kwargs):
            tensor = factory(*args, **kwargs)
            return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

        return allocate

    try:
        for name, factory in factories.items():
            setattr(torch, name, poisoning(factory))
        yield
    finally:
        for name, factory in factories.items():
            setattr(torch, name, factory)


@pytest.fixture
def triton_kernel(monkeypatch):
    """Force the fused kernel; it runs in the Triton interpreter on these CPU tensors."""
    pytest.importorskip("triton")
    monkeypatch.setenv(KERNEL_ENV_VAR, "triton")
    from triton.runtime.interpreter import InterpretedFunction

    from adamix_ds.kernels import triton_adapter

    if not isinstance(triton_adapter._adapter_fwd_kernel, InterpretedFunction):
        pytest.skip("the kernel module was imported before TRITON_INTERPRET=1 was set")


def run_forward_backward(tensors, routes, activation, grad_out=None):
    """``adapter_forward`` and its gradients for ``tensors`` (detached copies that require grad)."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = adapter_forward(*leaves, routes, activation)
    out.backward(torch.ones_like(out) if grad_out is None else grad_out)
    return out.detach(), [leaf.grad for leaf in leaves]


def assert_gradients_match(grads, reference, routes, tolerance) -> None:
    """Input and chosen experts' gradients within ``tolerance`` of the float64 reference; unchosen exactly zero."""
    chosen = {1: {d for d, _ in routes}, 2: {d for d, _ in routes}, 3: {u for _, u in routes}, 4: {u for _, u in routes}}
    names = ("hidden", "down_weight", "down_bias", "up_weight", "up_bias")
    for position, (name, grad, ref) in enumerate(zip(names, grads, reference, strict=True)):
        assert grad.shape == ref.shape, name
        assert torch.isfinite(grad).all(), f"{name} gradient not fully written"
        if position == 0:
            assert relative_error(grad, ref.grad) < tolerance, name
            continue
        experts = sorted(index % grad.shape[0] for index in chosen[position])
        assert relative_error(grad[experts], ref.grad[experts]) < tolerance, name
        others = [e for e in range(grad.shape[0]) if e not in experts]
        assert torch.equal(grad[others], torch.zeros_like(grad[others])), f"{name}: unchosen experts got a gradient"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape_key", list(SHAPES))
def test_fused_matches_float64_reference(triton_kernel, shape_key, activation, dtype):
    tensors, routes = adapter_inputs(shape_key, dtype)
    grad_out = adapter_inputs(shape_key, dtype, seed=1)[0][0]
    with poisoned_allocations():
        out, grads = run_forward_backward(tensors, routes, activation, grad_out)

    reference = [t.double().requires_grad_() for t in tensors]
    expected = eager_reference(reference, routes, activation)
    expected.backward(grad_out.double())

    assert out.dtype == dtype and out.shape == tensors[0].shape
    assert torch.isfinite(out).all(), "output not fully written"
    assert relative_error(out, expected) < TOLERANCE[dtype]
    assert all(grad.dtype == dtype for grad in grads)
    assert_gradients_match(grads, reference, routes, TOLERANCE[dtype])


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_kernel_loops_over_many_blocks_and_splits(triton_kernel, activation):
    # Small blocks put several token blocks in each backward split and several column blocks in each
    # row sweep, with partial tails everywhere (111 = 6*16 + 15 tokens per pass, 100 = 3*32 + 4 columns),
    # and two passes whose partials the reduction adds into one up expert.
    from adamix_ds.kernels.triton_adapter import adapter_backward_triton, adapter_forward_triton

    generator = torch.Generator().manual_seed(3)
    n, d, r = 222, 100, 7
    routes = [(2, 1), (0, 1)]
    hidden = torch.randn(n, d, generator=generator)
    down_weight = torch.randn(3, r, d, generator=generator) * d**-0.5
    down_bias = torch.randn(3, r, generator=generator)
    up_weight = torch.randn(2, d, r, generator=generator) * r**-0.5
    up_bias = torch.randn(2, d, generator=generator)
    grad_out = torch.randn(n, d, generator=generator)
    blocks = {"block_n": 16, "block_d": 32}
    route_tensor = torch.tensor(routes)
    with poisoned_allocations():
        out, pre = adapter_forward_triton(hidden, down_weight, down_bias, up_weight, up_bias, route_tensor, activation, **blocks)
        grads = adapter_backward_triton(grad_out, hidden, pre, down_weight, up_weight, route_tensor, activation, n_splits=3, **blocks)

    reference = [t.double().requires_grad_() for t in (hidden, down_weight, down_bias, up_weight, up_bias)]
    expected = eager_reference(reference, routes, activation)
    expected.backward(grad_out.double())
    assert relative_error(out, expected) < 1e-5
    assert_gradients_match(grads, reference, routes, 1e-5)


@pytest.mark.parametrize("kernel", ["triton", "eager"])
@pytest.mark.parametrize("routes", [[(2, 1), (0, 1)], [(1, 0), (1, 0), (2, 1)]], ids=["2-passes", "3-passes-repeated-expert"])
@pytest.mark.parametrize("as_tensor", [False, True], ids=["int-routes", "tensor-routes"])
def test_stacked_passes_equal_one_call_per_chunk(request, monkeypatch, kernel, routes, as_tensor):
    if kernel == "triton":
        request.getfixturevalue("triton_kernel")
    else:
        monkeypatch.setenv(KERNEL_ENV_VAR, kernel)
    tensors, _ = adapter_inputs("3d-hidden", torch.float32)
    tensors[0] = torch.cat([tensors[0]] * len(routes)) + torch.randn(len(routes) * 2, 37, 100)  # chunks differ
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    adapter_forward(*leaves, torch.tensor(routes) if as_tensor else routes, "gelu").square().sum().backward()

    reference = [t.detach().double().requires_grad_() for t in tensors]
    eager_reference(reference, routes, "gelu").square().sum().backward()
    assert_gradients_match([leaf.grad for leaf in leaves], reference, routes, 1e-5)


@pytest.mark.parametrize(
    ("routes", "error", "message"),
    [
        ([(0, 1), (2, 0), (1, 1)], ValueError, "3 routes for a batch of 2 rows"),
        ([], ValueError, "0 routes"),
        ([(3, 0)], IndexError, "down expert 3 is out of range for 3 experts"),
        ([(0, -3)], IndexError, "up expert -3 is out of range for 2 experts"),
        (torch.tensor([0, 1]), ValueError, r"integer \[P, 2\] tensor"),
        (torch.tensor([[0.0, 1.0]]), ValueError, r"integer \[P, 2\] tensor"),
    ],
)
def test_routes_that_cannot_route_the_batch_raise(routes, error, message):
    tensors, _ = adapter_inputs("3d-hidden", torch.float32)  # 2 rows, 3 down and 2 up experts
    with pytest.raises(error, match=message):
        adapter_forward(*tensors, routes, "gelu")


def test_negative_indices_pick_the_same_experts_as_eager(triton_kernel, monkeypatch):
    tensors, _ = adapter_inputs("3d-hidden", torch.float32)
    for routes in ([(-1, -2)], torch.tensor([[-1, -2]])):
        out, grads = run_forward_backward(tensors, routes, "relu")
        monkeypatch.setenv(KERNEL_ENV_VAR, "eager")
        expected_out, expected_grads = run_forward_backward(tensors, routes, "relu")
        monkeypatch.setenv(KERNEL_ENV_VAR, "triton")
        torch.testing.assert_close(out, expected_out)
        for grad, expected in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("passes", [1, 2])
def test_empty_token_batch(triton_kernel, passes):
    tensors, _ = adapter_inputs("3-passes-unshared", torch.float32)
    tensors[0] = tensors[0][:0]
    with poisoned_allocations():
        out, grads = run_forward_backward(tensors, [(1, 3), (2, 0)][:passes], "gelu")
    assert out.shape == (0, 11, 65)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads[1:])


# Allocations that leave memory unwritten launch nothing; views launch nothing.
_NO_LAUNCH_OPS = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty", "aten::new_empty_strided"}


class _LaunchLog(TorchDispatchMode):
    """Appends to ``log`` every PyTorch op that launches device work: all but views and uninitialised allocations.

    The fused ops themselves (``adamix::*``) are containers: what they launch is logged from inside them.
    """

    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not (func.is_view or func._schema.name in _NO_LAUNCH_OPS or func.namespace == "adamix"):
            self.log.append(func._schema.name)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def launch_log(triton_kernel, monkeypatch) -> list[str]:
    """Every launch of an adapter call: each Triton kernel launch by name, each launching PyTorch op by its name.

    Kernel launches are counted where the kernel is indexed with its grid; the interpreter's own tensor traffic
    during a launch is not a launch and is left out. PyTorch ops are logged inside the fused ops' implementations
    and, with ``with _LaunchLog(log):``, around them (the autograd engine's own work).
    """
    from adamix_ds.kernels import ops, triton_adapter

    log: list[str] = []

    class CountedKernel:
        def __init__(self, name: str) -> None:
            self.name, self.kernel = name, getattr(triton_adapter, name)

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                log.append(self.name)
                with _disable_current_modes():
                    return self.kernel[grid](*args, **kwargs)

            return launch

    def logged(impl):
        def run(*args, **kwargs):
            with _LaunchLog(log):
                return impl(*args, **kwargs)

        return run

    for name in KERNELS:
        monkeypatch.setattr(triton_adapter, name, CountedKernel(name))
    for name in ("adapter_forward_triton", "adapter_backward_triton"):
        monkeypatch.setattr(ops, name, logged(getattr(ops, name)))
    return log


@pytest.mark.parametrize("shape_key", ["3d-hidden", "3-passes-unshared"], ids=["routed", "stacked"])
@pytest.mark.parametrize("as_tensor", [False, True], ids=["int-routes", "tensor-routes"])
def test_one_launch_forward_three_launch_backward(launch_log, shape_key, as_tensor):
    tensors, routes = adapter_inputs(shape_key, torch.float32)
    routes = torch.tensor(routes) if as_tensor else routes
    run_forward_backward(tensors, routes, "gelu")  # the first call with int routes makes their device tensor
    launch_log.clear()
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    grad_out = torch.randn_like(tensors[0])
    with _LaunchLog(launch_log):
        out = adapter_forward(*leaves, routes, "gelu")
    forward = list(launch_log)
    launch_log.clear()
    with _LaunchLog(launch_log):
        out.backward(grad_out)
    assert forward == ["_adapter_fwd_kernel"]
    # Zero fill included: the reduction writes every expert's gradient, chosen or not.
    assert launch_log == ["_adapter_bwd_dz_kernel", "_adapter_bwd_main_kernel", "_adapter_bwd_reduce_kernel"]
    assert all(leaf.grad is not None for leaf in leaves)


@pytest.mark.parametrize("passes", [1, 2], ids=["routed", "stacked"])
def test_an_adamix_layer_call_launches_one_adapter_kernel_forward_and_three_backward(launch_log, passes):
    from adamix_ds import AdaMixConfig
    from adamix_ds.layer import AdaMixBottleneck

    layer = AdaMixBottleneck(torch.nn.Linear(24, 40), AdaMixConfig(bottleneck_dim=8, num_experts=4, share_up=False), layer_id=0)
    layer.base_layer.requires_grad_(False)
    layer.train()
    layer.passes = passes
    x = torch.randn(passes * 3, 5, 24)
    layer(x).sum().backward()  # the first call with this routing makes its device tensor
    layer.forward_count = 0  # the same routing again
    layer.zero_grad(set_to_none=True)  # so the next backward stores gradients rather than adding them
    launch_log.clear()
    with _LaunchLog(launch_log):
        out = layer(x)
    forward = list(launch_log)
    grad_out = torch.randn_like(out)
    launch_log.clear()
    with _LaunchLog(launch_log):
        out.backward(grad_out)
    # The frozen base layer's matmul, then the whole adapter, all passes together, in one launch.
    assert forward == ["aten::addmm", "_adapter_fwd_kernel"]
    assert launch_log == ["_adapter_bwd_dz_kernel", "_adapter_bwd_main_kernel", "_adapter_bwd_reduce_kernel"]


def test_compiled_step_reads_each_steps_routing_from_the_device_tensor(triton_kernel):
    # What a captured CUDA graph needs (a graph cannot be captured on CPU): the routing is data in a tensor
    # that the next step refills, so one compiled graph serves every step's experts, with no recompilation.
    tensors, _ = adapter_inputs("3-passes-unshared", torch.float32)
    steps = [[(1, 3), (1, 0), (2, 3)], [(0, 2), (3, 3), (-1, 1)]]
    torch._dynamo.reset()
    backend = CompileCounterWithBackend("aot_eager")

    @torch.compile(backend=backend, fullgraph=True)
    def loss(hidden, down_weight, down_bias, up_weight, up_bias, routes):
        return adapter_forward(hidden, down_weight, down_bias, up_weight, up_bias, routes, "gelu").square().sum()

    routes = torch.zeros(3, 2, dtype=torch.int64)  # one static buffer, as a CUDA graph's input is
    for step_routes in steps:
        routes.copy_(torch.tensor(step_routes))
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        loss(*leaves, routes).backward()
        grads = [leaf.grad for leaf in leaves]
        reference = [t.double().requires_grad_() for t in tensors]
        eager_reference(reference, step_routes, "gelu").square().sum().backward()
        assert_gradients_match(grads, reference, step_routes, 1e-5)
    assert backend.frame_count == 1
    targets = {node.target for graph in backend.graphs for node in graph.graph.nodes}
    assert torch.ops.adamix.adapter_fwd.default in targets


def count_flops(kernel: str, monkeypatch) -> tuple[int, int, dict]:
    """Forward FLOPs, backward FLOPs and the forward's per-op counts of one adapter call."""
    monkeypatch.setenv(KERNEL_ENV_VAR, kernel)
    tensors, routes = adapter_inputs("3d-hidden", torch.float32)
    leaves = [t.requires_grad_() for t in tensors]
    with FlopCounterMode(display=False) as forward_counter:
        out = adapter_forward(*leaves, routes, "gelu")
    with FlopCounterMode(display=False) as backward_counter:
        out.backward(torch.ones_like(out))
    return forward_counter.get_total_flops(), backward_counter.get_total_flops(), forward_counter.get_flop_counts()


def closed_form_flops() -> tuple[int, int]:
    lead, d, r = SHAPES["3d-hidden"][:3]
    n = torch.Size(lead).numel()
    return 4 * n * d * r, 8 * n * d * r


def test_flop_counter_counts_the_fused_op(triton_kernel, monkeypatch):
    forward, backward, by_op = count_flops("triton", monkeypatch)
    assert (forward, backward) == closed_form_flops()
    assert set(by_op["Global"]) == {torch.ops.adamix.adapter_fwd}


def test_flop_counter_gives_the_same_matmul_flops_on_the_eager_path(monkeypatch):
    forward, backward, by_op = count_flops("eager", monkeypatch)
    assert (forward, backward) == closed_form_flops()
    assert not any(str(op).startswith("adamix") for op in by_op["Global"])


def test_torch_compile_runs_through_the_op(triton_kernel):
    tensors, routes = adapter_inputs("3d-hidden", torch.float32)
    expected_out, expected_grads = run_forward_backward(tensors, routes, "gelu_tanh")

    torch._dynamo.reset()
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(adapter_forward, backend=backend, fullgraph=True)
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = compiled(*leaves, routes, "gelu_tanh")
    out.backward(torch.ones_like(out))

    assert backend.frame_count == 1
    targets = {node.target for graph in backend.graphs for node in graph.graph.nodes}
    assert torch.ops.adamix.adapter_fwd.default in targets
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
    for grad, expected in zip((leaf.grad for leaf in leaves), expected_grads, strict=True):
        torch.testing.assert_close(grad, expected, rtol=0, atol=0)


def test_opcheck(triton_kernel):
    from adamix_ds.kernels import ops

    tensors, routes = adapter_inputs("8-experts-shared-up-2-passes", torch.float32)
    routes = torch.tensor(routes)
    leaves = [t.requires_grad_() for t in tensors]
    torch.library.opcheck(ops.adapter_fwd, (*leaves, routes, "gelu"))
    _, pre = ops.adapter_fwd(*[t.detach() for t in tensors], routes, "gelu")
    grad_out = torch.randn_like(tensors[0])
    torch.library.opcheck(ops.adapter_bwd, (grad_out, tensors[0].detach(), pre, tensors[1].detach(), tensors[3].detach(), routes, "gelu"))


def test_invalid_kernel_choice_names_the_value_and_the_choices(monkeypatch):
    monkeypatch.setenv(KERNEL_ENV_VAR, "cuda-graphs")
    tensors, routes = adapter_inputs("merged", torch.float32)
    with pytest.raises(ValueError, match=r"ADAMIX_KERNEL='cuda-graphs'.*'eager', 'triton'"):
        adapter_forward(*tensors, routes, "gelu")


def test_default_on_cpu_is_eager(monkeypatch):
    monkeypatch.delenv(KERNEL_ENV_VAR, raising=False)
    tensors, routes = adapter_inputs("merged", torch.float32)
    with FlopCounterMode(display=False) as counter:
        adapter_forward(*tensors, routes, "gelu")
    assert torch.ops.aten.addmm in counter.get_flop_counts()["Global"]


def test_dispatcher_sends_only_measured_faster_shapes_to_the_fused_kernel(monkeypatch):
    import adamix_ds.kernels as kernels

    rule = FusedFasterRule("NVIDIA H200", torch.bfloat16, min_tokens=16384, hidden_range=(768, 1536), max_rank=48)
    monkeypatch.setattr(kernels, "FUSED_FASTER_RULES", (rule,))
    assert fused_measured_faster("NVIDIA H200", torch.bfloat16, 16384, 768, 48)
    assert fused_measured_faster("NVIDIA H200", torch.bfloat16, 65536, 1536, 8)
    for unmeasured in [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 65536, 1024, 16),  # another device class
        ("NVIDIA H200", torch.float16, 65536, 1024, 16),  # another dtype
        ("NVIDIA H200", torch.bfloat16, 16383, 1024, 16),  # fewer tokens than where it was faster
        ("NVIDIA H200", torch.bfloat16, 65536, 4096, 16),  # outside the measured hidden sizes
        ("NVIDIA H200", torch.bfloat16, 65536, 1024, 64),  # above the measured ranks
    ]:
        assert not fused_measured_faster(*unmeasured), unmeasured


def test_forced_triton_rejects_what_it_cannot_run(triton_kernel):
    tensors, routes = adapter_inputs("merged", torch.float32)
    too_wide = [tensors[0], torch.zeros(1, 65, 40), torch.zeros(1, 65), torch.zeros(1, 40, 65), tensors[4]]
    with pytest.raises(ValueError, match="rank 65 exceeds"):
        adapter_forward(*too_wide, routes, "gelu")
    with pytest.raises(ValueError, match="bfloat16"):
        adapter_forward(*[t.bfloat16() for t in tensors], routes, "gelu")


def test_default_cpu_run_never_loads_triton_kernels():
    # A fresh interpreter with neither variable set, as every other test module runs.
    env = {k: v for k, v in os.environ.items() if k not in (KERNEL_ENV_VAR, "TRITON_INTERPRET")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    script = (
        "import sys, torch\n"
        "from adamix_ds.kernels import adapter_forward\n"
        "h = torch.randn(3, 8, requires_grad=True)\n"
        "adapter_forward(h, torch.randn(2, 4, 8), torch.randn(2, 4), torch.randn(2, 8, 4), torch.randn(2, 8), [(1, 0)], 'gelu').sum().backward()\n"
        "assert not [m for m in sys.modules if m.startswith('adamix_ds.kernels.') and m != 'adamix_ds.kernels.eager'], sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO_ROOT, check=True, timeout=120)


def load_benchmark(name: str):
    """A benchmark script as a module (they import their siblings, so ``benchmarks/`` goes on the path)."""
    if str(REPO_ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    return importlib.import_module(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present, so the benchmark would run")
def test_kernel_bench_without_gpu_says_so_in_one_line(capsys):
    assert load_benchmark("kernel_bench").main(["--fast"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1


def test_kernel_bench_floors_table(capsys):
    assert load_benchmark("kernel_bench").main(["--floors", "--tokens", "8192", "--hidden", "768", "--ranks", "8", "64"]) == 0
    header, rule, *rows = capsys.readouterr().out.strip().splitlines()
    assert header.startswith("| tokens | d | r |") and len(rows) == 2
    # bf16: forward 2·(2·N·d + 2·r·d + r + d) bytes, forward + backward 12·N·d·r FLOPs.
    assert rows[0].split("|")[4].strip() == f"{2 * (2 * 8192 * 768 + 2 * 8 * 768 + 8 + 768) / 1e6:.1f}"
    assert rows[1].split("|")[6].strip() == f"{12 * 8192 * 768 * 64 / 1e9:.2f}"


def test_kernel_bench_derives_the_dispatcher_rule_from_the_measured_speedups():
    bench = load_benchmark("kernel_bench")

    def row(tokens: int, d: int, r: int, speedup: float) -> dict:
        return {"tokens": tokens, "d": d, "r": r, "speedup": speedup}

    rows = [row(8192, 768, 8, 0.9), row(8192, 1536, 64, 1.3), row(16384, 768, 8, 1.2), row(16384, 1536, 48, 1.6), row(65536, 1024, 16, 2.0)]
    rule = bench.derive_rule(rows, "NVIDIA H200", torch.bfloat16)
    assert rule == FusedFasterRule("NVIDIA H200", torch.bfloat16, min_tokens=16384, hidden_range=(768, 1536), max_rank=48)
    assert "FusedFasterRule(device_name='NVIDIA H200', dtype=torch.bfloat16, min_tokens=16384" in bench.rule_text(rule)
    # Within the timing margin at the largest token count: no token count from which every shape is faster.
    rows.append(row(65536, 768, 8, 1.03))
    assert bench.derive_rule(rows, "NVIDIA H200", torch.bfloat16) is None
    assert "eager stays the default" in bench.rule_text(None)


def test_stack_step_times_every_method_through_both_kernels(launch_log):
    bench = load_benchmark("stack_step")
    rows = bench.run_stack_step(
        layers=2, hidden=32, tokens=32, batch=2, rank=4, experts=2, dtype="float32", device="cpu", rounds=1, steps=1, warmup=0
    )
    assert [(row["method"], row["kernel"]) for row in rows] == [(m, k or "peft") for m, k in bench.RUNS]
    # Per layer: AdaMix 2 down experts [4, 32] + biases and one shared up [32, 4] + bias; the adapter one of each;
    # LoRA A [4, 128] and B [32, 4] on the 128 -> 32 projection.
    trainable = {row["method"]: row["trainable"] for row in rows}
    assert trainable == {
        "adamix": 2 * (2 * (4 * 32 + 4) + 32 * 4 + 32),
        "adapter": 2 * (4 * 32 + 4 + 32 * 4 + 32),
        "lora": 2 * (4 * 128 + 32 * 4),
    }
    assert all(row["ms"] > 0 and row["time_vs_lora"] > 0 for row in rows)
    assert {row["speedup_vs_eager"] for row in rows if row["kernel"] in ("eager", "peft")} == {1.0}
    assert len(bench.results_table(rows).splitlines()) == 2 + len(rows)
    # The two fused runs, one step each through 2 layers: 4 forward launches, 3 backward launches each.
    assert launch_log.count("_adapter_fwd_kernel") == 4
    assert launch_log.count("_adapter_bwd_reduce_kernel") == 4
