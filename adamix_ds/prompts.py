"""Prompt templates and label words for prompt-based fine-tuning (LM-BFF, Gao et al. 2021; LiST, Wang et al. 2021).

A ``Template`` renders an example into token ids with one slot, the mask; ``label_word_ids`` maps each label
to one vocabulary token whose logit at the slot scores that label. Two template syntaxes are accepted:

- LM-BFF's, as published (``*cls**sent_0*_It_was*mask*.*sep+*``): parts between ``*``; ``cls``, ``mask``,
  ``sep``, ``sep+`` (a separator that starts a new segment), sentence ``i`` as ``sent_i`` with the modifiers
  ``+`` (a space before it), ``l``/``u`` (lower/upper-case its first character) and ``-`` (drop its last
  character): ``+sentl_1``, ``sent-_0``; any other part is literal text, ``_`` for a space.
- a readable one (``{sentence} It was {mask}.``): literal text with placeholders ``{mask}``, ``{cls}``,
  ``{sep}``, a text column of the task (``{sentence1}``) or an LM-BFF sentence part (``{+sentl_1}``).
  Whitespace before a placeholder moves into it (a sentence gets a leading space; a label word carries its
  own). Without ``{cls}``/``{sep}`` the tokenizer's own special tokens frame the input.

For a causal LM the label word is the next token after the input, so the mask must come last. A template
whose mask does not (RTE's ``*cls**sent-_0*?*mask*,*+sentl_1**sep+*``) is reordered: what follows the mask
up to its last sentence moves in front of the literal text that precedes the mask, the rest (``.``,
``*sep+*``) is dropped; RTE reads ``premise, hypothesis? Yes``. Moving the text keeps one forward pass per
example and every sentence before the prediction, where scoring each filled-in label word separately would
cost one pass per label.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, replace

from transformers import PreTrainedTokenizerBase

from adamix_ds.data.tasks import TaskSpec

__all__ = [
    "BUILTIN_PROMPTS",
    "Part",
    "PromptEncoder",
    "Template",
    "label_word_ids",
    "parse_label_words",
    "prompt_setup",
    "resolve_label_words",
]

# LM-BFF's manual templates and label words (princeton-nlp/LM-BFF, run_experiment.sh, the TEMPLATE and
# MAPPING of each task), which LiST and AdaMix's few-shot study use. Label words are keyed as in LM-BFF: by
# the label as written in the task's files (STS-B: its low and high pole).
BUILTIN_PROMPTS: dict[str, tuple[str, dict[str, str]]] = {
    "sst2": ("*cls**sent_0*_It_was*mask*.*sep+*", {"0": "terrible", "1": "great"}),
    "sst5": ("*cls**sent_0*_It_was*mask*.*sep+*", {"0": "terrible", "1": "bad", "2": "okay", "3": "good", "4": "great"}),
    "mr": ("*cls**sent_0*_It_was*mask*.*sep+*", {"0": "terrible", "1": "great"}),
    "cr": ("*cls**sent_0*_It_was*mask*.*sep+*", {"0": "terrible", "1": "great"}),
    "mpqa": ("*cls**sent_0*_It_was*mask*.*sep+*", {"0": "terrible", "1": "great"}),
    "subj": ("*cls**sent_0*_This_is*mask*.*sep+*", {"0": "subjective", "1": "objective"}),
    "trec": (
        "*cls**mask*:*+sent_0**sep+*",
        {"0": "Description", "1": "Entity", "2": "Expression", "3": "Human", "4": "Location", "5": "Number"},
    ),
    "cola": ("*cls**sent_0*_This_is*mask*.*sep+*", {"0": "incorrect", "1": "correct"}),
    "mrpc": ("*cls**sent_0**mask*,*+sentl_1**sep+*", {"0": "No", "1": "Yes"}),
    "qqp": ("*cls**sent_0**mask*,*+sentl_1**sep+*", {"0": "No", "1": "Yes"}),
    "stsb": ("*cls**sent_0**mask*,*+sentl_1**sep+*", {"0": "No", "1": "Yes"}),
    "mnli": ("*cls**sent-_0*?*mask*,*+sentl_1**sep+*", {"contradiction": "No", "entailment": "Yes", "neutral": "Maybe"}),
    "snli": ("*cls**sent-_0*?*mask*,*+sentl_1**sep+*", {"contradiction": "No", "entailment": "Yes", "neutral": "Maybe"}),
    "qnli": ("*cls**sent-_0*?*mask*,*+sentl_1**sep+*", {"not_entailment": "No", "entailment": "Yes"}),
    "rte": ("*cls**sent-_0*?*mask*,*+sentl_1**sep+*", {"not_entailment": "No", "entailment": "Yes"}),
}

_SENTENCE = re.compile(r"(\+)?sent([lu])?(-)?_(\d+)")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
# The two poles of a regression task's label words (LM-BFF: '0' low, '1' high).
REGRESSION_POLES = ("0", "1")


@dataclass(frozen=True)
class Part:
    """One piece of a template: literal ``text``, a ``sentence``, the ``mask``, ``cls`` or ``sep``."""

    kind: str
    text: str = ""
    sentence: int = -1
    space: bool = False
    case: str = ""
    drop_last: bool = False
    new_segment: bool = False

    def fill(self, texts: list[str]) -> str:
        """The text of a sentence part for an example's ``texts``, with its modifiers applied."""
        text = texts[self.sentence]
        if self.case == "l":
            text = text[:1].lower() + text[1:]
        elif self.case == "u":
            text = text[:1].upper() + text[1:]
        if self.drop_last:
            text = text[:-1]
        return " " + text if self.space else text


@dataclass(frozen=True)
class Template:
    """A parsed template: its ``parts`` (exactly one mask), the ``source`` text it was parsed from, and
    whether the tokenizer's own special tokens frame it (``wrap``: the readable syntax without cls/sep)."""

    source: str
    parts: tuple[Part, ...]
    wrap: bool

    @classmethod
    def parse(cls, source: str, spec: TaskSpec) -> Template:
        """Parse LM-BFF's syntax (any ``*``) or the readable one for ``spec``'s text columns.

        ``ValueError`` names the template and what is wrong: no mask or several, an unknown placeholder, a
        sentence the task lacks.
        """
        lmbff = "*" in source
        parts = _parse_lmbff(source) if lmbff else _parse_readable(source, spec)
        masks = sum(part.kind == "mask" for part in parts)
        if masks != 1:
            example = "*mask*" if lmbff else "{mask}"
            raise ValueError(f"template={source!r} has {masks} masks: allowed exactly one ({example}), where the label word goes")
        for part in parts:
            if part.kind == "sentence" and part.sentence >= len(spec.text_columns):
                raise ValueError(
                    f"template={source!r} names sentence {part.sentence}, but task {spec.name} has {len(spec.text_columns)} "
                    f"({', '.join(f'sent_{i} = {c}' for i, c in enumerate(spec.text_columns))})"
                )
        wrap = not lmbff and not any(part.kind in ("cls", "sep") for part in parts)
        return cls(source, tuple(parts), wrap)

    def for_causal_lm(self) -> Template:
        """The template with its mask last (see the module docstring for how the rest is reordered)."""
        at = next(i for i, part in enumerate(self.parts) if part.kind == "mask")
        after = self.parts[at + 1 :]
        sentences = [i for i, part in enumerate(after) if part.kind == "sentence"]
        moved = after[: sentences[-1] + 1] if sentences else ()
        before = self.parts[:at]
        insert_at = at - 1 if at > 0 and before[-1].kind == "text" else at
        parts = (*before[:insert_at], *moved, *before[insert_at:], self.parts[at])
        return replace(self, parts=tuple(parts))


def _lmbff_part(name: str) -> Part:
    if name == "mask":
        return Part("mask")
    if name == "cls":
        return Part("cls")
    if name in ("sep", "sep+"):
        return Part("sep", new_segment=name == "sep+")
    match = _SENTENCE.fullmatch(name)
    if match:
        space, case, drop, index = match.groups()
        return Part("sentence", sentence=int(index), space=bool(space), case=case or "", drop_last=bool(drop))
    return Part("text", text=name.replace("_", " "))


def _parse_lmbff(source: str) -> list[Part]:
    return [_lmbff_part(name) for name in source.split("*") if name]


def _parse_readable(source: str, spec: TaskSpec) -> list[Part]:
    columns = {column: i for i, column in enumerate(spec.text_columns)}
    parts: list[Part] = []
    position = 0
    for match in _PLACEHOLDER.finditer(source):
        literal, name = source[position : match.start()], match.group(1).strip()
        position = match.end()
        if name in columns:
            part = Part("sentence", sentence=columns[name])
        elif name in ("mask", "cls", "sep", "sep+") or _SENTENCE.fullmatch(name):
            part = _lmbff_part(name)
        else:
            allowed = ", ".join(f"{{{n}}}" for n in (*columns, "mask", "cls", "sep", "sent_0"))
            raise ValueError(f"template={source!r} has an unknown placeholder {{{name}}}: allowed {allowed}")
        stripped = literal.rstrip()
        if part.kind in ("sentence", "mask") and stripped != literal:
            literal = stripped
            if part.kind == "sentence":
                part = replace(part, space=True)
        if literal:
            parts.append(Part("text", text=literal))
        parts.append(part)
    if source[position:]:
        parts.append(Part("text", text=source[position:]))
    return parts


class PromptEncoder:
    """Renders examples through a ``Template`` with a tokenizer: token ids, attention mask, token types where
    the tokenizer has them, and ``mask_position``, the position whose logits score the label words (the mask
    token of a masked LM; the last token for a causal LM, whose input ends before the label word)."""

    def __init__(self, template: Template, tokenizer: PreTrainedTokenizerBase, causal: bool, max_length: int) -> None:
        self.template = template.for_causal_lm() if causal else template
        self.tokenizer = tokenizer
        self.causal = causal
        self.max_length = max_length
        if not causal and tokenizer.mask_token_id is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no mask token: a masked-LM prompt needs one")
        # The tokenizer's frame around one placeholder token: ([CLS], [SEP]) for BERT, (<s>, </s>) for
        # RoBERTa, a BOS for Llama, nothing for GPT-2. *cls* is the frame's start.
        bare = tokenizer.encode("a", add_special_tokens=False)
        framed = tokenizer.encode("a")
        start = next(i for i in range(len(framed) - len(bare) + 1) if framed[i : i + len(bare)] == bare)
        self.prefix, self.suffix = framed[:start], framed[start + len(bare) :]
        self.with_types = "token_type_ids" in tokenizer.model_input_names

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def __call__(self, texts: list[str]) -> dict[str, list[int] | int]:
        """One example (its text columns in order) as model inputs."""
        pieces: list[tuple[list[int], int, bool]] = []  # tokens, segment, is a sentence
        segment = 0
        parts = self.template.parts[:-1] if self.causal else self.template.parts  # a causal input ends before the mask
        for part in parts:
            if part.kind == "text":
                tokens = self._encode(part.text)
            elif part.kind == "sentence":
                tokens = self._encode(part.fill(texts))
            elif part.kind == "mask":
                tokens = [self.tokenizer.mask_token_id]
            elif part.kind == "cls":
                tokens = list(self.prefix)
            else:
                tokens = [] if self.tokenizer.sep_token_id is None else [self.tokenizer.sep_token_id]
            pieces.append((tokens, segment, part.kind == "sentence"))
            segment += part.new_segment
        if self.template.wrap:
            pieces = [(list(self.prefix), 0, False), *pieces, (list(self.suffix), segment, False)]
        _truncate(pieces, self.max_length, self.template.source)
        input_ids = [token for tokens, _, _ in pieces for token in tokens]
        result: dict[str, list[int] | int] = {"input_ids": input_ids, "attention_mask": [1] * len(input_ids)}
        if self.with_types:
            result["token_type_ids"] = [seg for tokens, seg, _ in pieces for _ in tokens]
        if self.causal:
            result["mask_position"] = len(input_ids) - 1
        else:
            result["mask_position"] = input_ids.index(self.tokenizer.mask_token_id)
        return result

    def batch(self, columns: list[list[str]]) -> dict[str, list]:
        """``__call__`` over a batch of text columns (``datasets.Dataset.map(batched=True)``)."""
        rows = [self(list(texts)) for texts in zip(*columns, strict=True)]
        return {key: [row[key] for row in rows] for key in rows[0]}


def _truncate(pieces: list[tuple[list[int], int, bool]], max_length: int, source: str) -> None:
    """Cut the longest sentence's tail until the input fits: the template, its mask included, stays whole."""
    excess = sum(len(tokens) for tokens, _, _ in pieces) - max_length
    sentences = [tokens for tokens, _, is_sentence in pieces if is_sentence]
    while excess > 0:
        longest = max(sentences, key=len, default=None)
        if not longest:
            raise ValueError(f"template={source!r} alone is longer than max_seq_length={max_length} tokens")
        del longest[-1]
        excess -= 1


def parse_label_words(text: str) -> dict[str, str]:
    """``--label_words``: a JSON object, or LM-BFF's Python-dict mapping (``{'0':'terrible','1':'great'}``)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = None
    if not isinstance(value, dict) or not all(isinstance(word, str) and word for word in value.values()):
        raise ValueError(
            f'label_words={text!r} is invalid: allowed a JSON object label -> word, e.g. \'{{"0": "terrible", "1": "great"}}\''
        )
    return {str(key): word for key, word in value.items()}


def resolve_label_words(words: dict[str, str], spec: TaskSpec) -> list[str]:
    """The label word of each label id of ``spec``, in id order; a regression task's two poles (low, high).

    A label is named as in the task's files (``"0"``, ``"entailment"``), by its class name or by its id.
    ``ValueError`` names a label without a word or a key that is no label.
    """
    if spec.is_regression:
        names = [(pole,) for pole in REGRESSION_POLES]
    else:
        names = [
            tuple(dict.fromkeys((raw, name, str(i)))) for i, (raw, name) in enumerate(zip(spec.file_labels, spec.label_names, strict=True))
        ]
    known = {alias for aliases in names for alias in aliases}
    unknown = sorted(set(words) - known)
    if unknown:
        raise ValueError(f"label_words names {unknown[0]!r}, which is no label of {spec.name}: allowed {', '.join(a[0] for a in names)}")
    resolved = []
    for aliases in names:
        given = [words[a] for a in aliases if a in words]
        if not given:
            raise ValueError(
                f"label_words has no word for label {aliases[0]!r} of {spec.name}: give one for each of {', '.join(a[0] for a in names)}"
            )
        resolved.append(given[0])
    return resolved


def label_word_ids(words: list[str], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The vocabulary id of each label word, as LM-BFF reads them: with a leading space (unless it starts with
    ``<``, ``[``, ``.`` or ``,``), which must be exactly one known token; ``ValueError`` names the word otherwise."""
    ids = []
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    for word in words:
        text = word if word[0] in "<[.," else " " + word
        tokens = tokenizer.encode(text, add_special_tokens=False)
        if len(tokens) != 1 or tokens[0] == tokenizer.unk_token_id:
            raise ValueError(
                f"label word {word!r} is not one token of the tokenizer {name} ({text!r} -> {tokenizer.convert_ids_to_tokens(tokens)}): "
                "choose a word that is"
            )
        ids.append(tokens[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"label words {words} are not distinct tokens of the tokenizer {name}")
    return ids


def prompt_setup(spec: TaskSpec, template: str | None, label_words: dict[str, str] | None) -> tuple[Template, list[str]]:
    """The parsed template and the label word of each label of ``spec``: the given ones, else the task's
    built-in LM-BFF prompt. ``ValueError`` names what is missing or wrong; no tokenizer is needed."""
    builtin = BUILTIN_PROMPTS.get(spec.name)
    if builtin is None and (template is None or label_words is None):
        raise ValueError(
            f"task {spec.name} has no built-in prompt (built-in: {', '.join(BUILTIN_PROMPTS)}): pass --template and --label_words"
        )
    template = template if template is not None else builtin[0]
    label_words = label_words if label_words is not None else builtin[1]
    return Template.parse(template, spec), resolve_label_words(label_words, spec)
