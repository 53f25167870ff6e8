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
from collections.abc import Callable
from pathlib import Path

import gradio as gr
from gradio import FileData

from prefixlab.errors import ConfigError
from prefixlab.serve import limits
from prefixlab.serve.access import MAX_UPLOAD, credentials
from prefixlab.serve.batcher import Abandoned
from prefixlab.serve.gate import NO_DEFAULT, Gate, allowed_hosts
from prefixlab.ui.common import bind, guard
from prefixlab.workbench import Workbench
from prefixlab.workbench.serving import sampling_of

PUBLIC_ENDPOINTS = ("runs", "score", "generate", "predict_csv")


def _client(request: gr.Request | None) -> Callable[[], bool] | None:
    """A test of whether the client that made `request` is still waiting: False until it
    disconnects or cancels (Gradio then marks its queued event dead, or drops it from the
    running jobs). None outside Gradio's queue (a direct call): nobody to wait for."""
    http = getattr(request, "request", None) if request is not None else None
    if http is None:
        return None
    try:
        running = http.app.get_blocks()._queue.active_jobs  # Gradio's queue: pinned version
    except AttributeError:
        return None

    def mine() -> list:
        return [e for job in list(running) if job for e in job if e.request is http]

    events = mine()
    if not events:
        return None
    event = events[0]
    return lambda: not event.alive or event not in mine()


# --- the endpoints: the workbench first, then what a client sends ---------------------------
# register() gives each its workbench; gr.api reads the rest of the signature and the
# docstring for the API page, so each parameter is typed and documented. Every value is
# checked here (serve.limits), so a wrong type is refused in one line naming the parameter.


def runs(workbench: Workbench, run_id: str = "") -> list[dict]:
    """Every run, or the one with this id: its state, its task ("classify" or "generate"), its
    labels, whether it answers requests (usable) and its metrics.

    Parameters:
        run_id: a run id; empty for every run, newest first
    """
    if run_id is None:
        run_id = ""
    if not isinstance(run_id, str):
        raise limits.RequestError(f"run_id must be a string, got {limits.kind_of(run_id)}")
    rows = workbench.runs()  # folds the workers' progress in (throttled), for one run too
    if run_id:
        rows = [workbench.store.get(run_id)]  # RunError for an unknown id
    return [{"id": r.id, "name": r.name, "state": r.state, **workbench.run_facts(r),
             "step": r.step, "total_steps": r.total_steps, "macro_f1": r.macro_f1,
             "accuracy": r.accuracy, "error": r.error} for r in rows]


def score(workbench: Workbench, texts: list[str], run_ids: list[str],
          bare: bool = False, request: gr.Request = None) -> list[dict]:
    """Each text's label probabilities under each run's prefix, in one mixed batch; a
    generation run named comes back as one row {run_id, source: "skipped", error}. A row
    holds its own run's labels only.

    Parameters:
        texts: the texts to classify
        run_ids: classification runs whose prefixes to use (task "classify" in /runs)
        bare: also score the bare model on each run's prompt
    """
    lines = limits.texts(texts, "texts", workbench.limits)
    ids = _run_ids(run_ids)
    return workbench.score_records(lines, ids, bare=limits.flag(bare, "bare"),
                                   stop=_client(request))


def generate(workbench: Workbench, prompts: list[str], run_ids: list[str],
             max_new_tokens: int = 40, do_sample: bool = False, temperature: float = 1.0,
             top_p: float = 1.0, seed: int = 0, num_beams: int = 1,
             raw: bool = False, request: gr.Request = None) -> list[dict]:
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
    lines = limits.texts(prompts, "prompts", workbench.limits)
    ids = limits.names(run_ids, "run_ids")
    bound = workbench.limits
    max_new_tokens = limits.whole(max_new_tokens, "max_new_tokens", 1, bound.new_tokens,
                                  "new_tokens")
    num_beams = limits.whole(num_beams, "num_beams", 1, 16)
    rows = len(lines) * num_beams * max(1, len(ids))
    if rows > bound.rows_generated:
        raise limits.RequestError(
            f"{len(lines)} prompts × {num_beams} beams × {max(1, len(ids))} runs is {rows} "
            f"rows to decode; this server decodes at most {bound.rows_generated} per request "
            f"({limits.env_name('rows_generated')}): send fewer prompts, beams or runs")
    sampling = sampling_of(limits.flag(do_sample, "do_sample"),
                           limits.whole(seed, "seed", 0, 2**63 - 1),
                           limits.number(temperature, "temperature"),
                           limits.number(top_p, "top_p"))
    return workbench.generate_texts(lines, ids, max_new_tokens, sampling, num_beams,
                                    raw=limits.flag(raw, "raw"), stop=_client(request))


def predict_csv(workbench: Workbench, csv: FileData, run_ids: list[str],
                text_column: str = "", request: gr.Request = None) -> FileData:
    """The CSV with predictions appended: one column group per run (a classification run's
    predicted label and probabilities, a generation run's generated text). A client that
    cancels the job (gradio_client's `job.cancel()`) or disconnects stops it after the
    chunk of rows it is in.

    Parameters:
        csv: the CSV (or TSV) to label
        run_ids: runs whose prefixes to use, of either task; several must share a base model
        text_column: the column holding the texts; empty to use the run's or guess
    """
    ids = _run_ids(run_ids)
    if text_column is not None and not isinstance(text_column, str):
        raise limits.RequestError(f"text_column must be a string, got "
                                  f"{limits.kind_of(text_column)}")
    if isinstance(csv, dict) and isinstance(csv.get("path"), str):
        path, name = csv["path"], csv.get("orig_name")
    elif isinstance(csv, FileData):
        path, name = csv.path, csv.orig_name
    else:
        raise limits.RequestError("csv must be a file (gradio_client's handle_file(path))")
    gone = _client(request)

    def follow(what: str, done: int, total: int) -> None:
        if gone is not None and gone():
            raise Abandoned("the client went away; the file was not finished")

    result = workbench.predict_csv(ids, path, text_column or None, name=name,
                                   progress=follow if gone is not None else None)
    return FileData(path=str(result.path), orig_name=result.path.name)


def _run_ids(values: object) -> list[str]:
    ids = limits.names(values, "run_ids")
    if not ids:
        raise limits.RequestError("give at least one run id in run_ids (see the /runs "
                                  "endpoint)")
    return ids


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


def parameters() -> dict[str, list[tuple[str, object]]]:
    """Each public endpoint's parameters in order, with defaults (NO_DEFAULT: required), as
    a client passes them: the workbench and Gradio's request are not among them."""
    import inspect

    endpoints = {"runs": runs, "score": score, "generate": generate,
                 "predict_csv": predict_csv}
    return {name: [(p.name, NO_DEFAULT if p.default is inspect.Parameter.empty else p.default)
                   for p in list(inspect.signature(fn).parameters.values())[1:]
                   if p.name != "request"]
            for name, fn in endpoints.items()}


def launch(demo: gr.Blocks, workbench: Workbench, host: str, port: int,
           login: tuple[str, str] | None, share: bool = False, **options) -> None:
    """Serve `demo` as the app and the API server both do: behind the gate (Host check
    without a login, body cap, documented routes only, login throttle: serve.gate), with
    the upload cap, a queue, and downloads from the workbench's exports."""
    from starlette.middleware import Middleware

    gate = Middleware(Gate, hosts=allowed_hosts(host, login is not None),
                      body_bytes=workbench.limits.body_bytes, endpoints=parameters())
    options.setdefault("allowed_paths", [str(workbench.exports_dir)])
    demo.queue(default_concurrency_limit=4).launch(
        server_name=host, server_port=port, share=share, auth=login, show_error=True,
        max_file_size=MAX_UPLOAD, app_kwargs={"middleware": [gate]}, **options)


def serve_api(data_dir: str | Path, model: str | None = None, host: str = "127.0.0.1",
              port: int = 7861, auth: str | None = None, window_ms: float = 5.0,
              max_rows: int = 32, precision: str = "auto", device: str | None = None) -> None:
    """`python -m prefixlab serve`: the public endpoints over a data directory, blocking.
    Who may connect and how large an upload may be follow the app's rule
    (prefixlab.serve.access)."""
    login = credentials(auth, host)
    if window_ms < 0 or max_rows < 1:
        raise ConfigError(f"--window-ms must be >= 0 and --max-rows >= 1, got {window_ms} and "
                          f"{max_rows}")
    workbench = Workbench(Path(data_dir), model=model, precision=precision, device=device)
    workbench.batch_window_s, workbench.batch_max_rows = window_ms / 1000, max_rows
    demo = build_api(workbench)
    workbench.warm_up()
    print(f"PrefixLab API on http://{host}:{port}/ (runs in {workbench.store.data_dir})",
          file=sys.stderr)
    launch(demo, workbench, host, port, login)
