"""The public API, a contract: `/runs`, `/score`, `/generate` and `/predict_csv`, with typed
parameters, documented in README.md. Every other handler the UI wires up is private: the
browser calls it, API clients do not see it.

Score and generate requests go through the workbench's batcher, so concurrent clients naming
different runs share mixed batches; they take no concurrency slot of their own (the batcher
is the queue). `python -m prefixlab serve` serves these endpoints alone (`build_api`).

Runs of both kinds meet here: `/runs` says each run's task and labels and whether it answers
(`usable`: completed, or cancelled with its prefix kept); `/score` answers its classification
runs and names each generation run it skipped; `/generate` writes a generation run's prompts
into its template unless `raw`; `/predict_csv` adds each run's own columns. A run that is
not usable is refused with its name and state.
"""

from __future__ import annotations

import sys
from pathlib import Path

import gradio as gr
from gradio import FileData

from prefixlab.errors import ConfigError
from prefixlab.serve.access import MAX_UPLOAD, credentials
from prefixlab.ui.common import bind, guard
from prefixlab.workbench import Workbench
from prefixlab.workbench.serving import sampling_of

PUBLIC_ENDPOINTS = ("runs", "score", "generate", "predict_csv")


def _texts(values: list[str] | None, what: str) -> list[str]:
    lines = [t.strip() for t in (values or []) if t and t.strip()]
    if not lines:
        raise gr.Error(f"Give at least one {what}.")
    return lines


# --- the endpoints: the workbench first, then what a client sends ---------------------------
# register() gives each its workbench; gr.api reads the rest of the signature and the
# docstring for the API page, so each parameter is typed and documented.


def runs(workbench: Workbench, run_id: str = "") -> list[dict]:
    """Every run, or the one with this id: its state, its task ("classify" or "generate"), its
    labels, whether it answers requests (usable) and its metrics.

    Parameters:
        run_id: a run id; empty for every run, newest first
    """
    rows = workbench.runs()  # folds the workers' progress in (throttled), for one run too
    if run_id:
        rows = [workbench.store.get(run_id)]  # RunError for an unknown id
    return [{"id": r.id, "name": r.name, "state": r.state, **workbench.run_facts(r),
             "step": r.step, "total_steps": r.total_steps, "macro_f1": r.macro_f1,
             "accuracy": r.accuracy, "error": r.error} for r in rows]


def score(workbench: Workbench, texts: list[str], run_ids: list[str],
          bare: bool = False) -> list[dict]:
    """Each text's label probabilities under each run's prefix, in one mixed batch; a
    generation run named comes back as one row {run_id, source: "skipped", error}.

    Parameters:
        texts: the texts to classify
        run_ids: classification runs whose prefixes to use (task "classify" in /runs)
        bare: also score the bare model on each run's prompt
    """
    lines = _texts(texts, "text")
    if not run_ids:
        raise gr.Error("Give at least one run id (see the /runs endpoint).")
    return workbench.score_records(lines, list(run_ids), bare=bare)


def generate(workbench: Workbench, prompts: list[str], run_ids: list[str],
             max_new_tokens: int = 40, do_sample: bool = False, temperature: float = 1.0,
             top_p: float = 1.0, seed: int = 0, num_beams: int = 1,
             raw: bool = False) -> list[dict]:
    """Continuation of each prompt after each run's prefix, in one mixed batch. A generation
    run reads each prompt as an input in its template and stops at its stop strings, as it
    was trained and evaluated; a classification run's prefix continues the prompt as given.

    Parameters:
        prompts: the prompts to continue
        run_ids: runs whose prefixes to use; empty for the bare model
        max_new_tokens: new tokens per continuation, 1..1024
        do_sample: draw tokens instead of taking the most likely (greedy)
        temperature: sampling temperature, > 0
        top_p: nucleus sampling's share of the probability mass, in (0, 1]
        seed: the draws' seed: the same seed gives the same text, whatever else is batched
        num_beams: beam search with this many beams (1: greedy or sampling)
        raw: continue each prompt as given, without a generation run's template
    """
    return workbench.generate_texts(_texts(prompts, "prompt"), list(run_ids or []),
                                    int(max_new_tokens),
                                    sampling_of(do_sample, seed, temperature, top_p),
                                    int(num_beams), raw=bool(raw))


def predict_csv(workbench: Workbench, csv: FileData, run_ids: list[str],
                text_column: str = "") -> FileData:
    """The CSV with predictions appended: one column group per run (a classification run's
    predicted label and probabilities, a generation run's generated text).

    Parameters:
        csv: the CSV (or TSV) to label
        run_ids: runs whose prefixes to use, of either task; several must share a base model
        text_column: the column holding the texts; empty to use the run's or guess
    """
    if not run_ids:
        raise gr.Error("Give at least one run id (see the /runs endpoint).")
    path = csv["path"] if isinstance(csv, dict) else csv.path
    name = csv.get("orig_name") if isinstance(csv, dict) else csv.orig_name
    result = workbench.predict_csv(list(run_ids), path, text_column or None, name=name)
    return FileData(path=str(result.path), orig_name=result.path.name)


# --- the page ------------------------------------------------------------------------------


def register(workbench: Workbench) -> None:
    """Add the public endpoints to the Blocks being built."""
    # Polling and batched requests take no concurrency slot: the registry read takes
    # milliseconds and the batcher already serializes the model's work.
    gr.api(guard(bind(runs, workbench)), api_name="runs", concurrency_limit=None)
    gr.api(guard(bind(score, workbench)), api_name="score", concurrency_limit=None)
    gr.api(guard(bind(generate, workbench)), api_name="generate", concurrency_limit=None)
    gr.api(guard(bind(predict_csv, workbench)), api_name="predict_csv")


def hide_internal_handlers(demo: gr.Blocks) -> None:
    """Make every handler but the public endpoints private (the browser still calls them)."""
    for fn in demo.fns.values():
        if fn.api_name not in PUBLIC_ENDPOINTS:
            fn.api_visibility = "private"


def build_api(workbench: Workbench) -> gr.Blocks:
    """A page with the public endpoints alone, for `python -m prefixlab serve`."""
    with gr.Blocks(title="PrefixLab API") as demo:
        gr.Markdown("# PrefixLab API\nEndpoints: " + ", ".join(f"`/{e}`" for e in
                                                               PUBLIC_ENDPOINTS)
                    + ". See “Use via API” below and README.md.")
        register(workbench)
    return demo


def serve_api(data_dir: str | Path, model: str | None = None, host: str = "127.0.0.1",
              port: int = 7861, auth: str | None = None, window_ms: float = 5.0,
              max_rows: int = 32) -> None:
    """`python -m prefixlab serve`: the public endpoints over a data directory, blocking.
    Who may connect and how large an upload may be follow the app's rule
    (prefixlab.serve.access)."""
    login = credentials(auth, host)
    if window_ms < 0 or max_rows < 1:
        raise ConfigError(f"--window-ms must be >= 0 and --max-rows >= 1, got {window_ms} and "
                          f"{max_rows}")
    workbench = Workbench(Path(data_dir), model=model)
    workbench.batch_window_s, workbench.batch_max_rows = window_ms / 1000, max_rows
    demo = build_api(workbench)
    workbench.warm_up()
    print(f"PrefixLab API on http://{host}:{port}/ (runs in {workbench.store.data_dir})",
          file=sys.stderr)
    demo.queue(default_concurrency_limit=4).launch(
        server_name=host, server_port=port, auth=login, show_error=True,
        allowed_paths=[str(workbench.exports_dir)], max_file_size=MAX_UPLOAD,
    )
