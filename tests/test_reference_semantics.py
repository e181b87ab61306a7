"""The reference code's training semantics that are options here: the backbone's own dropout (``--backbone_dropout``)
and AdamW's epsilon, gradient clipping and bias decay (``--adam_epsilon``, ``--max_grad_norm 0``, ``--decay_biases``)
and the linear learning-rate schedule inside a real DeepSpeed engine built from the launcher's flags, against a
hand-built torch AdamW.

This file is also the rank worker: ``torchrun --nproc_per_node 1 tests/test_reference_semantics.py OUT.json``.
"""

from __future__ import annotations

import copy
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

LR, WEIGHT_DECAY = 1e-2, 0.5  # large enough that decaying a bias moves it visibly in two steps
# (case, launcher flags): the reference E2E optimizer (eps 1e-6, no clipping, every parameter decayed) and the
# run_glue.py one (eps 1e-8, clip 1.0, biases undecayed). Step 1's loss is scaled by HUGE: unclipped, its
# gradient dominates Adam's moments, so the later steps move the weights otherwise than after a clipped step 1.
CASES = {
    "reference_e2e": ["--adam_epsilon", "1e-6", "--max_grad_norm", "0", "--decay_biases"],
    "run_glue": ["--adam_epsilon", "1e-8", "--max_grad_norm", "1.0"],
}
HUGE = 1e4


# -- the backbone's dropout -------------------------------------------------------------------------------


def _two_training_passes(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    model.train()
    return model(**batch).logits, model(**batch).logits


def test_backbone_dropout_zero_makes_two_training_passes_of_gpt2_identical(tmp_path, caplog):
    from adamix_ds import AdaMixConfig, add_adamix
    from adamix_ds.data import get_task_spec
    from adamix_ds.families import Decoding, build_family

    from test_prompts import gpt2_tokenizer
    from tiny_models import tiny_gpt2_lm

    folder = tmp_path / "gpt2"
    tiny_gpt2_lm().save_pretrained(folder)  # GPT-2's defaults: attn_pdrop = resid_pdrop = embd_pdrop = 0.1
    family = build_family(get_task_spec("e2e_nlg"), gpt2_tokenizer(), 32, str(folder), decoding=Decoding(max_new_tokens=8))
    batch = {"input_ids": torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(0))}
    # One expert, no LoRA dropout: the routing is fixed and any difference between the passes is the backbone's.
    adapter = AdaMixConfig(adapter_type="lora", bottleneck_dim=4, num_experts=1, lora_dropout=0.0)

    default = add_adamix(family.load_model(str(folder)), adapter)
    first, second = _two_training_passes(default, batch)
    assert not torch.equal(first, second)  # the checkpoint's own dropout is on

    with caplog.at_level(logging.INFO, logger="adamix_ds.families.base"):
        model = add_adamix(family.load_model(str(folder), dropout=0.0), adapter)
    assert "attn_pdrop 0.1 -> 0" in caplog.text and "resid_pdrop 0.1 -> 0" in caplog.text and "embd_pdrop 0.1 -> 0" in caplog.text
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()  # B starts at zero: make the adapter's output part of the comparison
    first, second = _two_training_passes(model, batch)
    assert torch.equal(first, second)
    assert (model.config.attn_pdrop, model.config.resid_pdrop, model.config.embd_pdrop) == (0.0, 0.0, 0.0)
    assert all(module.p == 0.0 for name, module in model.named_modules() if isinstance(module, torch.nn.Dropout) and "lora" not in name)


def test_backbone_dropout_reaches_every_dropout_of_an_encoder_classifier(tmp_path):
    from adamix_ds.data import get_task_spec
    from adamix_ds.families import build_family

    from test_prompts import minilm_tokenizer
    from tiny_models import tiny_classifier

    folder = tmp_path / "bert"
    tiny_classifier("bert").save_pretrained(folder)
    family = build_family(get_task_spec("sst2"), minilm_tokenizer(), 32, str(folder))
    model = family.load_model(str(folder), dropout=0.05)
    dropouts = [module.p for module in model.modules() if isinstance(module, torch.nn.Dropout)]
    assert dropouts and all(p == 0.05 for p in dropouts)  # embeddings, attention, outputs and the classifier's


def test_a_llama_model_has_no_dropout_to_change_and_the_log_says_so(tmp_path, caplog):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from adamix_ds.families.prompt import load_language_model

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=64)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    with caplog.at_level(logging.INFO, logger="adamix_ds.families.base"):
        model = load_language_model(str(tmp_path / "llama"), AutoModelForCausalLM, dropout=0.0)
    assert "nothing to change in llama (attention_dropout=0)" in caplog.text
    untouched = load_language_model(str(tmp_path / "llama"), AutoModelForCausalLM)
    assert model.config.to_dict() == untouched.config.to_dict()
    batch = {"input_ids": torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))}
    model.train(), untouched.train()
    torch.testing.assert_close(model(**batch).logits, untouched(**batch).logits, rtol=0, atol=0)


# -- AdamW inside DeepSpeed -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    from conftest import REPO_ROOT, free_port, subprocess_env

    output = tmp_path_factory.mktemp("reference_semantics") / "report.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(free_port())]
    completed = subprocess.run(
        [*command, str(Path(__file__)), str(output)], cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    return json.loads(output.read_text())


@pytest.mark.slow
def test_adam_epsilon_reaches_deepspeeds_optimizer(report):
    assert report["reference_e2e"]["eps"] == [1e-6] * report["reference_e2e"]["groups"]
    assert report["run_glue"]["eps"] == [1e-8] * report["run_glue"]["groups"]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_deepspeed_steps_match_a_hand_built_adamw(report, case):
    assert report[case]["diff"]["as_flags"] < 1e-6, "DeepSpeed's weights differ from torch AdamW with the same settings"


@pytest.mark.slow
@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_deepspeed_steps_the_references_linear_schedule(report, case):
    # 4 steps, 1 of warmup: step n at lr * n / 1, then lr * (4 - n) / 3 (DeepSpeed's WarmupDecayLR: 0, 0, lr, 2 lr / 3).
    assert report[case]["lrs"] == pytest.approx([0.0, LR, LR * 2 / 3, LR / 3])


def test_max_grad_norm_0_leaves_a_huge_gradient_unclipped(report):
    diff = report["reference_e2e"]["diff"]
    assert diff["as_flags"] < 1e-6 and diff["clipped"] > 1e-3  # clipping step 1 would have changed the later steps


@pytest.mark.slow
def test_decay_biases_decays_biases_and_the_default_does_not(report):
    assert report["reference_e2e"]["diff"]["biases_undecayed"] > 1e-3  # the biases were decayed
    assert report["run_glue"]["diff"]["biases_decayed"] > 1e-3  # and here they were not
    assert report["reference_e2e"]["groups"] == 1 and report["run_glue"]["groups"] == 2


# ---------------------------------------------------------------------------------------------------------
# The rank worker.


def _model():
    from transformers import AutoModelForSequenceClassification

    from adamix_ds import AdaMixConfig, add_adamix

    from tiny_models import tiny_config

    config = tiny_config("bert")
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0  # the reference must see the same forward
    torch.manual_seed(0)
    model = add_adamix(AutoModelForSequenceClassification.from_config(config), AdaMixConfig(bottleneck_dim=4, num_experts=1))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and name.endswith("bias"):
                param.normal_()  # decaying a zero bias would show nothing
    return model


def _loss(model, step: int) -> torch.Tensor:
    from tiny_models import token_batch

    return model(**token_batch(batch=4, length=7, seed=step)).loss * (HUGE if step == 0 else 1.0)


def _hand_built_adamw(model, lrs: list[float], eps: float, clip: float, decay_biases: bool) -> torch.Tensor:
    """Torch AdamW steps on a copy of ``model`` at the learning rates ``lrs``; the trained weights, flat."""
    model = copy.deepcopy(model).train()
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    decayed = [p for name, p in trained if decay_biases or not (name.endswith("bias") or p.dim() < 2)]
    rest = [p for _, p in trained if all(p is not d for d in decayed)]
    groups = [{"params": decayed, "weight_decay": WEIGHT_DECAY}] + ([{"params": rest, "weight_decay": 0.0}] if rest else [])
    optimizer = torch.optim.AdamW(groups, lr=LR, eps=eps)
    for step, lr in enumerate(lrs):
        _loss(model, step).backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_([p for _, p in trained], clip)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad()
    return torch.cat([p.detach().flatten() for _, p in trained])


def _run_case(flags: list[str]) -> dict:
    import deepspeed

    from adamix_ds.optim import adamw_param_groups
    from adamix_ds.training import TrainSchedule, build_ds_config, parse_args

    run = parse_args(
        ["--task_name", "sst2", "--method", "adapter", "--learning_rate", str(LR), "--weight_decay", str(WEIGHT_DECAY)]
        + ["--per_device_train_batch_size", "4", "--max_steps", "4", "--warmup_steps", "1", "--output_dir", "unused", *flags]
    )
    args = run.training
    schedule = TrainSchedule.build(8, 1, 4, 1, 1.0, args.max_steps, args.warmup_ratio, args.warmup_steps)
    config = build_ds_config(args.deepspeed, args, 1, job_name="reference-semantics")
    config["tensorboard"]["enabled"] = False
    model = _model()
    initial = copy.deepcopy(model)
    groups = adamw_param_groups(model, args.learning_rate, args.weight_decay, decay_biases=args.decay_biases)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=config, lr_scheduler=schedule.lr_scheduler)
    lrs = []
    for step in range(4):
        engine.backward(_loss(engine, step))
        lrs.append(optimizer.param_groups[0]["lr"])  # the rate this step uses (the schedule moves after it)
        engine.step()
    trained = torch.cat([p.detach().flatten() for p in engine.module.parameters() if p.requires_grad])
    eps, clip = args.adam_epsilon, args.max_grad_norm

    def distance(**changes) -> float:
        settings = {"eps": eps, "clip": clip, "decay_biases": args.decay_biases, **changes}
        return float((trained - _hand_built_adamw(initial, lrs, **settings)).abs().max())

    return {
        "eps": [group["eps"] for group in optimizer.param_groups],
        "groups": len(optimizer.param_groups),
        "lrs": lrs,
        "diff": {
            "as_flags": distance(),
            "clipped": distance(clip=1.0),
            "biases_undecayed": distance(decay_biases=False),
            "biases_decayed": distance(decay_biases=True),
        },
    }


def _worker(output: str) -> None:
    import deepspeed

    from adamix_ds.training import dist_env, shutdown_distributed

    deepspeed.init_distributed()
    report = {name: _run_case(flags) for name, flags in CASES.items()}
    Path(output).write_text(json.dumps(report, indent=2))
    shutdown_distributed(dist_env())


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    _worker(sys.argv[1])
