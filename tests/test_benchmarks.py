"""The benchmark scripts run (fast mode) and keep their promises; the closed-form FLOP model is exact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.fx.experimental._config as fx_config
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForSequenceClassification, GPT2LMHeadModel

from adamix_ds import AdaMixConfig, adamix_loss, add_adamix
from adamix_ds.flops import estimate_flops

from conftest import REPO_ROOT, SHARED_DATA, subprocess_env
from tiny_models import tiny_config

BENCHMARKS = REPO_ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from run_all import assemble, kept_sections  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)
from throughput import ALLOCATOR_TUNABLES  # noqa: E402

from common import meta_pad_token_id, token_inputs  # noqa: E402


def run_script(name: str, *args: str, timeout: int = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{name}.py"), *args],
        cwd=REPO_ROOT,
        env={**subprocess_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert completed.returncode == 0, f"{name}.py failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-5000:]}"
    return completed


def test_flops_fast_proves_single_adapter_cost_with_agreeing_counters(tmp_path: Path) -> None:
    run_script("flops", "--fast", "--out-dir", str(tmp_path), "--plot-dir", str(tmp_path))
    results = json.loads((tmp_path / "flops.json").read_text())
    assert results["failures"] == []
    rows = results["rows"]
    assert {r["model"] for r in rows} == {"single", "1", "4"}
    for row in rows:
        single = next(r for r in rows if r["model"] == "single" and r["adapter_type"] == row["adapter_type"])
        assert row["routed_step"] == single["routed_step"]
        assert row["merged_forward"] == single["merged_forward"]
        assert row["ds_merged_forward"] == pytest.approx(row["closed_forward"], rel=1e-9)
        if row["model"] != "single":
            assert row["consistency_step"] == 2 * row["routed_step"]
    assert results["kernel"][0]["fused_input_grad_True"] == results["kernel"][0]["eager_input_grad_True"]
    assert (tmp_path / "flops_vs_experts.png").stat().st_size > 0
    assert "All checks passed" in (tmp_path / "flops.md").read_text()


def test_throughput_fast_measures_every_method(tmp_path: Path) -> None:
    completed = run_script("throughput", "--fast", "--out-dir", str(tmp_path), "--plot-dir", str(tmp_path))
    assert "device: " in completed.stdout  # the script names the device it measured on
    results = json.loads((tmp_path / "throughput.json").read_text())
    methods = results["methods"]
    assert set(methods) == {"adamix", "adamix+consistency", "adapter", "adapter-2x", "lora", "full"}
    for method in methods.values():
        assert method["step_seconds"] > 0 and method["peak_memory_bytes"] > 0
    # Matched sizes: LoRA within 5% of the single adapter; AdaMix trains M down projections.
    assert methods["lora"]["trainable_without_head"] == pytest.approx(methods["adapter"]["trainable_without_head"], rel=0.05)
    assert methods["adamix"]["trainable"] > methods["adapter"]["trainable"]
    assert set(results["inference"]) == {"merged", "adapter", "ensemble"}
    assert len(results["targets"]) == 6
    assert 0 <= results["foreign_load_cores"] <= os.cpu_count()
    # The script restarts itself with the allocator setting it documents (unless glibc tunables were already set).
    assert results["environment"]["glibc_tunables"] == os.environ.get("GLIBC_TUNABLES", ALLOCATOR_TUNABLES)
    assert (tmp_path / "throughput.png").stat().st_size > 0


def _check_zero(results: dict, world_size: int) -> None:
    assert results["failures"] == []
    rows = [r for r in results["measured"] if r["world_size"] == world_size]
    assert sorted({r["stage"] for r in rows}) == [0, 1, 2, 3]
    assert len(rows) == 4 * world_size
    for row in rows:
        assert row["measured_total"] == pytest.approx(row["estimate"]["total"], rel=0.02)
        if row["deepspeed_estimate"] is not None:  # DeepSpeed's estimator assumes a trained backbone
            assert row["deepspeed_estimate"] > 3 * row["measured_total"]
    stages = {r["stage"]: r for r in rows if r["rank"] == 0}
    assert stages[3]["parameters"] < stages[0]["parameters"] / world_size * 1.05
    assert [r["gpus"] for r in results["deberta"][:3]] == [8, 16, 64]


@pytest.mark.parametrize("data_dir", ["glue", "glue/SST-2"])
def test_throughput_reads_the_glue_folder_as_the_launcher_does(data_dir: str) -> None:
    from common import sst2_sentences

    sentences, labels = sst2_sentences(SHARED_DATA / data_dir, 3)
    assert sentences[0].startswith("hide new secretions") and labels == [0, 0, 1]


def test_throughput_bad_data_dir_is_one_line_and_exit_2(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / "throughput.py"), "--fast", "--data-dir", str(tmp_path / "nope"), "--out-dir", str(tmp_path)],
        env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines()[-1] == f"throughput.py: error: data_dir is not an existing folder: {tmp_path / 'nope'}"
    assert "Traceback" not in completed.stderr and not (tmp_path / "throughput.json").exists()


def test_zero_memory_fast_one_rank(tmp_path: Path) -> None:
    # DS_ACCELERATOR=cuda stands in for a GPU host, where DeepSpeed would pick CUDA for the gloo workers (here it
    # would fail at once, on torch.cuda.set_device): zero_worker.py pins its ranks to the CPU accelerator.
    run_script("zero_memory", "--fast", "--out-dir", str(tmp_path), env={"DS_ACCELERATOR": "cuda"})
    _check_zero(json.loads((tmp_path / "zero_memory.json").read_text()), world_size=1)


@pytest.mark.slow
def test_zero_memory_two_ranks_partition_states(tmp_path: Path) -> None:
    run_script("zero_memory", "--world-sizes", "2", "--out-dir", str(tmp_path))
    results = json.loads((tmp_path / "zero_memory.json").read_text())
    _check_zero(results, world_size=2)
    stage = {r["stage"]: r for r in results["measured"] if r["rank"] == 1}
    assert stage[1]["optimizer_state"] == pytest.approx(stage[0]["optimizer_state"] / 2, rel=0.01)


def test_decode_speed_fast_times_every_method_on_the_same_work(tmp_path: Path) -> None:
    run_script("decode_speed", "--fast", "--out-dir", str(tmp_path))
    results = json.loads((tmp_path / "decode_speed.json").read_text())
    assert set(results["methods"]) == {"lora", "merged", "folded", "ensemble", "backbone"}
    assert results["methods"]["lora"]["time_vs_lora"] == 1.0
    assert all(m["tokens_per_second"] > 0 for m in results["methods"].values())
    assert "## Decoding speed" in (tmp_path / "decode_speed.md").read_text()


def test_run_all_keeps_the_kernel_and_measured_runs_sections() -> None:
    previous = (
        "# Benchmark results\n\n## FLOPs\nold\n\n## Measured training runs\n\nE2E\n\n## Fused adapter kernel\n\nkernel table\n\n"
        "### Floors\nrows\n\n## Later\nx\n"
    )
    kept = kept_sections(previous)
    assert kept == ["## Fused adapter kernel\n\nkernel table\n\n### Floors\nrows", "## Measured training runs\n\nE2E"]
    assert kept_sections("# Benchmark results\n\n## FLOPs\n") == []
    environment = {
        "date": "today",
        "cpu": "cpu",
        "cpu_cores": 2,
        "torch_threads": 2,
        "memory_gb": 1,
        "gpu": None,
        **dict.fromkeys(("python", "torch", "deepspeed", "transformers", "peft"), "1"),
    }
    text = assemble(environment, {"flops": 1.0}, ["## FLOPs\nnew\n"], kept)
    assert text.index("## FLOPs\nnew") < text.index("## Fused adapter kernel") and "old" not in text
    assert kept_sections(text) == kept


def _tiny(model_type: str):
    """A 2-layer model of ``model_type`` on the meta device; DeBERTa with its relative attention and conv layer on."""
    extra = {}
    if model_type == "deberta-v2":
        extra = dict(relative_attention=True, position_buckets=8, pos_att_type=["p2c", "c2p"], share_att_key=True, conv_kernel_size=3)
    config = tiny_config(model_type, num_labels=3, **extra)
    config.pad_token_id = meta_pad_token_id(model_type)
    with torch.device("meta"):
        if model_type == "gpt2":
            return GPT2LMHeadModel._from_config(config, attn_implementation="eager")
        return AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")


@pytest.mark.parametrize("model_type", ["bert", "roberta", "deberta-v2", "gpt2"])
@pytest.mark.parametrize("adapter_type", ["bottleneck", "lora"])
def test_closed_form_flops_equal_flop_counter_mode(model_type: str, adapter_type: str) -> None:
    model = _tiny(model_type)
    config = AdaMixConfig(adapter_type=adapter_type, bottleneck_dim=4, num_experts=3)
    add_adamix(model, config)
    batch_size, seq_len = 2, 10
    inputs = token_inputs(batch_size, seq_len, "meta")
    labels = inputs["input_ids"] if model_type == "gpt2" else inputs["input_ids"][:, 0]
    counts = {}
    with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
        for key, run in (
            ("routed_step", lambda: model(**inputs, labels=labels).loss.backward()),
            ("consistency_step", lambda: adamix_loss(model, {**inputs, "labels": labels}, 1.0).loss.backward()),
        ):
            with FlopCounterMode(display=False) as counter:
                run()
            counts[key] = counter.get_total_flops()
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**inputs)
    estimate = estimate_flops(model.config, config, batch_size, seq_len)
    tokens = batch_size * seq_len
    assert counter.get_total_flops() == pytest.approx(estimate.forward * tokens, rel=1e-12)
    assert counts["routed_step"] == pytest.approx(estimate.routed_step * tokens, rel=1e-12)
    assert counts["consistency_step"] == pytest.approx(estimate.consistency_step * tokens, rel=1e-12)
