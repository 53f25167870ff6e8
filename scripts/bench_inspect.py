"""Inspect tab speed, measured in a real browser on the default model, against the issue's
targets: first open <= 10 s (bank on disk), every view change <= 1 s, knockout on 100
held-out rows <= 60 s on 2 CPU cores. Also takes the tab's screenshot.

Usage (wrap in `flock /work/bench.lock` on a shared machine):
    python scripts/bench_inspect.py DATA_DIR RUN_ID [SCREENSHOT.png]
DATA_DIR holds runs/RUN_ID (a run of the default model, e.g. `python -m prefixlab train CSV
--output DATA_DIR/runs/RUN_ID ...`); the knockout cache in that run folder is removed first,
so the knockout is measured, not read back.
"""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import app  # noqa: E402  (the repository root, for `python scripts/...`)
from prefixlab.workbench import Workbench  # noqa: E402

TARGETS = {"first open": 10.0, "view change": 1.0, "knockout (100 rows)": 60.0}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(data_dir: str, run_id: str, shot: str | None) -> None:
    from playwright.sync_api import expect, sync_playwright

    workbench = Workbench(data_dir)
    (Path(data_dir) / "runs" / run_id / "knockout.json").unlink(missing_ok=True)
    demo = app.build_ui(workbench)
    workbench.warm_up()
    port = _port()
    demo.queue(default_concurrency_limit=4).launch(
        server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
        css=app.CSS)
    workbench.model(workbench.default_model)  # loaded as the app does at start, not timed
    figures: dict[str, list[float]] = {}
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                        args=["--disable-gpu", "--disable-quic"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(180_000)
            expect.set_options(timeout=180_000)
            page.goto(f"http://127.0.0.1:{port}/")
            page.get_by_role("tab", name="Inspect", exact=True).click()
            page.get_by_role("combobox", name="Run", exact=True).click()
            page.get_by_role("option", name=re_run(run_id)).click()
            page.keyboard.press("Escape")

            start = time.perf_counter()
            page.locator("#inspect-open").click()
            expect(page.locator("#inspect-summary")).to_contain_text("Movement")
            page.locator("#inspect-pca .js-plotly-plot").wait_for()
            figures["first open"] = [time.perf_counter() - start]
            print("first open", figures["first open"], flush=True)

            def title_has(text: str) -> None:
                page.wait_for_function(
                    "document.querySelector('#inspect-pca .js-plotly-plot')?.layout?.title"
                    f"?.text?.includes({text!r})", polling=50)

            time.sleep(20)  # a person reads the summary; the warm-up runs meanwhile
            changes = []
            for layer in (5, 12, 29):
                box = page.locator("#inspect-layer input[type=number]")
                start = time.perf_counter()
                box.fill(str(layer))
                box.press("Enter")
                title_has(f"Layer {layer} keys")
                changes.append(time.perf_counter() - start)
            start = time.perf_counter()
            page.get_by_label("value", exact=True).check()
            title_has("values")
            changes.append(time.perf_counter() - start)
            start = time.perf_counter()
            page.get_by_label("3-D", exact=True).check()
            page.wait_for_function(
                "document.querySelector('#inspect-pca .js-plotly-plot')?.data?.[0]?.type"
                " === 'scatter3d'", polling=50)
            changes.append(time.perf_counter() - start)
            page.get_by_label("2-D", exact=True).check()
            figures["view change"] = changes
            print("view change", changes, flush=True)

            start = time.perf_counter()
            page.locator("#inspect-knockout").click()
            expect(page.locator("#inspect-summary")).to_contain_text("Slots that cost most")
            page.locator("#inspect-knockout-plot .js-plotly-plot").wait_for()
            figures["knockout (100 rows)"] = [time.perf_counter() - start]
            if shot:
                page.screenshot(path=shot, full_page=True)
            browser.close()
    finally:
        demo.close()
    print(f"{'measure':<22}{'seconds (each)':<36}{'target':>8}{'worst/target':>14}")
    for name, values in figures.items():
        each = ", ".join(f"{v:.2f}" for v in values)
        print(f"{name:<22}{each:<36}{TARGETS[name]:>8.0f}{max(values) / TARGETS[name]:>14.2f}")


def re_run(run_id: str):
    import re

    return re.compile(re.escape(run_id))


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) == 4 else None)
