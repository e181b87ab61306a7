"""Causal-LM generation (E2E NLG): batches that train on the reference only, the token-level consistency loss,
label smoothing, beam search with the paper's settings (merged = folded), E2E data in both formats, bad input,
and real launcher runs on 1 and 2 ranks under ZeRO-2/3 that decode, score and re-evaluate."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import GenerationConfig, GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from adamix_ds import AdaMixConfig, add_adamix, merge_adamix
from adamix_ds.consistency import consistency_loss, stacked_passes
from adamix_ds.data import get_task_spec
from adamix_ds.families import CausalLMGeneration, Decoding, build_family
from adamix_ds.families.generation import SEPARATOR, GeneratedNoRepeatNGram
from adamix_ds.model import adamix_layers, set_eval_mode

from conftest import REPO_ROOT, SHARED_DATA, subprocess_env
from test_launcher_args import _launcher, _run_bad
from test_prompts import gpt2_tokenizer

E2E = SHARED_DATA / "e2e"
SPEC = get_task_spec("e2e_nlg")
# A tiny decoder that decodes in well under a second: 2 layers, hidden 32, GPT-2's real vocabulary.
TINY_POSITIONS = 256


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_embd=32, n_layer=2, n_head=2, n_positions=TINY_POSITIONS, vocab_size=len(gpt2_tokenizer()),
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    tiny_gpt2().save_pretrained(folder)
    gpt2_tokenizer().save_pretrained(folder)
    return folder


def _family(gpt2_dir, max_length: int = 96, **options) -> CausalLMGeneration:
    return build_family(SPEC, gpt2_tokenizer(), max_length, str(gpt2_dir), **options)


def _adamix_lora(model, experts: int = 4, seed: int = 0):
    """AdaMix-LoRA on the built-in placement (GPT-2: c_attn's Q and V) with random (non-zero) B, so that every
    expert changes the output, and no LoRA dropout; in eval mode (the new layers start in training mode)."""
    add_adamix(model, AdaMixConfig(adapter_type="lora", bottleneck_dim=4, num_experts=experts, lora_alpha=32, lora_dropout=0.0, seed=seed))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, layer in adamix_layers(model):
            for param in layer.expert_parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return model.eval()


# -- batches and losses ------------------------------------------------------------------------------


def test_training_examples_learn_the_reference_and_eos_only(gpt2_dir):
    family = _family(gpt2_dir)
    data = family.load_data(E2E, max_train_samples=4, max_eval_samples=3)
    tokenizer = gpt2_tokenizer()
    mr = "name[Alimentum], area[city centre], familyFriendly[no]"
    reference = "There is a place in the city centre, Alimentum, that is not family-friendly."
    prompt = tokenizer.encode(mr + SEPARATOR)
    target = tokenizer.encode(" " + reference) + [tokenizer.eos_token_id]
    first = data.train[0]
    assert first["input_ids"] == prompt + target
    assert first["labels"] == [-100] * len(prompt) + target
    batch = family.collator()([data.train[i] for i in range(4)])
    shorter = int(batch["attention_mask"].sum(-1).argmin())
    length = int(batch["attention_mask"][shorter].sum())
    assert (batch["labels"][shorter, length:] == -100).all() and (batch["input_ids"][shorter, length:] == tokenizer.pad_token_id).all()
    # Evaluation rows: one per distinct MR, its prompt and every reference.
    test = data.eval["test"]
    assert list(data.eval) == ["test"] and len(test) == 3
    assert test[0]["mr"] == "name[Blue Spice], eatType[coffee shop], area[city centre]"
    assert test[0]["input_ids"] == tokenizer.encode(test[0]["mr"] + SEPARATOR) and len(test[0]["references"]) > 1


def test_label_smoothed_loss_equals_a_hand_computation(gpt2_dir):
    family = _family(gpt2_dir, label_smoothing=0.1)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 6, 0]])
    # Position t predicts label t + 1; five target tokens; smoothing spreads 0.1 uniformly over the 7 classes.
    rows = [(0, 1, 3), (0, 2, 4), (1, 0, 1), (1, 1, 2), (1, 2, 6), (1, 3, 0)]
    rows = [r for r in rows if labels[r[0], r[1] + 1] != -100]
    expected = 0.0
    for b, t, y in rows:
        log_p = F.log_softmax(logits[b, t], -1)
        expected += -(0.9 * log_p[y] + 0.1 * log_p.mean())
    assert float(family.loss(logits, labels)) == pytest.approx(float(expected) / len(rows), rel=1e-5)


def test_consistency_compares_the_vocabulary_at_target_tokens_only(gpt2_dir):
    family = _family(gpt2_dir)
    model = _adamix_lora(tiny_gpt2()).train()
    data = family.load_data(E2E, max_train_samples=3, max_eval_samples=1)
    batch = family.collator()([data.train[i] for i in range(3)])
    out = family.train_loss(model, batch, consistency_weight=100.0)
    # The same two routed passes by hand: the routing counters start again from where the step started.
    for _, layer in adamix_layers(model):
        layer.forward_count -= 2
    inputs = {k: torch.cat([v, v]) for k, v in batch.items() if k != "labels"}
    with stacked_passes(model, 2):
        first, second = model(**inputs).logits.chunk(2)
    target = batch["labels"][:, 1:] != -100
    kl = [
        0.5 * (F.kl_div(F.log_softmax(second[b, t], -1), F.log_softmax(first[b, t], -1).detach(), log_target=True, reduction="sum")
               + F.kl_div(F.log_softmax(first[b, t], -1), F.log_softmax(second[b, t], -1).detach(), log_target=True, reduction="sum"))
        for b, t in target.nonzero().tolist()
    ]  # fmt: skip
    assert float(out.consistency_loss) == pytest.approx(float(torch.stack(kl).mean().detach()), rel=1e-4)
    assert float(out.consistency_loss) > 0
    # MR tokens and padding are not compared: the unmasked KL over every position differs.
    assert float(consistency_loss(first[:, :-1], second[:, :-1])) != pytest.approx(float(out.consistency_loss), rel=1e-3)
    assert float(out.task_loss) == pytest.approx(float(family.loss(first, batch["labels"])), rel=1e-5)
    assert float(out.loss) == pytest.approx(float(out.task_loss) + 100.0 * float(out.consistency_loss), rel=1e-5)


# -- decoding ----------------------------------------------------------------------------------------


def test_no_repeat_ngram_counts_generated_tokens_only():
    processor = GeneratedNoRepeatNGram(2, prompt_length=3)
    scores = torch.zeros(1, 10)
    # The prompt holds (5, 6) and (6, 5): a generated 5 may be followed by 6 once.
    assert torch.isfinite(processor(torch.tensor([[5, 6, 5, 5]]), scores.clone())).all()
    banned = processor(torch.tensor([[5, 6, 5, 5, 6, 5]]), scores.clone())
    assert torch.isinf(banned[0, 6]) and torch.isfinite(banned).sum() == 9


def test_decoding_is_generate_with_the_paper_settings(gpt2_dir):
    family = _family(gpt2_dir)
    assert family.decoding == Decoding(num_beams=10, length_penalty=0.8, no_repeat_ngram_size=4, max_new_tokens=64)
    config = family.generation_config
    assert (config.num_beams, config.length_penalty, config.max_new_tokens, config.do_sample) == (10, 0.8, 64, False)
    small = _family(gpt2_dir, decoding=Decoding(num_beams=3, max_new_tokens=12, no_repeat_ngram_size=0))
    model = tiny_gpt2(seed=1)
    prompts = [
        gpt2_tokenizer().encode("name[Aromi]" + SEPARATOR),
        gpt2_tokenizer().encode("name[The Wrestlers], food[English]" + SEPARATOR),
    ]
    batched = small.generate(model, prompts, batch_size=2, device=torch.device("cpu"))
    one_by_one = [small.generate(model, [p], batch_size=1, device=torch.device("cpu"))[0] for p in prompts]
    assert batched == one_by_one  # left padding changes nothing
    reference = model.generate(
        torch.tensor([prompts[0]]),
        generation_config=GenerationConfig(num_beams=3, max_new_tokens=12, length_penalty=0.8, do_sample=False, pad_token_id=50256, eos_token_id=50256),
    )  # fmt: skip
    assert batched[0] == " ".join(gpt2_tokenizer().decode(reference[0, len(prompts[0]) :], skip_special_tokens=True).split())
    # With the paper's no-repeat size no 4-gram occurs twice in a hypothesis's tokens.
    hypothesis = family.generate(model, prompts[:1], batch_size=1, device=torch.device("cpu"))[0]
    ids = gpt2_tokenizer().encode(hypothesis)
    grams = [tuple(ids[i : i + 4]) for i in range(len(ids) - 3)]
    assert len(grams) == len(set(grams))


def test_merged_folded_and_exported_lora_decode_the_same_text(gpt2_dir):
    family = _family(gpt2_dir, decoding=Decoding(num_beams=4, max_new_tokens=16))
    prompts = [gpt2_tokenizer().encode(mr + SEPARATOR) for mr in ("name[Aromi], eatType[pub]", "name[Cotto], near[Ranch]")]
    cpu = torch.device("cpu")
    model = _adamix_lora(tiny_gpt2(seed=2))
    set_eval_mode(model, "merged")
    merged = family.generate(model, prompts, 2, cpu)
    set_eval_mode(model, "ensemble")
    ensemble = family.generate(model, prompts, 2, cpu)
    plain = family.generate(tiny_gpt2(seed=2), prompts, 2, cpu)
    folded = family.generate(merge_adamix(model, fold=True), prompts, 2, cpu)
    assert merged == folded
    assert merged != plain  # the adapters matter, so the equality above is not trivial
    assert len(ensemble) == 2


def test_llama_decoders_train_and_decode_with_the_builtin_placement():
    tokenizer = gpt2_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=len(tokenizer), max_position_embeddings=TINY_POSITIONS, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    model = _adamix_lora(LlamaForCausalLM(config))
    assert {name.rsplit(".", 1)[-1] for name, _ in adamix_layers(model)} == {"q_proj", "v_proj"}
    family = CausalLMGeneration.__new__(CausalLMGeneration)  # the family without a checkpoint folder: its batches
    family.__dict__.update(
        spec=SPEC, tokenizer=tokenizer, max_length=96, label_smoothing=0.1, decoding=Decoding(num_beams=2, max_new_tokens=6)
    )
    pairs = [
        family._encode_pair("name[Aromi]", "Aromi is a pub."),
        family._encode_pair("name[Cotto], food[Thai]", "Cotto serves Thai food."),
    ]
    out = family.train_loss(model.train(), family.collator()(pairs), consistency_weight=100.0)
    out.loss.backward()
    assert out.consistency_loss > 0 and all(p.grad is not None for p in model.parameters() if p.requires_grad)
    hypotheses = family.generate(model.eval(), [pairs[0]["input_ids"][:4]], 1, torch.device("cpu"))
    assert len(hypotheses) == 1


# -- data --------------------------------------------------------------------------------------------


def test_e2e_folders_in_both_formats_and_with_a_training_file(gpt2_dir, tmp_path, caplog):
    family = _family(gpt2_dir, max_length=64)
    with caplog.at_level("WARNING"):
        offline = family.load_data(E2E)
    assert "training on the dev set devset.csv and evaluating on the test set testset_w_refs.csv" in caplog.text
    assert len(offline.train) == 4672 and list(offline.eval) == ["test"] and len(offline.eval["test"]) == 630
    assert sum(len(r) for r in offline.eval["test"]["references"]) == 4693
    lines = tmp_path / "lines"
    lines.mkdir()
    for name in ("lora_valid.txt", "lora_test.txt"):
        (lines / name).symlink_to(E2E / name)
    from_lines = family.load_data(lines)
    assert len(from_lines.train) == 4672 and len(from_lines.eval["test"]) == 630
    assert from_lines.eval["test"][0]["mr"] == "name : Blue Spice | Type : coffee shop | area : city centre"
    full = tmp_path / "full"
    full.mkdir()
    for source, name in (("devset.csv", "trainset.csv"), ("devset.csv", "devset.csv"), ("testset_w_refs.csv", "testset_w_refs.csv")):
        (full / name).symlink_to(E2E / source)
    with_train = family.load_data(full, max_eval_samples=5)
    assert list(with_train.eval) == ["validation", "test"] and all(len(d) == 5 for d in with_train.eval.values())


# -- bad input ---------------------------------------------------------------------------------------


def _bad_inputs(gpt2_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "devset.csv").write_text('mr,ref\n"name[Aromi]","Aromi.","extra"\n')
    (broken / "testset_w_refs.csv").symlink_to(E2E / "testset_w_refs.csv")
    classifier = tmp_path / "classifier"
    GPT2ForSequenceClassification(
        GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=len(gpt2_tokenizer()), pad_token_id=0)
    ).save_pretrained(classifier)
    gpt2_tokenizer().save_pretrained(classifier)
    gpt2 = ["--task_name", "e2e_nlg", "--model_name_or_path", str(gpt2_dir), "--data_dir", str(E2E)]
    return {
        "malformed E2E file": ([*gpt2, "--data_dir", str(broken)], "devset.csv"),
        "no placement": ([*gpt2, "--target_modules", "nothing_here"], "matched no module"),
        "beam of zero": ([*gpt2, "--num_beams", "0"], "num_beams=0 is invalid"),
        "longer than the model": ([*gpt2, "--max_seq_length", "200", "--max_new_tokens", "64"], "positions"),
        "sequence classifier": (["--task_name", "e2e_nlg", "--model_name_or_path", str(classifier)], "GPT2ForSequenceClassification"),
        "masked LM": (["--task_name", "e2e_nlg"], "needs a causal LM"),
        "prompt for generation": ([*gpt2, "--prompt"], "prompt=True is for classification tasks"),
        "decoding flag on classification": (["--num_beams", "4"], "num_beams=4 needs a generation task"),
        "label smoothing out of range": ([*gpt2, "--label_smoothing_factor", "1.5"], "label_smoothing_factor=1.5"),
    }


def test_bad_generation_input_exits_2_with_one_line_and_writes_nothing(gpt2_dir, tmp_path, capsys):
    launcher = _launcher()
    base = ["--task_name", "sst2", "--max_train_samples", "8", "--max_eval_samples", "4", "--max_seq_length", "32"]
    for case, (argv, expected) in _bad_inputs(gpt2_dir, tmp_path).items():
        output_dir = tmp_path / case.replace(" ", "_")
        line = _run_bad(launcher, [*base, "--output_dir", str(output_dir), *argv], capsys)
        assert expected in line, (case, line)
        assert not output_dir.exists(), case


# -- the launcher ------------------------------------------------------------------------------------


def _launch(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
# ZeRO-3 only: its lockstep decoding (synced_gpus) is the distributed case; ZeRO-2 decodes as one rank does, and
# the launcher's other tests cover every stage's training (this run alone takes about 2 min on 2 cores).
@pytest.mark.parametrize("stage", ["zero3"])
def test_two_rank_e2e_run_decodes_scores_and_reevaluates_on_one_rank(gpt2_dir, tmp_path, stage):
    from test_ds_launcher import _run

    output_dir = tmp_path / "out"
    args = [
        "--deepspeed", f"ds_configs/{stage}.json", "--task_name", "e2e_nlg", "--model_name_or_path", str(gpt2_dir),
        "--data_dir", str(E2E), "--method", "adamix", "--adapter_type", "lora", "--bottleneck_dim", "4", "--num_experts", "4",
        "--max_train_samples", "32", "--max_eval_samples", "5", "--max_seq_length", "64", "--per_device_train_batch_size", "4",
        "--max_steps", "3", "--learning_rate", "1e-3", "--label_smoothing_factor", "0.1", "--num_beams", "3",
        "--max_new_tokens", "10", "--per_device_eval_batch_size", "2", "--output_dir", str(output_dir),
    ]  # fmt: skip
    completed = _run("deepspeed", args)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "training on the dev set" in completed.stderr
    summary = json.loads((output_dir / "metrics.json").read_text())
    final = summary["final"]
    assert {f"test_{m}" for m in SPEC.metric_names} <= set(final) and summary["world_size"] == 2
    hypotheses = (output_dir / "predictions_test.txt").read_text().splitlines()
    records = [json.loads(line) for line in (output_dir / "predictions_test.jsonl").read_text().splitlines()]
    assert len(hypotheses) == 5 and [r["hypothesis"] for r in records] == hypotheses
    assert records[0]["mr"] == "name[Blue Spice], eatType[coffee shop], area[city centre]"
    assert json.loads((output_dir / "experts" / "task.json").read_text())["family"] == "generation"
    # One rank, the saved experts, merged: the same hypotheses and metrics as the two-rank run's final evaluation.
    modes_file = tmp_path / "modes.json"
    evaluate = [sys.executable, str(REPO_ROOT / "launchers" / "evaluate.py"), "--adapter_name_or_path", str(output_dir / "experts")]
    again = _launch([*evaluate, "--eval_modes", "merged", "--output_file", str(modes_file)])
    assert again.returncode == 0, again.stderr[-3000:]
    merged = json.loads(modes_file.read_text())["merged"]
    for metric in SPEC.metric_names:
        assert merged[f"test_{metric}"] == pytest.approx(final[f"test_{metric}"], abs=1e-9), metric
    # The score command reads the predictions file as e2e-metrics would and gives the same numbers.
    references = tmp_path / "references.csv"
    rows = [{"mr": r["mr"], "ref": ref} for r, refs in zip(records, _first_references(5), strict=True) for ref in refs]
    _write_csv(references, rows)
    scored = _launch([sys.executable, "launchers/score_e2e.py", "--hypotheses", str(output_dir / "predictions_test.txt"),
                      "--references", str(references), "--json"])  # fmt: skip
    assert scored.returncode == 0, scored.stderr[-2000:]
    assert json.loads(scored.stdout) == pytest.approx({m: final[f"test_{m}"] for m in SPEC.metric_names})


def _first_references(count: int) -> list[tuple[str, ...]]:
    from adamix_ds.data.e2e import read_e2e

    return [group.references for group in read_e2e(E2E / "testset_w_refs.csv")[:count]]


def _write_csv(path, rows: list[dict[str, str]]) -> None:
    import csv

    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["mr", "ref"], quoting=csv.QUOTE_ALL)
        writer.writeheader()
        writer.writerows(rows)
