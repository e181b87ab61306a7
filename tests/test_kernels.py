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

import importlib.util
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils.flop_counter import FlopCounterMode

from adamix_ds.kernels import KERNEL_ENV_VAR, adapter_forward, stacked_adapter_forward
from adamix_ds.kernels.eager import adapter_forward_eager

REPO_ROOT = Path(__file__).resolve().parents[1]
ACTIVATIONS = ("gelu", "gelu_tanh", "relu")
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2}

# (leading dims of hidden, d, r, M_down, M_up, down_index, up_index): token counts, hidden sizes and
# ranks that are not multiples of the kernel's blocks (64 tokens x 64 columns, rank padded to >= 16),
# experts other than 0, and the merged single adapter (M = 1, index 0).
SHAPES = {
    "3d-hidden": ((2, 37), 100, 7, 3, 2, 2, 1),
    "rank48": ((130,), 72, 48, 2, 3, 1, 2),
    "rank64-few-tokens": ((5,), 33, 64, 4, 4, 3, 0),
    "merged": ((67,), 40, 16, 1, 1, 0, 0),
}


def adapter_inputs(shape_key: str, dtype: torch.dtype, seed: int = 0) -> tuple[list[torch.Tensor], int, int]:
    """Fresh random ``[hidden, down_weight, down_bias, up_weight, up_bias]`` of ``dtype`` and the expert indices."""
    lead, d, r, n_down, n_up, down_index, up_index = SHAPES[shape_key]
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
    return tensors, down_index, up_index


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


def run_forward_backward(tensors, down_index, up_index, activation, grad_out=None):
    """``adapter_forward`` and its gradients for ``tensors`` (detached copies that require grad)."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = adapter_forward(*leaves, down_index, up_index, activation)
    out.backward(torch.ones_like(out) if grad_out is None else grad_out)
    return out.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape_key", list(SHAPES))
def test_fused_matches_float64_reference(triton_kernel, shape_key, activation, dtype):
    tensors, down_index, up_index = adapter_inputs(shape_key, dtype)
    grad_out = adapter_inputs(shape_key, dtype, seed=1)[0][0]
    with poisoned_allocations():
        out, grads = run_forward_backward(tensors, down_index, up_index, activation, grad_out)

    reference = [t.double().requires_grad_() for t in tensors]
    expected = adapter_forward_eager(*reference, down_index, up_index, activation)
    expected.backward(grad_out.double())

    assert out.dtype == dtype and out.shape == tensors[0].shape
    assert torch.isfinite(out).all(), "output not fully written"
    assert relative_error(out, expected) < TOLERANCE[dtype]
    for name, grad, ref, index in zip(
        ("hidden", "down_weight", "down_bias", "up_weight", "up_bias"),
        grads,
        reference,
        (None, down_index, down_index, up_index, up_index),
        strict=True,
    ):
        assert grad.dtype == dtype and grad.shape == ref.shape, name
        assert torch.isfinite(grad).all(), f"{name} gradient not fully written"
        if index is None:
            assert relative_error(grad, ref.grad) < TOLERANCE[dtype], name
            continue
        assert relative_error(grad[index], ref.grad[index]) < TOLERANCE[dtype], name
        others = torch.arange(grad.shape[0]) != index
        assert torch.equal(grad[others], torch.zeros_like(grad[others])), f"{name}: unchosen experts got a gradient"


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_kernel_loops_over_many_blocks_and_splits(triton_kernel, activation):
    # Small blocks put several token blocks in each backward split and several column blocks in each
    # row sweep, with partial tails everywhere (111 = 6*16 + 15 tokens, 100 = 3*32 + 4 columns).
    from adamix_ds.kernels.triton_adapter import adapter_backward_triton, adapter_forward_triton

    generator = torch.Generator().manual_seed(3)
    n, d, r = 111, 100, 7
    hidden = torch.randn(n, d, generator=generator)
    down_weight = torch.randn(3, r, d, generator=generator) * d**-0.5
    down_bias = torch.randn(3, r, generator=generator)
    up_weight = torch.randn(2, d, r, generator=generator) * r**-0.5
    up_bias = torch.randn(2, d, generator=generator)
    grad_out = torch.randn(n, d, generator=generator)
    blocks = {"block_n": 16, "block_d": 32}
    with poisoned_allocations():
        out, pre = adapter_forward_triton(hidden, down_weight, down_bias, up_weight, up_bias, 2, 1, activation, **blocks)
        grads = adapter_backward_triton(grad_out, hidden, pre, down_weight, up_weight, 2, 1, activation, n_splits=3, **blocks)

    reference = [t.double().requires_grad_() for t in (hidden, down_weight, down_bias, up_weight, up_bias)]
    expected = adapter_forward_eager(*reference, 2, 1, activation)
    expected.backward(grad_out.double())
    assert relative_error(out, expected) < 1e-5
    for grad, ref in zip(grads, reference, strict=True):
        assert relative_error(grad, ref.grad) < 1e-5


@pytest.mark.parametrize("kernel", ["triton", "eager"])
def test_gradients_reach_only_chosen_experts(request, monkeypatch, kernel):
    if kernel == "triton":
        request.getfixturevalue("triton_kernel")
    else:
        monkeypatch.setenv(KERNEL_ENV_VAR, kernel)
    tensors, down_index, up_index = adapter_inputs("3d-hidden", torch.float32)
    _, grads = run_forward_backward(tensors, down_index, up_index, "gelu")
    for grad, index in zip(grads[1:], (down_index, down_index, up_index, up_index), strict=True):
        others = torch.arange(grad.shape[0]) != index
        assert grad[index].abs().sum() > 0
        assert torch.equal(grad[others], torch.zeros_like(grad[others]))


@pytest.mark.parametrize("kernel", ["triton", "eager"])
@pytest.mark.parametrize("routes", [[(2, 1), (0, 1)], [(1, 0), (1, 0), (2, 1)]], ids=["2-passes", "3-passes-repeated-expert"])
def test_stacked_passes_equal_one_call_per_chunk(request, monkeypatch, kernel, routes):
    if kernel == "triton":
        request.getfixturevalue("triton_kernel")
    else:
        monkeypatch.setenv(KERNEL_ENV_VAR, kernel)
    tensors, _, _ = adapter_inputs("3d-hidden", torch.float32)
    tensors[0] = torch.cat([tensors[0]] * len(routes)) + torch.randn(len(routes) * 2, 37, 100)  # chunks differ
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    downs, ups = zip(*routes, strict=True)
    stacked_adapter_forward(*leaves, downs, ups, "gelu").square().sum().backward()

    reference = [t.detach().double().requires_grad_() for t in tensors]
    chunks = reference[0].chunk(len(routes))
    expected = torch.cat([adapter_forward_eager(chunk, *reference[1:], d, u, "gelu") for chunk, (d, u) in zip(chunks, routes, strict=True)])
    expected.square().sum().backward()
    for leaf, ref in zip(leaves, reference, strict=True):
        assert relative_error(leaf.grad, ref.grad) < 1e-5


def test_stacked_passes_need_one_route_per_equal_chunk():
    tensors, _, _ = adapter_inputs("3d-hidden", torch.float32)  # 2 rows
    with pytest.raises(ValueError, match="3 down and 3 up indices for a batch of 2 rows"):
        stacked_adapter_forward(*tensors, (0, 1, 2), (0, 0, 1), "gelu")


def test_negative_indices_pick_the_same_experts_as_eager(triton_kernel, monkeypatch):
    tensors, _, _ = adapter_inputs("3d-hidden", torch.float32)
    out, grads = run_forward_backward(tensors, -1, -2, "relu")
    monkeypatch.setenv(KERNEL_ENV_VAR, "eager")
    expected_out, expected_grads = run_forward_backward(tensors, -1, -2, "relu")
    torch.testing.assert_close(out, expected_out)
    for grad, expected in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected)


def test_empty_token_batch(triton_kernel):
    tensors, down_index, up_index = adapter_inputs("merged", torch.float32)
    tensors[0] = tensors[0][:0]
    out, grads = run_forward_backward(tensors, down_index, up_index, "gelu")
    assert out.shape == (0, 40)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads[1:])


def count_flops(kernel: str, monkeypatch) -> tuple[int, int, dict]:
    """Forward FLOPs, backward FLOPs and the forward's per-op counts of one adapter call."""
    monkeypatch.setenv(KERNEL_ENV_VAR, kernel)
    tensors, down_index, up_index = adapter_inputs("3d-hidden", torch.float32)
    leaves = [t.requires_grad_() for t in tensors]
    with FlopCounterMode(display=False) as forward_counter:
        out = adapter_forward(*leaves, down_index, up_index, "gelu")
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
    tensors, down_index, up_index = adapter_inputs("3d-hidden", torch.float32)
    expected_out, expected_grads = run_forward_backward(tensors, down_index, up_index, "gelu_tanh")

    torch._dynamo.reset()
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(adapter_forward, backend=backend, fullgraph=True)
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = compiled(*leaves, down_index, up_index, "gelu_tanh")
    out.backward(torch.ones_like(out))

    assert backend.frame_count == 1
    targets = {node.target for graph in backend.graphs for node in graph.graph.nodes}
    assert torch.ops.adamix.adapter_fwd.default in targets
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
    for grad, expected in zip((leaf.grad for leaf in leaves), expected_grads, strict=True):
        torch.testing.assert_close(grad, expected, rtol=0, atol=0)


def test_opcheck(triton_kernel):
    from adamix_ds.kernels import ops

    tensors, down_index, up_index = adapter_inputs("rank64-few-tokens", torch.float32)
    leaves = [t.requires_grad_() for t in tensors]
    torch.library.opcheck(ops.adapter_fwd, (*leaves, down_index, up_index, "gelu"))
    _, pre = ops.adapter_fwd(*[t.detach() for t in tensors], down_index, up_index, "gelu")
    grad_out = torch.randn_like(tensors[0])
    torch.library.opcheck(
        ops.adapter_bwd, (grad_out, tensors[0].detach(), pre, tensors[1].detach(), tensors[3].detach(), down_index, up_index, "gelu")
    )


def test_invalid_kernel_choice_names_the_value_and_the_choices(monkeypatch):
    monkeypatch.setenv(KERNEL_ENV_VAR, "cuda-graphs")
    tensors, down_index, up_index = adapter_inputs("merged", torch.float32)
    with pytest.raises(ValueError, match=r"ADAMIX_KERNEL='cuda-graphs'.*'eager', 'triton'"):
        adapter_forward(*tensors, down_index, up_index, "gelu")


def test_default_on_cpu_is_eager(monkeypatch):
    monkeypatch.delenv(KERNEL_ENV_VAR, raising=False)
    tensors, down_index, up_index = adapter_inputs("merged", torch.float32)
    with FlopCounterMode(display=False) as counter:
        adapter_forward(*tensors, down_index, up_index, "gelu")
    assert torch.ops.aten.addmm in counter.get_flop_counts()["Global"]


def test_forced_triton_rejects_what_it_cannot_run(triton_kernel):
    tensors, down_index, up_index = adapter_inputs("merged", torch.float32)
    too_wide = [tensors[0], torch.zeros(1, 65, 40), torch.zeros(1, 65), torch.zeros(1, 40, 65), tensors[4]]
    with pytest.raises(ValueError, match="rank 65 exceeds"):
        adapter_forward(*too_wide, down_index, up_index, "gelu")
    with pytest.raises(ValueError, match="bfloat16"):
        adapter_forward(*[t.bfloat16() for t in tensors], down_index, up_index, "gelu")


def test_default_cpu_run_never_loads_triton_kernels():
    # A fresh interpreter with neither variable set, as every other test module runs.
    env = {k: v for k, v in os.environ.items() if k not in (KERNEL_ENV_VAR, "TRITON_INTERPRET")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    script = (
        "import sys, torch\n"
        "from adamix_ds.kernels import adapter_forward\n"
        "h = torch.randn(3, 8, requires_grad=True)\n"
        "adapter_forward(h, torch.randn(2, 4, 8), torch.randn(2, 4), torch.randn(2, 8, 4), torch.randn(2, 8), 1, 0, 'gelu').sum().backward()\n"
        "assert not [m for m in sys.modules if m.startswith('adamix_ds.kernels.') and m != 'adamix_ds.kernels.eager'], sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO_ROOT, check=True, timeout=120)


def load_kernel_bench():
    spec = importlib.util.spec_from_file_location("kernel_bench", REPO_ROOT / "benchmarks" / "kernel_bench.py")
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their defining module up in sys.modules.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present, so the benchmark would run")
def test_kernel_bench_without_gpu_says_so_in_one_line(capsys):
    assert load_kernel_bench().main(["--fast"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1


def test_kernel_bench_floors_table(capsys):
    assert load_kernel_bench().main(["--floors", "--tokens", "8192", "--hidden", "768", "--ranks", "8", "64"]) == 0
    header, rule, *rows = capsys.readouterr().out.strip().splitlines()
    assert header.startswith("| tokens | d | r |") and len(rows) == 2
    # bf16: forward 2·(2·N·d + 2·r·d + r + d) bytes, forward + backward 12·N·d·r FLOPs.
    assert rows[0].split("|")[4].strip() == f"{2 * (2 * 8192 * 768 + 2 * 8 * 768 + 8 + 768) / 1e6:.1f}"
    assert rows[1].split("|")[6].strip() == f"{12 * 8192 * 768 * 64 / 1e9:.2f}"
