"""Tests of the E2E data reader (adamix_ds.data.e2e), the five E2E metrics (adamix_ds.data.generation_metrics)
and launchers/score_e2e.py.

Real data comes from ../shared/data/e2e (see its README). Reference values are the implementations' own
documented examples, hand computations (arithmetic in comments), and e2e-metrics' measure_scores.py -p (the
challenge's scorer, as the LoRA and AdaMix papers ran it) on inputs rebuilt here. METEOR's Java process starts
once for the module (about 15 s): the tests share one ``E2EScorer``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import shutil
import subprocess
import sys
import threading

import psutil
import pytest
from sacrebleu.metrics import BLEU

from adamix_ds.data import generation_metrics
from adamix_ds.data.e2e import E2EGroup, group_pairs, read_e2e, read_e2e_pairs, read_hypotheses
from adamix_ds.data.generation_metrics import METRIC_NAMES, E2EScorer, bleu, nist, score_e2e

from conftest import REPO_ROOT, SHARED_DATA, subprocess_env

E2E = SHARED_DATA / "e2e"
needs_data = pytest.mark.skipif(not E2E.is_dir(), reason=f"shared data folder not found: {E2E}")
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="METEOR and the PTB tokenizer run java")
# A METEOR that waits for input it never gets would hang: fail instead (the start is part of the first test).
java_timeout = pytest.mark.timeout(180)

# Three MRs of the test set (names, food, a Unicode café and crème brûlée) and their hypotheses.
REFERENCES = [
    ["Blue Spice is a pub in the city centre.", "There is a pub called Blue Spice near the river."],
    ["The Punter serves cheap Italian food.", "Cheap Italian food is served at The Punter coffee shop."],
    ["Café Rouge is a family friendly restaurant serving crème brûlée.", "Café Rouge, a restaurant, welcomes families."],
]
HYPOTHESES = [
    "Blue Spice is a pub near the river.",
    "The Punter coffee shop serves cheap Italian food.",
    "Café Rouge is a restaurant that welcomes families.",
]


@pytest.fixture(scope="module")
def scorer():
    with E2EScorer() as shared:
        yield shared


def child_processes(marker: str) -> list[psutil.Process]:
    """This process's live descendants whose command line holds ``marker``."""
    found = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):  # one that ended meanwhile
            if marker in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
    return found


class DeadMeteor(generation_metrics.Meteor):
    """pycocoevalcap's METEOR wrapper around a process that fails at once, as a crashed JVM would."""

    def __init__(self) -> None:
        code = "import sys; sys.stderr.write('Exception in thread main: java.lang.OutOfMemoryError'); sys.exit(1)"
        pipe = subprocess.PIPE
        self.meteor_p = subprocess.Popen([sys.executable, "-c", code], stdin=pipe, stdout=pipe, stderr=pipe)
        self.lock = threading.Lock()


def load_launcher():
    spec = importlib.util.spec_from_file_location("score_e2e_launcher", REPO_ROOT / "launchers" / "score_e2e.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its argument dataclass is resolved through the module's entry
    spec.loader.exec_module(module)
    return module


def leave_one_out(count: int) -> tuple[list[str], list[tuple[str, ...]]]:
    """The first ``count`` test MRs with two references or more: the last reference as the hypothesis, the others
    as its references (human outputs, scored as e2e-metrics scored them)."""
    groups = [group for group in read_e2e(E2E / "testset_w_refs.csv") if len(group.references) >= 2][:count]
    return [group.references[-1] for group in groups], [group.references[:-1] for group in groups]


# -- reader -----------------------------------------------------------------------------------------------


@needs_data
@pytest.mark.parametrize(
    "csv_name, lines_name, mrs, references",
    [("devset.csv", "lora_valid.txt", 547, 4672), ("testset_w_refs.csv", "lora_test.txt", 630, 4693)],
)
def test_real_files_in_both_formats(csv_name, lines_name, mrs, references):
    from_csv, from_lines = read_e2e(E2E / csv_name), read_e2e(E2E / lines_name)
    for groups, name in ((from_csv, csv_name), (from_lines, lines_name)):
        pairs = read_e2e_pairs(E2E / name)
        assert len(groups) == mrs and len(pairs) == references == sum(len(group.references) for group in groups)
        assert [group.mr for group in groups] == list(dict.fromkeys(mr for mr, _ in pairs))  # first appearance
        assert [reference for group in groups for reference in group.references] == [ref for _, ref in pairs]
    # The LoRA files rewrite the MRs and tokenise the texts, but keep the groups and their order.
    assert [len(group.references) for group in from_csv] == [len(group.references) for group in from_lines]


@needs_data
def test_first_test_group_and_the_inputs_only_file():
    first = read_e2e(E2E / "testset_w_refs.csv")[0]
    assert first == E2EGroup(
        "name[Blue Spice], eatType[coffee shop], area[city centre]",
        ("A coffee shop in the city centre area called Blue Spice.", "Blue Spice is a coffee shop in city centre."),
    )
    assert read_e2e(E2E / "lora_test.txt")[0] == E2EGroup(
        "name : Blue Spice | Type : coffee shop | area : city centre",
        ("A coffee shop in the city centre area called Blue Spice .", "Blue Spice is a coffee shop in city centre ."),
    )
    inputs = read_e2e(E2E / "testset.csv")
    assert [group.mr for group in inputs] == [group.mr for group in read_e2e(E2E / "testset_w_refs.csv")]
    assert all(group.references == () for group in inputs)
    with pytest.raises(ValueError, match=r"testset\.csv: no reference column \(ref or human_reference\)"):
        read_e2e_pairs(E2E / "testset.csv")


@pytest.mark.parametrize(
    "name, content, pairs",
    [
        # The official quoting, any case, a BOM, CRLF line ends, whitespace around fields.
        (
            "official.csv",
            '\ufeff"MR","Ref"\r\n"name[A], food[Thai]"," A is Thai. "\r\nname[B],B.\r\n',
            [("name[A], food[Thai]", "A is Thai."), ("name[B]", "B.")],
        ),
        # The Hub's column names, in any position, beside others.
        (
            "hub.csv",
            'extra,human_reference,meaning_representation\nx,A is Thai.,"name[A], food[Thai]"\n',
            [("name[A], food[Thai]", "A is Thai.")],
        ),
        (
            "lines.txt",
            "name : A | food : Thai|| A is Thai . \n\nname : B||B .",
            [("name : A | food : Thai", "A is Thai ."), ("name : B", "B .")],
        ),
        ("no_suffix", "name : A||A .\n", [("name : A", "A .")]),
    ],
)
def test_header_names_quoting_and_whitespace(tmp_path, name, content, pairs):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8", newline="")
    assert read_e2e_pairs(path) == pairs


@pytest.mark.parametrize(
    "name, content, line, fault",
    [
        ("no_header.csv", b"name[A],A is here.\n", 1, "no header with an MR column"),
        ("empty.csv", b"", 1, "empty file"),
        ("two_mr_columns.csv", b"mr,MR,ref\n", 1, "more than one column named mr"),
        ("fields.csv", b'mr,ref\n"name[A]",A.\n"name[B]",B.,extra\n', 3, "3 fields, the header has 2"),
        ("short.csv", b'mr,ref\n"name[A]",A.\n"name[B]"\n', 3, "1 fields, the header has 2"),
        ("empty_mr.csv", b'mr,ref\nname[A],A.\n" ",B.\n', 3, "empty MR"),
        ("empty_ref.csv", b"mr,ref\nname[A],\n", 2, "empty reference"),
        ("unclosed_quote.csv", b'mr,ref\nname[A],A.\n"name[B],B.\nname[C],C.\n', 3, "bad CSV"),
        ("latin1.csv", b"mr,ref\nname[A],A.\nname[Caf\xe9],B.\n", 3, "not UTF-8 text (byte 0xe9)"),
        ("no_separator.txt", b"name : A||A .\nname : B | B .\n", 2, "expected one '||' between MR and text, found 0"),
        ("two_separators.txt", b"name : A||A .||B .\n", 1, "found 2"),
        ("empty_mr.txt", b" ||A .\n", 1, "empty MR"),
        ("empty_ref.txt", b"name : A||A .\nname : B|| \n", 2, "empty reference"),
        ("latin1.txt", b"name : A||Caf\xe9 .\n", 1, "not UTF-8 text"),
    ],
)
def test_malformed_files(tmp_path, name, content, line, fault):
    path = tmp_path / name
    path.write_bytes(content)
    for read in (read_e2e, read_e2e_pairs):
        with pytest.raises(ValueError) as error:
            read(path)
        message = str(error.value)
        assert message.startswith(f"{path}, line {line}: ") and fault in message and "\n" not in message


def test_missing_file_and_grouping(tmp_path):
    with pytest.raises(FileNotFoundError, match="E2E file not found: .*nope.csv"):
        read_e2e(tmp_path / "nope.csv")
    (tmp_path / "header_only.csv").write_text("mr,ref\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="header_only.csv: no rows"):
        read_e2e(tmp_path / "header_only.csv")
    # Repeated MRs need not be adjacent: groups in order of first appearance, references in file order.
    pairs = [("b", "1"), ("a", "2"), ("b", "3")]
    assert group_pairs(pairs) == [E2EGroup("b", ("1", "3")), E2EGroup("a", ("2",))]


def test_read_hypotheses(tmp_path):
    path = tmp_path / "predictions.txt"
    # A blank line is an empty output; \u2028 is no line end in this format; the last newline ends a line.
    path.write_text(" first \n\nthird\u2028still third\n", encoding="utf-8")
    assert read_hypotheses(path) == ["first", "", "third\u2028still third"]
    path.write_bytes(b"ok\nCaf\xe9\n")
    with pytest.raises(ValueError, match=r"predictions.txt, line 2: not UTF-8 text"):
        read_hypotheses(path)
    with pytest.raises(FileNotFoundError, match="hypotheses file not found"):
        read_hypotheses(tmp_path / "nope.txt")


# -- BLEU and NIST (no Java) ------------------------------------------------------------------------------


def test_bleu_sacrebleus_documented_example():
    # sacrebleu's README: BLEU = 48.53 82.4/50.0/45.5/37.5 (BP = 0.943 ...), two reference streams. Lowercasing
    # changes nothing there (the capitals open sentences of hypotheses and references alike).
    streams = [
        ["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
        ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."],
    ]
    hypotheses = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
    assert bleu(hypotheses, [list(group) for group in zip(*streams, strict=True)]) == pytest.approx(48.5308, abs=1e-4)
    assert bleu(["the DOG bit THE man ."], [["The dog bit the man."]]) == pytest.approx(100)


def test_bleu_with_a_variable_number_of_references():
    hypotheses = ["the cat", "a dog is in the garden today"]
    references = [["the cat sat on the mat"], ["a dog is in the garden", "the dog is in a garden today"]]
    # A repeated reference changes no BLEU statistic, so this unpadded equivalent scores the same:
    repeated = [["the cat sat on the mat"] * 2, references[1]]
    assert bleu(hypotheses, references) == pytest.approx(bleu(hypotheses, repeated))
    # ...while padding the short group with '' (not None) would make 0 the closest reference length of "the cat"
    # and drop its brevity penalty: why bleu pads with None.
    padded = [["the cat sat on the mat", "a dog is in the garden"], ["", "the dog is in a garden today"]]
    assert BLEU(lowercase=True).corpus_score(hypotheses, padded).score > bleu(hypotheses, references) + 1


def test_nist_equals_nltk_with_one_reference():
    nltk_nist = pytest.importorskip("nltk.translate.nist_score")
    # nltk's corpus_nist keeps the best single reference per hypothesis: with one reference each, it must agree.
    # Sentences of its docstring, lowercased (ours lowercases); hypotheses shorter than references overall, so the
    # brevity penalty is exercised.
    h1 = "it is a guide to action which ensures that the military always obeys the commands of the party"
    h2 = "it is to insure the troops forever hearing the activity guidebook that party direct"
    r1 = "it is a guide to action that ensures that the military will forever heed party commands"
    r2 = "it is the guiding principle which guarantees the military forces always being under the command of the party"
    r3 = "it is the practical guide for the army always to heed the directions of the party"
    for refs in ([r1, r2], [r3, r1], [r2, r3]):
        expected = nltk_nist.corpus_nist([[ref.split()] for ref in refs], [h1.split(), h2.split()], n=5)
        assert nist([h1, h2], [[ref] for ref in refs]) == pytest.approx(expected, rel=1e-12)


def test_nist_by_hand():
    # One MR, references "a b c" and "a b d", hypothesis "a b c". Reference counts: 6 words; a 2, b 2, c 1, d 1;
    # "a b" 2, "b c" 1, "b d" 1; "a b c" 1, "a b d" 1. Information weights: info(a) = info(b) = log2(6/2), info(c)
    # = log2(6/1); info(a b) = log2(count(a)/count(a b)) = log2(2/2) = 0, info(b c) = log2(2/1) = 1; info(a b c) =
    # log2(count(a b)/count(a b c)) = 1. Per order, matched information / hypothesis n-grams:
    # (2 log2 3 + log2 6) / 3 = log2 3 + 1/3; (0 + 1) / 2; 1 / 1; 0 (no 4-gram); 0. Length 3 against the average
    # reference length 3: no penalty. NIST = log2 3 + 1/3 + 1/2 + 1 = log2 3 + 11/6.
    assert nist(["a b c"], [["a b c", "a b d"]]) == pytest.approx(math.log2(3) + 11 / 6, rel=1e-12)
    # Two MRs: "p q r s" against itself; "u" against "u v", "u w", "u z". 10 reference words; p q r s u: 1 1 1 1 3.
    # Unigrams: (4 log2(10/1) + log2(10/3)) / 5 hypothesis words = log2 10 - (log2 3) / 5; every matched bigram
    # and longer n-gram is as frequent as its prefix: weight 0. Reference length = the per-MR average reference
    # lengths summed: 4 + 2 = 6 (pymteval's; mteval-v13a-sig.pl's, 10 words / 2 references per MR = 5, would give
    # no penalty); ratio 5/6, penalty exp(-beta ln(5/6)^2), beta = -ln 0.5 / ln(1.5)^2 (0.5 at a ratio of 2/3).
    beta = -math.log(0.5) / math.log(1.5) ** 2
    expected = (math.log2(10) - math.log2(3) / 5) * math.exp(-beta * math.log(5 / 6) ** 2)
    assert nist(["p q r s", "u"], [["p q r s"], ["u v", "u w", "u z"]]) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(2.611972, abs=1e-6)
    # mteval's tokenisation and lowercasing: punctuation split off, case ignored.
    assert nist(["A b, C."], [["a b , c ."]]) == pytest.approx(nist(["a b , c ."], [["a b , c ."]]))


def test_bleu_and_nist_use_every_reference():
    first_only = [group[:1] for group in REFERENCES]
    assert bleu(HYPOTHESES, REFERENCES) > bleu(HYPOTHESES, first_only) + 5
    assert nist(HYPOTHESES, REFERENCES) > nist(HYPOTHESES, first_only) + 0.5


def test_empty_hypotheses_and_bad_input():
    assert bleu(["", ""], REFERENCES[:2]) == 0 and nist(["", ""], REFERENCES[:2]) == 0
    assert 0 < nist(["", HYPOTHESES[1]], REFERENCES[:2]) < nist(HYPOTHESES[:2], REFERENCES[:2])
    with pytest.raises(ValueError, match="3 hypotheses but 2 reference groups"):
        score_e2e(HYPOTHESES, REFERENCES[:2])
    with pytest.raises(ValueError, match=r"references\[1\] has no reference"):
        score_e2e(HYPOTHESES[:2], [REFERENCES[0], []])
    with pytest.raises(ValueError, match=r"references\[0\] holds an empty reference"):
        bleu(["a"], [["a", " \n"]])
    with pytest.raises(ValueError, match="no hypotheses"):
        nist([], [])
    with pytest.raises(TypeError, match=r"references\[0\] is a string"):
        bleu(["a b"], ["a b"])


# -- all five metrics (Java) ------------------------------------------------------------------------------


@needs_java
@needs_data
@java_timeout
def test_equals_measure_scores_on_human_outputs(scorer):
    # e2e-metrics (tuetschek/e2e-metrics at 1b9c4d8) `measure_scores.py -p refs.csv hyps.txt` on leave_one_out(100)
    # written as a CSV of MRs and references and a file of hypotheses: BLEU 0.5505637500593873, NIST
    # 7.581222970938006, METEOR 0.4510227997801632, ROUGE_L 0.6454934556821166, CIDEr 2.425460334032711. (Without
    # -p, its Perl mteval-v13a-sig.pl gives NIST 7.172: another reference length, see nist's docstring.)
    expected = {"bleu": 55.05637500593873, "nist": 7.581222970938006, "meteor": 45.10227997801632}
    expected |= {"rouge_l": 64.54934556821166, "cider": 2.425460334032711}
    scores = scorer.score(*leave_one_out(100))
    assert list(scores) == list(METRIC_NAMES)
    assert scores == pytest.approx(expected, rel=1e-9)


@needs_java
@java_timeout
def test_perfect_unicode_hypotheses(scorer):
    perfect = scorer.score([group[0] for group in REFERENCES], REFERENCES)
    assert perfect["bleu"] == pytest.approx(100) and perfect["meteor"] == pytest.approx(100)
    assert perfect["rouge_l"] == pytest.approx(100) and perfect["cider"] > 1 and perfect["nist"] > 3
    # é and è stay distinct characters through Java's tokenizer and METEOR (a lossy decoding would make them equal).
    accents = scorer.score(["café rouge", "the punter"], [["cafè rouge"], ["the punter"]])
    assert accents["meteor"] < 100 and accents["rouge_l"] < 100


@needs_java
@java_timeout
def test_all_references_count(scorer):
    every, first = scorer.score(HYPOTHESES, REFERENCES), scorer.score(HYPOTHESES, [group[:1] for group in REFERENCES])
    # The hypotheses share more with the second references. CIDEr averages over the references (and its idf
    # counts them), so it changes without having to grow.
    assert all(every[name] > first[name] + 5 for name in ("bleu", "meteor", "rouge_l")), (every, first)
    assert every["nist"] > first["nist"] + 1 and every["cider"] != pytest.approx(first["cider"]), (every, first)


@needs_java
@java_timeout
def test_empty_hypotheses_score_zero(scorer):
    assert scorer.score(["", " ", "\n"], REFERENCES) == dict.fromkeys(METRIC_NAMES, 0.0)
    mixed = scorer.score(["", *HYPOTHESES[1:]], REFERENCES)
    assert all(value > 0 for value in mixed.values())


@needs_java
@java_timeout
def test_line_breaks_and_meteor_separators_inside_texts(scorer):
    # Line breaks would end METEOR's request line early (and wait for a reply forever) or shift the tokenizer's
    # output lines; "|||" is METEOR's field separator. Whitespace runs are one space first, so the scores equal
    # those of the one-line texts.
    messy = ["Blue Spice ||| is a pub\nnear the\r\nriver.", "The Punter\u2028serves cheap|||Italian food.", "|||"]
    flat = ["Blue Spice ||| is a pub near the river.", "The Punter serves cheap|||Italian food.", "|||"]
    references = [[REFERENCES[0][0], "A pub ||| near\nthe river: Blue Spice."], *REFERENCES[1:]]
    flat_references = [[REFERENCES[0][0], "A pub ||| near the river: Blue Spice."], *REFERENCES[1:]]
    assert scorer.score(messy, references) == scorer.score(flat, flat_references)
    assert 0 < scorer.score(messy, references)["meteor"] < 100


@needs_java
@java_timeout
def test_launcher_table(scorer, tmp_path, monkeypatch, capsys):
    launcher = load_launcher()
    monkeypatch.setattr(launcher, "score_e2e", scorer.score)  # the module's METEOR, not a second one
    references = tmp_path / "refs.txt"
    references.write_text("".join(f"mr {i}||{ref}\n" for i, group in enumerate(REFERENCES) for ref in group), encoding="utf-8")
    hypotheses = tmp_path / "hyps.txt"
    hypotheses.write_text("".join(f"{hyp}\n" for hyp in HYPOTHESES), encoding="utf-8")
    assert launcher.main(["--hypotheses", str(hypotheses), "--references", str(references)]) == 0
    titles, values = capsys.readouterr().out.splitlines()
    assert titles.split() == ["BLEU", "NIST", "METEOR", "ROUGE-L", "CIDEr"]
    scores = scorer.score(HYPOTHESES, REFERENCES)
    assert [float(value) for value in values.split()] == pytest.approx([scores[name] for name in METRIC_NAMES], abs=0.01)


@needs_java
@java_timeout
def test_closing_the_scorer_ends_meteor(scorer):
    scorer.score(HYPOTHESES[:2], REFERENCES[:2])  # METEOR runs (whichever test came first started it)
    assert len(child_processes("meteor-1.5.jar")) == 1
    scorer.close()
    assert child_processes("meteor-1.5.jar") == []
    scorer.close()  # idempotent; a later score would start a new METEOR


@needs_java
@java_timeout
def test_a_dead_meteor_fails_with_its_message(monkeypatch):
    monkeypatch.setattr(generation_metrics, "Meteor", DeadMeteor)
    with pytest.raises(RuntimeError, match=r"METEOR \(java\) failed: Exception in thread main: java.lang.OutOfMemoryError"):
        score_e2e(HYPOTHESES, REFERENCES)
    assert child_processes("OutOfMemoryError") == []


# -- the launcher ------------------------------------------------------------------------------------------


@needs_data
@pytest.mark.parametrize(
    "case, fault",
    [
        ("missing_hypotheses", "hypotheses file not found: {tmp}/nope.txt"),
        ("missing_references", "E2E file not found: {tmp}/nope.csv"),
        ("count", "{tmp}/hyps.txt: 3 hypothesis lines, but {data}/testset_w_refs.csv has 630 MRs"),
        ("malformed", "{tmp}/bad.csv, line 2: 3 fields, the header has 2"),
        ("inputs_only", "{data}/testset.csv: no reference column (ref or human_reference): inputs only"),
    ],
)
def test_launcher_bad_input(tmp_path, capsys, case, fault):
    (tmp_path / "hyps.txt").write_text("a\nb\nc\n", encoding="utf-8")
    (tmp_path / "bad.csv").write_text("mr,ref\nname[A],A.,x\n", encoding="utf-8")
    hypotheses, references = {
        "missing_hypotheses": ("nope.txt", E2E / "testset_w_refs.csv"),
        "missing_references": ("hyps.txt", tmp_path / "nope.csv"),
        "count": ("hyps.txt", E2E / "testset_w_refs.csv"),
        "malformed": ("hyps.txt", tmp_path / "bad.csv"),
        "inputs_only": ("hyps.txt", E2E / "testset.csv"),
    }[case]
    code = load_launcher().main(["--hypotheses", str(tmp_path / hypotheses), "--references", str(references), "--json"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.splitlines() == [f"score_e2e.py: error: {fault.format(tmp=tmp_path, data=E2E)}"]


@needs_java
@needs_data
@java_timeout
def test_launcher_scores_the_test_set_against_itself(tmp_path):
    # The first reference of each of the 630 test MRs as its hypothesis: BLEU, METEOR and ROUGE-L are 100; NIST
    # and CIDEr are those of e2e-metrics' measure_scores.py -p on the same input (14.232030974145921,
    # 3.4021384007557036; its Perl mteval: NIST 14.2365).
    hypotheses = tmp_path / "first_references.txt"
    hypotheses.write_text("".join(group.references[0] + "\n" for group in read_e2e(E2E / "testset_w_refs.csv")), encoding="utf-8")
    command = [sys.executable, "launchers/score_e2e.py", "--hypotheses", str(hypotheses), "--references"]
    command += [str(E2E / "testset_w_refs.csv"), "--json"]
    result = subprocess.run(command, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=170)
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)
    expected = {"bleu": 100.0, "nist": 14.232030974145921, "meteor": 100.0, "rouge_l": 100.0, "cider": 3.4021384007557036}
    assert list(scores) == list(METRIC_NAMES) and scores == pytest.approx(expected, rel=1e-9)
