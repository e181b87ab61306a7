"""The E2E NLG challenge data (Novikova et al., 2017): meaning representations (MRs) and their references.

Two file formats are read:

* the challenge's CSV (``devset.csv``, ``testset_w_refs.csv``): a header naming an MR column (``mr``, or the
  Hub's ``meaning_representation``) and a reference column (``ref``, or ``human_reference``), matched without
  regard to case, quoted or not; other columns are ignored. ``testset.csv`` has only the MR column: its MRs
  can be read (``read_e2e``), but it has no references (``read_e2e_pairs`` refuses it).
* the one-line ``mr || text`` format of the LoRA/AdaMix GPT-2 code (``lora_valid.txt``, ``lora_test.txt``),
  where the MR is rewritten (``name : Blue Spice | Type : pub``) and the text is PTB-tokenised.

A ``.txt`` file is read as lines, a ``.csv`` file as CSV; any other name by its first line (a ``||`` in it
means lines). Blank lines are skipped; surrounding whitespace of MRs and references is stripped. Anything
else that is malformed raises ``ValueError`` with one line naming the file, the line number and the fault.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["E2EGroup", "group_pairs", "read_e2e", "read_e2e_pairs", "read_hypotheses"]

MR_COLUMNS = ("mr", "meaning_representation")
REF_COLUMNS = ("ref", "human_reference")
LINE_SEPARATOR = "||"


@dataclass(frozen=True)
class E2EGroup:
    """One meaning representation and all of its references, in file order."""

    mr: str
    references: tuple[str, ...]


# (mr, reference) of one row; the reference is None where the file has no reference column.
_Row = tuple[str, str | None]


def _fail(path: Path, line: int, what: str) -> ValueError:
    return ValueError(f"{path}, line {line}: {what}")


def _decode(path: Path, what: str = "E2E file") -> str:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise _fail(path, data.count(b"\n", 0, error.start) + 1, f"not UTF-8 text (byte {data[error.start]:#04x})") from None


def _column(header: list[str], names: tuple[str, ...], path: Path, line: int) -> int | None:
    found = [index for index, name in enumerate(header) if name.strip().lower() in names]
    if len(found) > 1:
        raise _fail(path, line, f"more than one column named {' or '.join(names)} in the header {header}")
    return found[0] if found else None


def _csv_rows(path: Path, text: str) -> list[_Row]:
    # strict: a stray or unclosed quote is an error instead of a field that swallows the following lines.
    # newline="": lines end at \n, \r or \r\n only, as csv expects (str.splitlines also splits at \x0c, \u2028...).
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows: list[_Row] = []
    mr_col = ref_col = width = None
    next_line = 1  # where the next record starts (a quoted field may span lines)
    try:
        for fields in reader:
            line, next_line = next_line, reader.line_num + 1
            if len(fields) <= 1 and not "".join(fields).strip():
                continue  # a blank line; a line of empty fields (",") is a row and fails below
            if width is None:
                mr_col = _column(fields, MR_COLUMNS, path, line)
                if mr_col is None:
                    raise _fail(path, line, f"no header with an MR column ({' or '.join(MR_COLUMNS)}): found {fields}")
                ref_col = _column(fields, REF_COLUMNS, path, line)
                width = len(fields)
            elif len(fields) != width:
                raise _fail(path, line, f"{len(fields)} fields, the header has {width}")
            else:
                rows.append(_row(path, line, fields[mr_col], None if ref_col is None else fields[ref_col]))
    except csv.Error as error:
        raise _fail(path, next_line, f"bad CSV ({error})") from None
    if width is None:
        raise _fail(path, 1, "empty file: no header")
    return rows


def _line_rows(path: Path, text: str) -> list[_Row]:
    rows = []
    for line, content in enumerate(text.split("\n"), start=1):
        if not content.strip():
            continue
        fields = content.split(LINE_SEPARATOR)
        if len(fields) != 2:
            raise _fail(path, line, f"expected one {LINE_SEPARATOR!r} between MR and text, found {len(fields) - 1}")
        rows.append(_row(path, line, *fields))
    return rows


def _row(path: Path, line: int, mr: str, reference: str | None) -> _Row:
    mr = mr.strip()
    if not mr:
        raise _fail(path, line, "empty MR")
    if reference is not None:
        reference = reference.strip()
        if not reference:
            raise _fail(path, line, "empty reference")
    return mr, reference


def _read_rows(path: Path) -> list[_Row]:
    text = _decode(path)
    suffix = path.suffix.lower()
    as_lines = suffix == ".txt" or (suffix != ".csv" and LINE_SEPARATOR in text.split("\n", 1)[0])
    rows = _line_rows(path, text) if as_lines else _csv_rows(path, text)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def read_e2e_pairs(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """Every ``(mr, reference)`` row of an E2E file (either format, see the module docstring), in file order.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a malformed one, or for a file
    with no reference column (``testset.csv``: nothing to train on or score against; ``read_e2e`` reads
    its MRs).
    """
    path = Path(path)
    rows = _read_rows(path)
    if rows[0][1] is None:
        raise ValueError(f"{path}: no reference column ({' or '.join(REF_COLUMNS)}): inputs only")
    return rows


def group_pairs(pairs: Iterable[tuple[str, str | None]]) -> list[E2EGroup]:
    """``(mr, reference)`` pairs grouped by MR, groups in order of first appearance, references in input order.

    A ``None`` reference adds its MR with no reference (how ``read_e2e`` lists an inputs-only file).
    """
    groups: dict[str, list[str]] = {}
    for mr, reference in pairs:
        references = groups.setdefault(mr, [])
        if reference is not None:
            references.append(reference)
    return [E2EGroup(mr, tuple(references)) for mr, references in groups.items()]


def read_e2e(path: str | os.PathLike[str]) -> list[E2EGroup]:
    """The rows of an E2E file grouped by MR (``group_pairs``): 547 groups for the dev set, 630 for the test set.

    An inputs-only file (``testset.csv``) gives its MRs with empty ``references``. Raises like
    ``read_e2e_pairs`` for a missing or malformed file.
    """
    return group_pairs(_read_rows(Path(path)))


def read_hypotheses(path: str | os.PathLike[str]) -> list[str]:
    """System outputs as e2e-metrics reads them: one per line (stripped), one line per MR in reference-file order.

    A blank line is an empty output (it scores zero, it is not skipped). Raises ``FileNotFoundError`` for a
    missing file and ``ValueError`` (file and line) for bytes that are not UTF-8.
    """
    # Lines end at \n only: str.splitlines would also split an output at \x0c, \x85 or \u2028.
    lines = _decode(Path(path), "hypotheses file").split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.strip() for line in lines]
