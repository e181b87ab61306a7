"""GPU faults caught on a CPU-only machine: every library operation the launcher runs on the device, on the ``meta``
device as a GPU stand-in (a CPU tensor that meets a meta one raises, and so does a read of a value by the host);
collectives only of tensors on the engine's device; what a ``--bf16`` run saves; and how often the training loop
reads the device, counted in a real two-rank launcher run.

What no CPU test can show, and ``make gpu-check`` (``benchmarks/gpu_check.sh``) covers on the first GPU at hand:
NCCL itself, torch's fused AdamW kernel on CUDA, the Triton kernel compiled (here it runs in the interpreter),
speed, and beam search (``generate`` decides on the host, token by token, by design).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from adamix_ds import AdaMixConfig, add_adamix
from adamix_ds.data import get_task_spec
from adamix_ds.distributed import all_reduce, broadcast
from adamix_ds.families import build_family
from adamix_ds.merging import fisher_coefficients, fisher_diagonals, set_merge, soup_coefficients
from adamix_ds.model import adamix_layers, set_eval_mode
from adamix_ds.training.loop import LossWindow

from conftest import REPO_ROOT, SHARED_DATA, free_port, subprocess_env
from test_generation import tiny_gpt2
from test_prompts import gpt2_tokenizer, minilm_tokenizer, save_tiny, tiny_causal_lm, tiny_masked_lm
from tiny_models import tiny_classifier

META = torch.device("meta")
BATCH, LENGTH = 4, 9
EVAL_MODES = ("merged", "random", "fixed", "ensemble")


def _meta_batch(**extra: torch.Tensor) -> dict[str, torch.Tensor]:
    # No attention mask: transformers' mask helpers read an all-ones mask's values to skip it (see sync_probe.py).
    return {"input_ids": torch.zeros(BATCH, LENGTH, dtype=torch.long, device=META), **extra}


def _labels(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.long, device=META)


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """(family, AdaMix model on the meta device, a meta batch with labels) for each task family."""
    root = tmp_path_factory.mktemp("meta")
    sst2 = get_task_spec("sst2")
    cases = {}

    classifier = tiny_classifier("bert")
    cases["classification"] = (build_family(sst2, minilm_tokenizer(), LENGTH, str(root)), classifier, _meta_batch(labels=_labels((BATCH,))))
    for kind, model in (("bert", tiny_masked_lm()), ("gpt2", tiny_causal_lm())):
        family = build_family(
            sst2, minilm_tokenizer() if kind == "bert" else gpt2_tokenizer(), LENGTH, str(save_tiny(root / kind, kind)), prompt=True
        )
        inputs = {"mask_position": _labels((BATCH,)), "labels": _labels((BATCH,))}
        if kind == "gpt2":  # the causal prompt path computes positions from the mask; eager attention reads no mask value
            model.set_attn_implementation("eager")
            inputs["attention_mask"] = torch.ones(BATCH, LENGTH, dtype=torch.long, device=META)
        cases[f"prompt-{kind}"] = (family, model, _meta_batch(**inputs))
    generation = build_family(get_task_spec("e2e_nlg"), gpt2_tokenizer(), LENGTH, str(save_tiny(root / "gpt2-e2e", "gpt2")))
    cases["generation"] = (generation, tiny_gpt2(), _meta_batch(labels=_labels((BATCH, LENGTH))))
    for name, (family, model, _) in cases.items():
        adapter = "lora" if name == "generation" else "bottleneck"
        add_adamix(model, AdaMixConfig(adapter_type=adapter, bottleneck_dim=4, num_experts=3, modules_to_save=family.head_modules(model)))
        torch.nn.Module.train(model, True)  # transformers' train() would re-kernelize, which refuses meta
        model.to(META)
    return cases


FAMILIES = ("classification", "prompt-bert", "prompt-gpt2", "generation")


def _evaluate(model: torch.nn.Module, family, batch: dict) -> torch.Tensor:
    torch.nn.Module.train(model, False)
    with torch.no_grad():
        return family.logits(model, {k: v for k, v in batch.items() if k != "labels"})


@pytest.mark.parametrize("name", FAMILIES)
def test_a_train_step_with_consistency_runs_on_the_device(families, name):
    family, model, batch = families[name]
    torch.nn.Module.train(model, True)
    out = family.train_loss(model, batch, 1.0)
    out.loss.backward()
    assert out.loss.device == META and out.consistency_loss.device == META
    assert all(p.grad is not None and p.grad.device == META for _, layer in adamix_layers(model) for p in layer.expert_parameters())
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("mode", EVAL_MODES)
def test_every_eval_mode_runs_on_the_device(families, name, mode):
    family, model, batch = families[name]
    set_eval_mode(model, mode)
    try:
        assert _evaluate(model, family, batch).device == META
    finally:
        set_eval_mode(model, "merged")


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("merge", ["uniform", "greedy_soup", "best_expert", "fisher"])
def test_every_merge_is_made_and_applied_on_the_device(families, name, merge):
    family, model, batch = families[name]
    if merge == "fisher":

        def loss(module, inputs):
            return family.loss(family.logits(module, {k: v for k, v in inputs.items() if k != "labels"}), inputs["labels"])

        coefficients = fisher_coefficients(fisher_diagonals(model, [batch], loss))
    else:
        # A greedy soup is a uniform average of the experts it keeps; the best expert a soup of one.
        coefficients = {"uniform": None, "greedy_soup": soup_coefficients(model, [0, 2]), "best_expert": soup_coefficients(model, [1])}[
            merge
        ]
    set_merge(model, coefficients)
    try:
        for _, layer in adamix_layers(model):
            for weights in layer.merge_coefficients or ():
                assert weights is None or (weights.device == META and weights.dtype == torch.float32)
            assert all(merged.device == META for merged in layer.merge_tensors(list(layer.expert_parameters())))
        assert _evaluate(model, family, batch).device == META
    finally:
        set_merge(model, None)


def test_merges_are_computed_in_fp32_and_returned_in_the_weights_dtype():
    layer = next(layer for _, layer in adamix_layers(add_adamix(tiny_classifier("bert"), AdaMixConfig(bottleneck_dim=4, num_experts=3))))
    experts = torch.tensor([[1.0], [1.0], [2.0]]).to(torch.bfloat16)
    layer.set_merge_coefficients((torch.full((3, 1), 1 / 3),))
    (weighted,) = layer.merge_tensors([experts])
    layer.set_merge_coefficients(None)
    (uniform,) = layer.merge_tensors([experts])
    # 4/3 in bf16 is 1.3359375; weights rounded to bf16 first (0.33398) would give 1.34375.
    assert weighted.dtype == uniform.dtype == torch.bfloat16
    assert weighted.item() == uniform.item() == torch.tensor(4 / 3).to(torch.bfloat16).item()


# -- collectives -------------------------------------------------------------------------------------------


def test_a_collective_of_a_tensor_off_the_engine_device_is_refused():
    # Refused before torch.distributed is reached: no process group is needed to show it.
    for collective in (all_reduce, broadcast):
        with pytest.raises(RuntimeError, match="a collective of a tensor on cpu: this job's collectives take tensors on meta"):
            collective(torch.zeros(3), META)


def test_the_loss_window_lives_and_adds_on_the_engine_device(families):
    family, model, batch = families["classification"]
    torch.nn.Module.train(model, True)
    window = LossWindow(META)
    window.add(family.train_loss(model, batch, 1.0))
    assert window.sums.device == META


def test_every_collective_of_the_library_and_launchers_goes_through_the_device_check():
    """Tensor collectives are called in ``adamix_ds/distributed.py`` only; everywhere else through its helpers."""
    collectives = {"all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor"}
    offenders = []
    for path in [*sorted((REPO_ROOT / "adamix_ds").rglob("*.py")), *sorted((REPO_ROOT / "launchers").glob("*.py"))]:
        if path == REPO_ROOT / "adamix_ds" / "distributed.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in collectives:
                if isinstance(node.func.value, ast.Name) and node.func.value.id in {"dist", "torch", "deepspeed"}:
                    offenders.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}")
    assert not offenders, offenders


def test_the_shipped_configs_use_torchs_fused_adamw_except_cpu_offload():
    # DeepSpeed's FusedAdam is JIT-compiled with nvcc at deepspeed.initialize on a GPU; torch's fused AdamW ships
    # compiled. The offload config keeps DeepSpeedCPUAdam (a host C++ build), the optimizer ZeRO-Offload is made for.
    for path in sorted((REPO_ROOT / "ds_configs").glob("*.json")):
        config = json.loads(path.read_text())
        params = config["optimizer"]["params"]
        offload = "offload_optimizer" in config["zero_optimization"]
        assert (params.get("torch_adam") is True and params.get("fused") is True) != offload, path.name
    zero3 = json.loads((REPO_ROOT / "ds_configs" / "zero3.json").read_text())["zero_optimization"]
    # Adapter tensors of the paper's settings stay whole on every rank (DeBERTa-v2-XXLarge's 4 x 16 x 1536 experts:
    # 98,304 elements); the backbone's matrices (1024 x 1024 and up) are partitioned.
    assert 4 * 16 * 1536 < zero3["stage3_param_persistence_threshold"] < 1024 * 1024


# -- a two-rank --bf16 launcher run: host reads of the training loop, what is saved -----------------------------

STEPS, LOG_EVERY = 8, 4


@pytest.fixture(scope="module")
def probed_run(tmp_path_factory):
    """A 2-rank ZeRO-2 --bf16 AdaMix run of the launcher under ``sync_probe.py``: (output_dir, per-rank reports)."""
    root = tmp_path_factory.mktemp("probe")
    output_dir = root / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        str(REPO_ROOT / "tests" / "sync_probe.py"),
        "--deepspeed", "ds_configs/zero2.json", "--bf16", "--task_name", "sst2", "--data_dir", str(SHARED_DATA / "glue" / "SST-2"),
        "--max_train_samples", "72", "--holdout_samples", "8", "--max_eval_samples", "8", "--max_seq_length", "32",
        "--per_device_train_batch_size", "4", "--max_steps", str(STEPS), "--logging_steps", str(LOG_EVERY), "--eval_steps", "100",
        "--eval_modes", "merged,greedy_soup,fisher", "--merge", "greedy_soup", "--output_dir", str(output_dir),
    ]  # fmt: skip
    env = {**subprocess_env(), "SYNC_PROBE_OUTPUT": str(root / "reads")}
    completed = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    reports = [json.loads((root / f"reads.{rank}.json").read_text()) for rank in range(2)]
    return output_dir, reports


@pytest.mark.slow
def test_the_training_loop_reads_the_device_once_per_log_line(probed_run):
    _, reports = probed_run
    for report in reports:
        reads, calls = report["reads"], report["calls"]
        assert calls["train_step"] == STEPS and calls["window_close"] == STEPS // LOG_EVERY
        # The loop's own code, DeepSpeed's backward and step and transformers' mask helper counted apart.
        assert reads.get("train_step", 0) == 0, report
        assert reads["window_close"] == calls["window_close"], report
    print(f"host reads per rank and place over {STEPS} steps (DeepSpeed's and transformers' are theirs): {reports[0]['reads']}")


@pytest.mark.slow
def test_the_shipped_config_becomes_torchs_fused_adamw_in_the_engine(probed_run):
    _, reports = probed_run
    assert all(report["optimizer"] == {"type": "AdamW", "fused": True} for report in reports), reports


@pytest.mark.slow
def test_a_bf16_run_saves_the_fp32_masters_and_merges_them_in_fp32(probed_run):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    output_dir, _ = probed_run
    masters = get_fp32_state_dict_from_zero_checkpoint(str(output_dir / "checkpoints"), tag=f"step-{STEPS}")
    experts = load_file(str(output_dir / "experts" / "adapter_model.safetensors"))
    adapter = load_file(str(output_dir / "adapter" / "adapter_model.safetensors"))
    chosen = json.loads((output_dir / "metrics.json").read_text())["merge"]["chosen"]
    routed = 0
    for key, master in masters.items():
        assert experts[key].dtype == adapter[key].dtype == torch.float32, key
        assert torch.equal(experts[key], master), key  # not the bf16 module copy
        if master.shape[0] > 1 and adapter[key].shape[0] == 1:  # a routed projection: its greedy soup, in fp32
            # The greedy soup of --merge, as adamix_ds.merging.soup_coefficients weights it.
            weights = torch.tensor([1 / len(chosen) if k in chosen else 0.0 for k in range(master.shape[0])])
            coefficients = weights.view(-1, *[1] * (master.dim() - 1))
            assert torch.equal(adapter[key], (master * coefficients).sum(dim=0, keepdim=True)), key
            routed += 1
        else:
            assert torch.equal(adapter[key], master), key
    assert routed > 0 and set(masters) == {k for k in experts if not k.endswith("_extra_state")}
