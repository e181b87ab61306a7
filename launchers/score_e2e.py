#!/usr/bin/env python
"""Score E2E NLG outputs with the challenge's five metrics (BLEU, NIST, METEOR, ROUGE-L, CIDEr), offline.

    python launchers/score_e2e.py --hypotheses predictions_test.txt --references ../shared/data/e2e/testset_w_refs.csv
    python launchers/score_e2e.py --hypotheses OUT/predictions_test.txt --references ../shared/data/e2e/lora_test.txt --json

The hypotheses file holds one line per distinct MR of the reference file, in the order in which the MRs first
appear there (the file e2e-metrics' measure_scores.py reads: 630 lines for the test set). The reference file
is any E2E file, the challenge's CSV or the LoRA ``mr || text`` lines (adamix_ds.data.e2e). Prints a table,
or with --json one object keyed bleu, nist, meteor, rouge_l, cider (BLEU, METEOR, ROUGE-L x100; NIST and CIDEr
raw), as adamix_ds.data.generation_metrics.score_e2e computes them. Needs java (METEOR, the PTB tokenizer).
Bad input (a missing or malformed file, a line count that is not the MR count): one line on stderr, exit 2.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from adamix_ds.data.e2e import group_pairs, read_e2e_pairs, read_hypotheses
from adamix_ds.data.generation_metrics import METRIC_NAMES, score_e2e

# Table columns: the papers' names, and the digits of e2e-metrics' "%.4f" (of fractions for BLEU, METEOR, ROUGE-L).
COLUMNS = {"bleu": ("BLEU", 2), "nist": ("NIST", 4), "meteor": ("METEOR", 2), "rouge_l": ("ROUGE-L", 2), "cider": ("CIDEr", 4)}


@dataclass
class ScoreArguments:
    """What to score against what."""

    hypotheses: str = field(metadata={"help": "one output per line, one line per MR of --references, in its order"})
    references: str = field(metadata={"help": "an E2E file: CSV (mr,ref) or the LoRA 'mr || text' lines (.txt)"})
    json: bool = field(default=False, metadata={"help": "print one JSON object instead of a table"})


def format_table(scores: dict[str, float]) -> str:
    """Two aligned lines: the metric names and their values."""
    titles = "  ".join(f"{COLUMNS[name][0]:>8}" for name in METRIC_NAMES)
    values = "  ".join(f"{scores[name]:>8.{COLUMNS[name][1]}f}" for name in METRIC_NAMES)
    return f"{titles}\n{values}"


def main(argv: list[str] | None = None) -> int:
    """Score and print; 2 after one line on stderr for bad input (argparse's own errors exit 2 too)."""
    (options,) = HfArgumentParser(ScoreArguments, prog="score_e2e.py", description=__doc__.split("\n\n")[0]).parse_args_into_dataclasses(
        argv
    )
    # Not adamix_ds.training.usage_errors: importing that package imports DeepSpeed, slow, and its accelerator
    # notice on stdout would spoil --json.
    try:
        hypotheses_path, references_path = Path(options.hypotheses), Path(options.references)
        groups = group_pairs(read_e2e_pairs(references_path))
        hypotheses = read_hypotheses(hypotheses_path)
        if len(hypotheses) != len(groups):
            raise ValueError(f"{hypotheses_path}: {len(hypotheses)} hypothesis lines, but {references_path} has {len(groups)} MRs")
        scores = score_e2e(hypotheses, [group.references for group in groups])
    except (ValueError, OSError) as error:
        print(f"score_e2e.py: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print(json.dumps(scores) if options.json else format_table(scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
