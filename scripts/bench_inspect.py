"""Inspect tab speed, measured in a real browser on the default model, against the issue's
targets: first open <= 10 s (the model's bank on disk), every view change <= 1 s, knockout on
100 held-out rows <= 60 s on 2 CPU cores. Also takes the tab's screenshot.

Usage (wrap in `flock /work/bench.lock` on a shared machine):
    python scripts/bench_inspect.py DATA_DIR RUN_ID [SCREENSHOT.png] [--views-only]
--views-only: first open and view changes, no knockout and no screenshot. DATA_DIR holds
runs/RUN_ID (a run of the default model, e.g. `python -m prefixlab train CSV --output
DATA_DIR/runs/RUN_ID ...`).

What "first open" includes: the model is loaded and its bank (frequent tokens, the whole
vocabulary's layer 0) is on disk, as after any earlier inspection of that model; built here
first if missing, not timed. Everything of this run is removed first, so the open pays what a
new run's first open pays: its own words' file, its nearest tokens (nearest_cache.json), the
maps and figures. The knockout cache is removed too, so the knockout is measured.
The first view change follows the open at once (the background warm-up has not run); the
others come after 10 s, as when a person reads the summary first.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import app  # noqa: E402  (the repository root, for `python scripts/...`)
from prefixlab.engine.cpu import pin_threads  # noqa: E402
from prefixlab.interpret import bank as reference_bank  # noqa: E402
from prefixlab.runs.inspection import KNOCKOUT_FILE, NEAREST_CACHE, run_words, word_ids  # noqa: E402
from prefixlab.workbench import Workbench  # noqa: E402

TARGETS = {"first open": 10.0, "view change": 1.0, "knockout (100 rows)": 60.0}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def _fresh_run(workbench: Workbench, run_id: str) -> None:
    """The model's bank on disk; nothing of this run's inspection anywhere."""
    run = workbench.open(run_id)
    start = time.perf_counter()
    bank = reference_bank.model_bank(run.loaded, progress=print)
    print(f"model bank ready ({time.perf_counter() - start:.1f} s, not timed; "
          f"from disk: {bank.loaded_from_disk})", flush=True)
    words = reference_bank.with_words(bank, run.loaded, word_ids(run_words(run)),
                                      use_cache=False)
    extras = words.token_ids[len(bank.token_ids):]
    if extras:
        reference_bank.bank_path(run.loaded, extras, bank.context_id).unlink(missing_ok=True)
    for name in (NEAREST_CACHE, KNOCKOUT_FILE):
        (run.folder.path / name).unlink(missing_ok=True)


def main(data_dir: str, run_id: str, shot: str | None, views_only: bool = False) -> None:
    from playwright.sync_api import expect, sync_playwright

    pin_threads()  # as app.py's main: request threads share one thread count
    workbench = Workbench(data_dir)
    workbench.store.refresh()
    workbench.model(workbench.default_model)  # loaded as the app does at its start
    _fresh_run(workbench, run_id)
    demo = app.build_ui(workbench)
    port = _port()
    demo.queue(default_concurrency_limit=4).launch(
        server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
        css=app.CSS)
    figures: dict[str, list[float]] = {}
    labels: list[str] = []
    print(f"load average before: {_load()}", flush=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                        args=["--disable-gpu", "--disable-quic"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(600_000)
            expect.set_options(timeout=600_000)
            page.goto(f"http://127.0.0.1:{port}/")
            page.get_by_role("tab", name="Inspect", exact=True).click()
            page.get_by_role("combobox", name="Run", exact=True).click()
            page.get_by_role("option", name=re_run(run_id)).click()
            page.keyboard.press("Escape")

            start = time.perf_counter()
            page.locator("#inspect-open").click()
            expect(page.locator("#inspect-summary")).to_contain_text("Movement")
            page.wait_for_function(
                "document.querySelector('#inspect-pca .js-plotly-plot')?.data?.length >= 2"
                " && document.querySelector('#inspect-layers .js-plotly-plot')?.data?.length"
                " && document.querySelector('#inspect-nearest .js-plotly-plot')?.data?.length",
                polling=50)
            figures["first open"] = [time.perf_counter() - start]
            print(f"first open {figures['first open'][0]:.2f} s", flush=True)

            def title_has(text: str) -> None:
                page.wait_for_function(
                    "document.querySelector('.pca-stage > :not(.offstage) .js-plotly-plot')"
                    "?.layout?.title"
                    f"?.text?.includes({text!r})", polling=50)

            def timed(label: str, act, done) -> None:
                start = time.perf_counter()
                act()
                done()
                figures.setdefault("view change", []).append(time.perf_counter() - start)
                labels.append(label)
                print(f"view change: {label} {figures['view change'][-1]:.2f} s", flush=True)

            box = page.locator("#inspect-layer input[type=number]")

            def layer(n: int):
                return lambda: (box.fill(str(n)), box.press("Enter"))

            timed("layer 5 (right after open)", layer(5), lambda: title_has("Layer 5 keys"))
            time.sleep(10)  # a person reads the summary; the warm-up runs meanwhile
            for n in (12, 29):
                timed(f"layer {n}", layer(n), lambda n=n: title_has(f"Layer {n} keys"))
            timed("key -> value", lambda: page.get_by_label("value", exact=True).check(),
                  lambda: title_has("Layer 29 values"))
            timed("2-D -> 3-D", lambda: page.get_by_label("3-D", exact=True).check(),
                  lambda: page.wait_for_function(
                      "document.querySelector('#inspect-pca3:not(.offstage) .js-plotly-plot')"
                      "?.data?.[0]?.type === 'scatter3d'", polling=50))
            timed("layer 3 in 3-D", layer(3), lambda: title_has("Layer 3 values"))
            timed("3-D -> 2-D", lambda: page.get_by_label("2-D", exact=True).check(),
                  lambda: page.wait_for_function(
                      "document.querySelector('#inspect-pca:not(.offstage) .js-plotly-plot')"
                      "?.data?.[0]?.type === 'scatter'", polling=50))
            timed("value -> key", lambda: page.get_by_label("key", exact=True).check(),
                  lambda: title_has("Layer 3 keys"))

            if views_only:
                browser.close()
                return
            start = time.perf_counter()
            page.locator("#inspect-knockout").click()
            expect(page.locator("#inspect-summary")).to_contain_text("cost most")
            page.locator("#inspect-knockout-plot .js-plotly-plot").wait_for()
            figures["knockout (100 rows)"] = [time.perf_counter() - start]
            print(f"knockout {figures['knockout (100 rows)'][0]:.1f} s", flush=True)
            if shot:
                page.locator("#inspect-layer input[type=number]").fill("15")
                page.locator("#inspect-layer input[type=number]").press("Enter")
                title_has("Layer 15 keys")
                time.sleep(1)  # plotly's resize after the redraw
                page.screenshot(path=shot, full_page=True)
            browser.close()
    finally:
        demo.close()
        _report(figures, labels)


def _report(figures: dict[str, list[float]], labels: list[str]) -> None:
    print(f"load average after: {_load()}")
    print(f"{'measure':<22}{'seconds (each)':<52}{'target':>8}{'worst/target':>14}")
    for name, values in figures.items():
        each = ", ".join(f"{v:.2f}" for v in values)
        print(f"{name:<22}{each:<52}{TARGETS[name]:>8.0f}{max(values) / TARGETS[name]:>14.2f}")
    if labels:
        print("view changes, in order: " + "; ".join(labels))


def re_run(run_id: str):
    import re

    return re.compile(re.escape(run_id))


if __name__ == "__main__":
    views_only = "--views-only" in sys.argv
    args = [a for a in sys.argv[1:] if a != "--views-only"]
    if len(args) not in (2, 3):
        sys.exit(__doc__)
    main(args[0], args[1], args[2] if len(args) == 3 else None, views_only)
