"""The five metrics of the E2E NLG challenge, offline, as the LoRA and AdaMix papers report them.

The papers score with the challenge's own scorer, e2e-metrics' ``measure_scores.py -p``: every hypothesis
against ALL references of its MR (multi-reference; the E2E test set has 630 MRs with 1 to 45 references,
4,693 in all). Here:

* BLEU: ``sacrebleu`` (13a tokenisation, which is mteval-v13a's, lowercased), x100.
* NIST: our mteval-v13a NIST (``nist``): 5-grams, lowercased, mteval's tokenisation; raw (about 8 to 9 on E2E).
* METEOR 1.5, ROUGE-L and CIDEr: ``pycocoevalcap``'s scorers on its Stanford PTB tokenisation (lowercased,
  punctuation dropped), fed as ``measure_scores.py`` feeds them through ``COCOEvalCap``; METEOR and ROUGE-L
  x100, CIDEr raw. "CIDEr" is pycocoevalcap's ``Cider``, which is CIDEr-D of the coco-caption code (idf over
  the references of the whole corpus, clipped n-gram counts, a Gaussian length penalty with sigma 6, x10):
  what the challenge and the papers call CIDEr. Being corpus-relative, it is 0 for a corpus of one MR.

METEOR and the PTB tokenizer run Java (``java`` on PATH): METEOR as one process per ``E2EScorer`` (its start,
which loads METEOR's paraphrase table, takes 10-20 s; then the 630 test MRs score in 5-12 s on 2 cores), the
tokenizer once per call. Inputs are whitespace-normalised first (newlines and other line breaks
would break METEOR's line protocol and the tokenizer's line alignment), and ``|||``, METEOR's field
separator, is blanked out of what METEOR sees.
"""

from __future__ import annotations

import contextlib
import math
import subprocess
from collections import Counter
from collections.abc import Sequence
from types import TracebackType

from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
from sacrebleu.metrics import BLEU
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

__all__ = ["METRIC_NAMES", "E2EScorer", "bleu", "nist", "score_e2e"]

METRIC_NAMES = ("bleu", "nist", "meteor", "rouge_l", "cider")
# mteval-v13a's NIST brevity penalty exp(-beta * ln(ratio)^2) is 0.5 at a length ratio of 2/3.
NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2
METEOR_SEPARATOR = "|||"

_tokenize_13a = Tokenizer13a()


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _checked(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[list[str], list[list[str]]]:
    if isinstance(hypotheses, str):
        raise TypeError("hypotheses must be a sequence of strings, not one string")
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference groups: one group per hypothesis")
    if not hypotheses:
        raise ValueError("no hypotheses to score")
    groups = []
    for index, group in enumerate(references):
        if isinstance(group, str):
            raise TypeError(f"references[{index}] is a string: each hypothesis needs a sequence of references")
        group = [_normalise(reference) for reference in group]
        if not group:
            raise ValueError(f"references[{index}] has no reference: every hypothesis needs at least one")
        if not all(group):
            raise ValueError(f"references[{index}] holds an empty reference")
        groups.append(group)
    return [_normalise(hypothesis) for hypothesis in hypotheses], groups


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU x100 of ``hypotheses[i]`` against all of ``references[i]``: sacrebleu, 13a, lowercased."""
    hyps, groups = _checked(hypotheses, references)
    # sacrebleu takes one stream per reference position. Where an MR has fewer references the stream holds None,
    # which sacrebleu drops; '' would stay a reference of length 0 and could become the "closest" reference
    # length of a short hypothesis, lowering the brevity penalty's reference length.
    depth = max(map(len, groups))
    streams = [[group[k] if k < len(group) else None for group in groups] for k in range(depth)]
    # force: outputs of models trained on the PTB-tokenised LoRA files look tokenised; 13a applies on top, as in
    # the challenge's scorer, and sacrebleu's warning about it would only be noise.
    return BLEU(lowercase=True, force=True, tokenize="13a").corpus_score(hyps, streams).score


def _mteval_tokens(text: str) -> list[str]:
    return _tokenize_13a(text.lower()).split()


def _ngrams(tokens: list[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


def _nist_length_penalty(ratio: float) -> float:
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    return math.exp(-NIST_BETA * math.log(ratio) ** 2)


def nist(hypotheses: Sequence[str], references: Sequence[Sequence[str]], n: int = 5) -> float:
    """Corpus NIST of mteval-v13a (Doddington, 2002) with a variable number of references per hypothesis.

    Lowercased, tokenised as mteval-v13a (sacrebleu's ``13a``). The information weight of an n-gram,
    ``log2(count(w1..wn-1) / count(w1..wn))`` (``log2(words / count(w))`` for a unigram), counts over every
    reference of every hypothesis. A hypothesis n-gram scores its weight times its count clipped to its largest
    count in one reference of that hypothesis; per order, the summed weights over all hypotheses are divided by
    the number of hypothesis n-grams, and the orders 1..n summed. The brevity penalty
    ``exp(-beta * ln(ratio)^2)`` (1 from ratio 1 up, 0.5 at 2/3) takes ratio = hypothesis words / reference
    length, the reference length being the sum over hypotheses of the average length of their references.

    That reference length is what mteval-v13a computes for a constant number of references and what
    e2e-metrics' Python port (``pymteval``, used by ``measure_scores.py -p`` and so by the LoRA and AdaMix
    papers) computes for a variable one. The Perl script edited for the challenge (``mteval-v13a-sig.pl``)
    divides all reference words by the average number of references per hypothesis instead; the two differ
    when the reference lengths of MRs with many references differ from those with few.
    """
    if n < 1:
        raise ValueError(f"NIST needs n >= 1, got {n}")
    hyps, groups = _checked(hypotheses, references)
    hyp_tokens = [_mteval_tokens(hyp) for hyp in hyps]
    ref_tokens = [[_mteval_tokens(ref) for ref in group] for group in groups]
    ref_ngrams = [[_ngrams(ref, n) for ref in group] for group in ref_tokens]
    # The empty n-gram counts the reference words, the "prefix" count of a unigram.
    corpus: Counter[tuple[str, ...]] = Counter()
    for tokens_group, ngrams_group in zip(ref_tokens, ref_ngrams, strict=True):
        for tokens, ngrams in zip(tokens_group, ngrams_group, strict=True):
            corpus[()] += len(tokens)
            corpus.update(ngrams)
    matched_info = [0.0] * n
    hyp_ngram_count = [0] * n
    ref_length = 0.0
    for tokens, tokens_group, ngrams_group in zip(hyp_tokens, ref_tokens, ref_ngrams, strict=True):
        clip: Counter[tuple[str, ...]] = Counter()
        for ngrams in ngrams_group:
            clip |= ngrams
        for ngram, count in _ngrams(tokens, n).items():
            hits = min(count, clip[ngram])
            if hits:
                matched_info[len(ngram) - 1] += hits * math.log2(corpus[ngram[:-1]] / corpus[ngram])
        for k in range(n):
            hyp_ngram_count[k] += max(len(tokens) - k, 0)
        ref_length += sum(map(len, tokens_group)) / len(tokens_group)
    precision = sum(info / max(count, 1) for info, count in zip(matched_info, hyp_ngram_count, strict=True))
    return precision * _nist_length_penalty(hyp_ngram_count[0] / ref_length)


class E2EScorer:
    """The E2E metrics with one METEOR (Java) process kept across ``score`` calls; a context manager.

    Starting METEOR takes 10-20 s, so score many corpora (per-epoch validation, tests) with one scorer;
    ``close`` (or leaving the ``with`` block) ends the process.
    """

    def __init__(self) -> None:
        self._meteor: Meteor | None = None

    def __enter__(self) -> E2EScorer:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.close()

    def score(self, hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
        """The five metrics, keys ``METRIC_NAMES``; see ``score_e2e``."""
        hyps, groups = _checked(hypotheses, references)
        res, gts = _ptb_tokenize(hyps, groups)
        return {
            "bleu": bleu(hyps, groups),
            "nist": nist(hyps, groups),
            "meteor": 100 * self._meteor_score(res, gts),
            "rouge_l": 100 * float(Rouge().compute_score(gts, res)[0]),
            "cider": float(Cider().compute_score(gts, res)[0]),
        }

    def _meteor_score(self, res: dict[int, list[str]], gts: dict[int, list[str]]) -> float:
        if self._meteor is None:
            self._meteor = Meteor()
        # One line per request, fields split at "|||": the texts hold no line breaks (normalised), and no "|||"
        # may remain. The PTB tokenizer splits it into "| | |" today; pycocoevalcap would drop it from
        # hypotheses only, gluing the words around it. Blanking it here keeps the protocol whole regardless.
        res = {key: [_normalise(text.replace(METEOR_SEPARATOR, " ")) for text in texts] for key, texts in res.items()}
        gts = {key: [_normalise(text.replace(METEOR_SEPARATOR, " ")) for text in texts] for key, texts in gts.items()}
        try:
            return float(self._meteor.compute_score(gts, res)[0])
        except (OSError, ValueError) as error:  # a dead process: a broken pipe, or '' read back as a score
            detail = " ".join(self._stop_meteor().split()[-40:])
            raise RuntimeError(f"METEOR (java) failed: {detail or error}") from error

    def close(self) -> None:
        """End the METEOR process, if one was started; the scorer can start another later."""
        if self._meteor is not None:
            self._stop_meteor()

    def _stop_meteor(self) -> str:
        """End METEOR, reap it and return what it wrote on stderr."""
        meteor, self._meteor = self._meteor, None
        # A failed compute_score leaves its lock held, and pycocoevalcap's __del__ would then wait on it forever.
        if meteor.lock.locked():
            meteor.lock.release()
        process = meteor.meteor_p
        with contextlib.suppress(BrokenPipeError):  # from flushing a request to a METEOR that died
            process.stdin.close()  # METEOR's stdio loop ends at the end of its input
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        detail = process.stderr.read().decode(errors="replace")
        process.stdout.close()
        process.stderr.close()
        return detail


def _ptb_tokenize(hyps: list[str], groups: list[list[str]]) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """PTBTokenizer's output for the hypotheses and the references, keyed by position, in one Java run."""
    captions = {("hyp", i): [{"caption": hyp}] for i, hyp in enumerate(hyps)}
    captions.update({("ref", i): [{"caption": ref} for ref in group] for i, group in enumerate(groups)})
    tokenized = PTBTokenizer().tokenize(captions)
    # PTBTokenizer pairs output lines with inputs by position (zip): check that none went missing.
    if any(len(tokenized.get(key, ())) != len(texts) for key, texts in captions.items()):
        raise RuntimeError("the Stanford PTB tokenizer (java) returned fewer lines than it was given")
    return (
        {i: tokenized[("hyp", i)] for i in range(len(hyps))},
        {i: tokenized[("ref", i)] for i in range(len(groups))},
    )


def score_e2e(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """The five metrics of ``hypotheses[i]`` against all of ``references[i]`` (multi-reference), as the
    AdaMix/LoRA papers report them: ``bleu``, ``meteor``, ``rouge_l`` x100; ``nist``, ``cider`` raw.

    Keys are ``METRIC_NAMES``. An empty hypothesis scores (zero matches), it does not fail. Raises
    ``ValueError`` when the counts of hypotheses and reference groups differ (naming both), when there is no
    hypothesis, or when a group has no reference or an empty one. Starts METEOR for this call only: use an
    ``E2EScorer`` to score several corpora.
    """
    with E2EScorer() as scorer:
        return scorer.score(hypotheses, references)
