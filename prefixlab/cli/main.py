"""The command line: `python -m prefixlab <command>`, on the same functions the app calls.

This module builds the parser (one subcommand per `cmd_*` function of `training`, `scoring`
and `exchange`) and runs the chosen one. Exit codes: 0 success; 2 a user error (bad file, bad
setting), with one line on stderr; 1 an unexpected failure. No traceback for user errors.
"""

from __future__ import annotations

import argparse
import os
import sys

from prefixlab.cli.comparing import cmd_compare
from prefixlab.cli.exchange import cmd_export, cmd_import_peft, cmd_inspect
from prefixlab.cli.options import add_options
from prefixlab.cli.output import say
from prefixlab.cli.scoring import cmd_evaluate, cmd_predict, cmd_serve
from prefixlab.cli.training import cmd_rank, cmd_resume, cmd_train, cmd_validate, cmd_worker
from prefixlab.engine.balance import ADAPT_PRIORS
from prefixlab.engine.precision import PRECISION_HELP, PRECISIONS
from prefixlab.errors import USER_ERRORS, ConfigError
from prefixlab.runs.presets import CLI_NAMES


def build_parser() -> argparse.ArgumentParser:
    from prefixlab.engine.decode import DecodeConfig
    from prefixlab.engine.methods import DEFAULT_METHODS, METHODS
    from prefixlab.engine.prefix import PrefixConfig
    from prefixlab.engine.train import TrainConfig
    from prefixlab.interpret.bank import DEFAULT_BANK_SIZE
    from prefixlab.interpret.readable import SearchConfig
    from prefixlab.runs.config import RunConfig
    from prefixlab.runs.inspection import DEFAULT_KNOCKOUT_ROWS
    from prefixlab.runs.readable import SEARCH_SECONDS

    parser = argparse.ArgumentParser(prog="python -m prefixlab",
                                     description="Prefix tuning of a frozen causal LM.")
    sub = parser.add_subparsers(dest="command", required=True)

    def columns(p):
        p.add_argument("--text-column", help="column holding the text (guessed when omitted)")
        p.add_argument("--label-column", help="column holding the label (guessed when omitted)")

    p = sub.add_parser("validate", help="check a labeled CSV and report every problem")
    p.add_argument("csv")
    columns(p)
    p.set_defaults(func=cmd_validate)

    def decoding(p, max_new_help: str) -> None:
        """Decoding options of evaluate and predict (the run's own settings otherwise)."""
        p.add_argument("--num-beams", type=int,
                       help="generation runs: 1 decodes greedily, 5 as the paper")
        p.add_argument("--max-new-tokens", type=int, help=max_new_help)
        p.add_argument("--stop", action="append", default=[],
                       help="generation runs: a string that ends an output (repeatable; "
                            "'\\n' for a newline)")

    def run_precision(p) -> None:
        """--precision of the commands that read a trained run (its own precision otherwise)."""
        p.add_argument("--precision", choices=PRECISIONS,
                       help=f"{PRECISION_HELP} Default: the precision the run trained in.")

    def adapt_prior(p) -> None:
        """--adapt-prior of the commands that decide labels on a file's rows."""
        p.add_argument("--adapt-prior", choices=ADAPT_PRIORS, default="none",
                       help="adapt the decision to the rows given, without their labels: em "
                            "re-estimates the label shares (Saerens et al. 2002), batch "
                            "removes the rows' average preference (Batch Calibration). "
                            "Assumes many rows from one distribution. Default: none")

    p = sub.add_parser("train", help="train a prefix on a labeled CSV into a run folder")
    p.add_argument("csv")
    p.add_argument("--output", required=True, help="run folder to create")
    p.add_argument("--preset", choices=tuple(CLI_NAMES),
                   help="the app's recipe of that name (rows used, budget, patience, ...); "
                        "other options given beside it win over it. Without it: Balanced's "
                        "recipe on every row, with no time budget")
    # every setting, with its default and help, comes from the dataclasses (cli/options.py)
    p.set_defaults(func=cmd_train, setting_names={
        "run": add_options(p, RunConfig, skip=("train_csv", "prefix", "training",
                                               "generation")),
        "prefix": add_options(p, PrefixConfig),
        "training": add_options(p, TrainConfig),
        # batch_size is TrainConfig's option; stop (a list) is read by --stop below
        "generation": add_options(p, DecodeConfig, skip=("batch_size", "stop")),
    })
    p.add_argument("--stop", action="append", default=[],
                   help="generation runs: a string that ends an output (repeatable; "
                        "'\\n' for a newline)")

    p = sub.add_parser("compare", help="train prefix tuning and other methods (prompt, LoRA, "
                                       "IA3, full, probe, TF-IDF) on the same rows; a table")
    p.add_argument("csv")
    columns(p)
    p.add_argument("--target-column",
                   help="a generation comparison: the column of texts to generate from "
                        "--text-column; every method is scored by BLEU, chrF, ROUGE-L and its "
                        "target loss, beside the bare model")
    p.add_argument("--methods",
                   help=f"comma-separated, in training order; of {', '.join(METHODS)}. "
                        f"Default: {','.join(DEFAULT_METHODS)}; with --target-column the "
                        "methods that classify (probe, tfidf) are left out, and refused "
                        "when named")
    p.add_argument("--test-csv", help="rows every method is scored on at the end: labeled, "
                                      "or input/target pairs in the same columns")
    p.add_argument("--shift-csv", help="a set from another source: the same labels, or "
                                       "input/target pairs in the same columns")
    p.add_argument("--validation-csv", help="held-out rows instead of a share of the CSV")
    p.add_argument("--max-minutes", type=float, help="time budget per method")
    p.add_argument("--epochs", type=int, help="epoch budget per method")
    p.add_argument("--max-train-examples", type=int, help="a stratified sample of the rows")
    p.add_argument("--seed", type=int)
    p.add_argument("--preset", choices=tuple(CLI_NAMES), help="the app's recipe of that name")
    p.add_argument("--model", help="base model (default: the embedded one)")
    p.add_argument("--device")
    p.add_argument("--precision", choices=PRECISIONS, help=PRECISION_HELP)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a run setting, as config.json names it (prefix.prefix_length=20, "
                        "training.learning_rate=0.003, decision=argmax); repeatable. The "
                        "prefix run takes them all; the other gradient methods share the "
                        "training settings but keep their own learning rate")
    p.add_argument("--keep-weights", action="store_true",
                   help="keep full fine-tuning's weights (the size of the model)")
    decoding(p, "generation: most tokens generated per input (and trained on per target), "
                "the same for every method")
    p.add_argument("--json", action="store_true", help="print comparison.json's content")
    p.add_argument("--output", required=True, help="comparison folder to create")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("resume", help="continue a run from its last checkpoint, or train a "
                                      "completed one longer")
    p.add_argument("run")
    p.add_argument("--nproc", type=int,
                   help="processes for this continuation (the result does not depend on it); "
                        "default: the run's setting")
    p.add_argument("--more-minutes", type=float, default=0.0,
                   help="train a completed run that ended on its budget this many minutes "
                        "longer, its final report included (alone: as many epochs as fit)")
    p.add_argument("--more-epochs", type=int, default=0,
                   help="train a completed run that ended on its budget this many epochs "
                        "longer (alone: no time limit)")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("rank", help="one process of a data-parallel run (started by torchrun)")
    p.add_argument("run")
    p.add_argument("--resume", action="store_true")
    p.set_defaults(func=cmd_rank)

    p = sub.add_parser("import-peft", help="make a run folder from a PEFT prefix adapter")
    p.add_argument("adapter", help="folder with adapter_config.json + adapter_model.safetensors")
    p.add_argument("--output", required=True, help="run folder to create")
    p.add_argument("--labels", required=True, help="comma-separated label names to score")
    p.set_defaults(func=cmd_import_peft,
                   setting_names=add_options(p, RunConfig, only=("model", "template")))

    p = sub.add_parser("inspect", help="what training changed, nearest tokens, knockouts, PCA "
                                       "maps and an HTML page of a prefix")
    p.add_argument("run")
    p.add_argument("--output", required=True, help="folder for the JSON files and HTML page")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--bank-size", type=int, default=DEFAULT_BANK_SIZE,
                   help="reference tokens per layer (frequent tokens + label words)")
    p.add_argument("--text", action="append", default=[],
                   help="an input for the attention view (repeatable)")
    p.add_argument("--knockout-rows", type=int, default=DEFAULT_KNOCKOUT_ROWS,
                   help="held-out rows scored with each slot and layer hidden (knockout.json); "
                        "0 skips the knockout")
    p.add_argument("--knockout-precision", choices=["auto", "float32", "bfloat16"],
                   default="auto", help="auto: bfloat16 where the processor multiplies it "
                   "natively (a GPU; a CPU with AVX512-BF16 or AMX), else float32")
    p.add_argument("--ablation", choices=["hide", "reset", "both"], default="hide",
                   help="knock parts out by hiding them from attention (what they do), by "
                        "resetting them to the start (what training added), or both")
    run_precision(p)
    p.add_argument("--explain-rows", type=int, default=0,
                   help="validation rows explained word by word for the words that move the "
                        "prefix's decisions beside TF-IDF's heaviest (words.json); 0 skips")
    p.add_argument("--no-describe", dest="describe", action="store_false",
                   help="skip the model's descriptions of its prefix (descriptions.json)")
    p.add_argument("--readable-prompt", action="store_true",
                   help="search a text prompt whose decisions on the training rows match the "
                        "prefix's (readable_prompt.json), beside the start and nearest-token "
                        "texts")
    p.add_argument("--readable-tokens", type=int, default=16,
                   help="tokens of the readable prompt")
    p.add_argument("--readable-steps", type=int, default=SearchConfig.steps,
                   help="gradient steps of the readable prompt's search, at most")
    p.add_argument("--readable-seconds", type=float, default=SEARCH_SECONDS,
                   help="time budget of the readable prompt's search (its steps end there; "
                        "0: no budget, every step is taken)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("worker", help="train a registered run (started by the app)")
    p.add_argument("run")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--lock-fd", type=int, help=argparse.SUPPRESS)  # the run lock, from the app
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("evaluate", help="metrics of a run's prefix and baselines on a CSV")
    p.add_argument("run")
    p.add_argument("csv")
    columns(p)
    p.add_argument("--target-column", help="generation runs: the references' column")
    p.add_argument("--max-inputs", type=int, help="generation runs: score the first N inputs")
    decoding(p, "generation runs: most tokens generated (default: the run's)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    adapt_prior(p)
    run_precision(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="label probabilities (or generation) with runs' prefixes")
    p.add_argument("run", nargs="?", help="a run folder (or give --run, repeatable)")
    p.add_argument("--run", dest="runs", action="append", default=[],
                   help="a run folder; several runs write one column group each")
    p.add_argument("--text", action="append", default=[], help="a text (repeatable)")
    p.add_argument("--csv", help="batch prediction: input CSV")
    p.add_argument("--output", help="batch prediction: output CSV")
    p.add_argument("--text-column")
    p.add_argument("--generate", action="store_true",
                   help="classification runs: free generation after the prefix")
    p.add_argument("--explain", action="store_true",
                   help="classification runs: each text's probabilities under the prefix, its "
                        "start and the bare model, and the words each decision leans on")
    p.add_argument("--ensemble", action="store_true",
                   help="several runs with the same labels (e.g. one recipe's seeds): one "
                        "line per --text, the runs' probabilities averaged")
    decoding(p, "most tokens generated (default: the run's; 40 for free generation)")
    adapt_prior(p)
    run_precision(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("serve", help="serve the API alone: score/generate with any run's prefix")
    p.add_argument("--data-dir", required=True, help="the app's data directory (runs)")
    p.add_argument("--model", default=None,
                   help="the default base model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7861)
    p.add_argument("--auth", default=os.environ.get("PREFIXLAB_AUTH"),
                   help="user:password, required when listening beyond this machine")
    p.add_argument("--window-ms", type=float, default=5.0,
                   help="how long a request waits for others to share its batch")
    p.add_argument("--max-rows", type=int, default=32, help="texts per mixed batch at most")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help=f"{PRECISION_HELP} Runs of the default model are served in it.")
    p.add_argument("--device", help="where the served model computes (cpu, cuda, cuda:1; "
                                    "default: CUDA when present, else CPU)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="export a run's prefix")
    p.add_argument("run")
    p.add_argument("--format", choices=["peft", "safetensors"], default="peft")
    p.add_argument("--output", required=True)
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:  # every settings problem on a line of its own
        for problem in e.problems:
            say(f"error: {' '.join(problem.split())}")
        return 2
    except USER_ERRORS as e:
        message = " ".join(str(e).split()) or type(e).__name__
        say(f"error: {message}")
        return 2
    except KeyboardInterrupt:
        say("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
