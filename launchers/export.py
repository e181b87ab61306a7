#!/usr/bin/env python
"""Export a trained adapter for use without adamix-ds, or as a merged AdaMix folder; optionally upload it to the Hub.

    python launchers/export.py --adapter_name_or_path OUT/adapter --format transformers --output_dir OUT/plain
    python launchers/export.py --adapter_name_or_path OUT/adapter --format peft --output_dir OUT/peft
    python launchers/export.py --adapter_name_or_path OUT/experts --format adamix --output_dir OUT/merged --push_to_hub --hub_model_id me/sst2-adamix

``transformers``: AdaMix-LoRA merged and folded into the frozen weights, written with ``save_pretrained`` and the
tokenizer (``AutoModelFor*.from_pretrained`` loads it; a bottleneck adapter cannot be folded). ``peft``: a PEFT LoRA
adapter (``PeftModel.from_pretrained`` on the backbone). ``adamix``: the merged adapter folder with its model card.
The folder appears whole or not at all; bad input ends with one line and exit code 2, a failed upload with one line
and exit code 1 (the folder is kept).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from adamix_ds.config import AdaMixConfig
from adamix_ds.hub import push_folder
from adamix_ds.io import export_peft, export_transformers, save_adapter
from adamix_ds.training import usage_errors
from adamix_ds.training.inference_arguments import parse_export_args
from adamix_ds.training.runtime import logger, start_launcher

# Formats that hold each adapter type: a bottleneck adapter has an activation between its projections, so neither
# a folded backbone nor a PEFT LoRA can hold it.
FORMATS = {"lora": ("transformers", "peft", "adamix"), "bottleneck": ("adamix",)}


def main(argv: list[str] | None = None) -> None:
    env, _ = start_launcher()
    with usage_errors(env, prog="export.py"):
        run = parse_export_args(argv)
        args, export = run.adapter, run.export
        config = AdaMixConfig.load(args.adapter_name_or_path) if Path(args.adapter_name_or_path).is_dir() else None
        if config is not None and export.format not in FORMATS[config.adapter_type]:
            raise ValueError(
                f"format={export.format} cannot hold a {config.adapter_type} adapter (it cannot be folded: an activation sits between "
                f"its projections): allowed {', '.join(FORMATS[config.adapter_type])}"
            )
        adapter = args.load()
        output = Path(export.output_dir)
        if export.format == "transformers":
            export_transformers(adapter.model, output, adapter.tokenizer)
        elif export.format == "peft":
            export_peft(adapter.model, output)
        else:
            # The run's final metrics (OUT/metrics.json beside OUT/experts) go into the card when there are some.
            metrics_file = adapter.path.parent / "metrics.json"
            metrics = json.loads(metrics_file.read_text()).get("final") if metrics_file.is_file() else None
            save_adapter(adapter.model, output, merged=True, metrics=metrics)
    logger.info("wrote %s (%s)", output, export.format)
    if export.push_to_hub:
        try:
            logger.info("uploaded %s: %s", output, push_folder(output, export.hub_model_id or output.name))
        except RuntimeError as error:
            print(f"export.py: error: {error}", file=sys.stderr, flush=True)
            sys.exit(1)


if __name__ == "__main__":
    main()
