"""Single-process DARTS from the command line (no Ray, no MLflow): search a cell pair or retrain a genotype.

    python -m nas search  --config digits                       # search on digits, pictures per epoch
    python -m nas search  --config digits --set search.xi=0     # first order
    python -m nas retrain --config digits --set retrain.genotype=runs/digits/search/genotype.json
    python -m nas search  --config digits --resume              # continue from the last epoch's checkpoint

Outputs go to ``<output_dir>/<name>/<command>/``: genotype.json / genotype.txt, history.json, cells/ and alpha/
PNGs per epoch, checkpoint.pt (weights, α, optimizer states, RNG states) after every epoch; a retrain adds model.pt
(the weights) and spec.json (the NetworkSpec that rebuilds the network: ``EvalNetwork.from_spec``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError

from nas.artifacts import save_epoch_pictures, save_search_outputs, save_torch_atomic, write_json, write_text_atomic
from nas.config import Config, ConfigError, config_parser, format_validation_error, load_config
from nas.data import DataError
from nas.genotypes import GenotypeError, parse_genotype
from nas.loop import restore_checkpoint


def _parser() -> argparse.ArgumentParser:
    parser = config_parser("python -m nas", __doc__.splitlines()[0], "digits")
    parser.add_argument("command", choices=("search", "retrain"))
    parser.add_argument("--resume", action="store_true", help="continue from the output folder's checkpoint")
    return parser


def run_search(config: Config, out: Path, resume: bool) -> None:
    from nas.search import SearchRun

    run = SearchRun(config)
    checkpoint = out / "checkpoint.pt"
    if resume and checkpoint.is_file():
        restore_checkpoint(run, checkpoint)
        print(f"resumed from {checkpoint} at epoch {run.epoch}")

    def on_epoch(report, run_) -> None:  # noqa: ANN001
        save_epoch_pictures(
            out, report.epoch, report.genotype, report.alpha_normal, report.alpha_reduce, config.search.primitives
        )
        save_torch_atomic(run_.state_dict(), checkpoint)

    result = run.run(on_epoch)
    paths = save_search_outputs(out, result.genotype, result.history)
    print(f"genotype: {result.genotype}")
    print(f"wrote {paths[0]} and pictures in {out / 'cells'}, {out / 'alpha'}")


def run_retrain(config: Config, out: Path, resume: bool) -> None:
    from nas.retrain import RetrainRun

    run = RetrainRun(config, parse_genotype(config.retrain.genotype))
    checkpoint = out / "checkpoint.pt"
    if resume and checkpoint.is_file():
        restore_checkpoint(run, checkpoint)
        print(f"resumed from {checkpoint} at epoch {run.epoch}")
    result = run.run(lambda report, run_: save_torch_atomic(run_.state_dict(), checkpoint))
    save_torch_atomic(run.network.state_dict(), out / "model.pt")
    write_text_atomic(out / "spec.json", run.spec.model_dump_json(indent=2) + "\n")  # what rebuilds and feeds it
    write_json(
        out / "result.json",
        {"genotype": result.genotype.to_dict(), "eval_split": result.eval_split, "eval_acc": result.eval_acc},
    )
    print(f"{result.eval_split} accuracy {result.eval_acc:.2%}; weights in {out / 'model.pt'}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        # Presets name the Ray stages' sections too (ray, sweep, ...): the library reads only its own.
        config = load_config(args.config, args.overrides, known_sections_only=True)
        out = Path(config.output_dir) / config.name / args.command
        (run_search if args.command == "search" else run_retrain)(config, out, args.resume)
    except ValidationError as err:
        print(f"error: {format_validation_error(err)}", file=sys.stderr)
        return 2
    except (ConfigError, DataError, GenotypeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
