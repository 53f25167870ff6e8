"""Named training recipes, shared by the app's preset buttons and the CLI's `--preset`.

A preset fills every setting a person picks in the app, in one flat dict (the app edits it
field by field); `config_parts` sorts it into the keyword groups RunConfig takes. Each
preset trains until validation macro-F1 stops improving (patience, in evaluations, two per
epoch) or its budget ends (epochs, minutes), and keeps the best step.

- Quick look: a budget of a minute and a half, a first look at whether the labels are
  learnable.
- Balanced: the validation optimum within a 10-minute budget on 300-2,000 rows.
- Thorough: every row and a longer budget, for larger sets and slower convergence.

The CLI without `--preset` uses the dataclasses' defaults: Balanced's recipe on every row with
no time budget, trained at learning rates 0.005 and 0.01 with the better kept on validation.
"""

from __future__ import annotations

from collections.abc import Mapping

SHIFT_LEVERS_OFF: dict = {"validation_split": "random", "start_pull": 0.0, "average_last": 1,
                          "prefix_dropout": 0.0, "try_learning_rates": ""}
"""Issue 32's levers against topic shift, off in the presets (docs/quality.md): each one's
value that trains as without it. Trying a second learning rate, which the CLI's default recipe
does, is on in Thorough alone: the others' time budgets would be split between the rates."""

PRESETS: dict[str, dict] = {
    "Quick look": {
        "prefix_length": 8, "init": "text", "reparameterize": False, "learning_rate": 5e-3,
        "epochs": 2, "batch_size": 8, "max_length": 96, "validation_share": 0.2, "seed": 0,
        "max_train_examples": 200, "max_eval_examples": 100, "patience": 2, "max_minutes": 1.5,
        "class_balance": "none", "decision": "fitted", "precision": "auto",
        **SHIFT_LEVERS_OFF,
    },
    "Balanced": {
        "prefix_length": 10, "init": "text", "reparameterize": False, "learning_rate": 5e-3,
        "epochs": 8, "batch_size": 8, "max_length": 128, "validation_share": 0.2, "seed": 0,
        "max_train_examples": 2000, "max_eval_examples": 300, "patience": 4, "max_minutes": 10,
        "class_balance": "none", "decision": "fitted", "precision": "auto",
        **SHIFT_LEVERS_OFF,
    },
    "Thorough": {
        "prefix_length": 10, "init": "text", "reparameterize": False, "learning_rate": 5e-3,
        "epochs": 20, "batch_size": 8, "max_length": 128, "validation_share": 0.2, "seed": 0,
        "max_train_examples": 0, "max_eval_examples": 500, "patience": 6, "max_minutes": 60,
        "class_balance": "none", "decision": "fitted", "precision": "auto",
        **SHIFT_LEVERS_OFF, "try_learning_rates": "0.01",
    },
}
SETTING_NAMES = tuple(PRESETS["Quick look"])
CLI_NAMES = {"quick": "Quick look", "balanced": "Balanced", "thorough": "Thorough"}
"""`--preset` values: a shell-friendly word for each preset."""

_PREFIX = ("prefix_length", "init", "reparameterize")
_TRAINING = ("learning_rate", "epochs", "batch_size", "seed", "patience", "max_minutes",
             "class_balance")


def preset(name: str) -> dict:
    """A preset's settings by its app name ("Balanced") or CLI word ("balanced")."""
    key = CLI_NAMES.get(name.lower(), name)
    if key not in PRESETS:
        raise ValueError(f"no preset {name!r}; the presets are {', '.join(CLI_NAMES)}")
    return dict(PRESETS[key])


def config_parts(settings: Mapping) -> dict[str, dict]:
    """Flat settings (a preset, possibly edited) as RunConfig keywords: the run's own under
    "run", and the "prefix" and "training" groups. A count of 0 means every row."""
    s = {**PRESETS["Quick look"], **settings}
    return {
        "run": {"validation_share": float(s["validation_share"]),
                "max_train_examples": int(s["max_train_examples"]) or None,
                "max_eval_examples": int(s["max_eval_examples"]) or None,
                "max_length": int(s["max_length"]), "decision": s["decision"],
                "precision": s["precision"], "validation_split": s["validation_split"]},
        "prefix": {"prefix_length": int(s["prefix_length"]), "init": s["init"],
                   "reparameterize": bool(s["reparameterize"])},
        "training": {"learning_rate": float(s["learning_rate"]), "epochs": int(s["epochs"]),
                     "batch_size": int(s["batch_size"]), "seed": int(s["seed"]),
                     "patience": int(s["patience"]), "max_minutes": float(s["max_minutes"]),
                     "class_balance": s["class_balance"], "start_pull": float(s["start_pull"]),
                     "average_last": int(s["average_last"]),
                     "prefix_dropout": float(s["prefix_dropout"]),
                     "try_learning_rates": s["try_learning_rates"] or ()},
    }
