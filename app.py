"""PrefixLab in the browser: `python app.py` serves http://127.0.0.1:7860.

Binds 127.0.0.1 unless told otherwise. Listening on another interface or sharing needs
explicit flags and then a user/password (--auth user:password or PREFIXLAB_AUTH).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn

from prefixlab.engine.cpu import pin_threads
from prefixlab.engine.models import DEFAULT_MODEL
from prefixlab.engine.precision import PRECISION_HELP, PRECISIONS
from prefixlab.errors import ConfigError
from prefixlab.runs.folder import RunError
from prefixlab.serve.access import credentials
from prefixlab.ui import CSS, build_ui
from prefixlab.ui.api import launch
from prefixlab.workbench import Workbench


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ
    p = argparse.ArgumentParser(description="PrefixLab: prefix tuning in the browser")
    p.add_argument("--host", default=env.get("PREFIXLAB_HOST", "127.0.0.1"),
                   help="interface to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=int(env.get("PREFIXLAB_PORT", "7860")))
    p.add_argument("--data-dir", default=env.get("PREFIXLAB_DATA_DIR", "prefixlab-data"),
                   help="where runs and the registry live")
    p.add_argument("--model", default=env.get("PREFIXLAB_MODEL", DEFAULT_MODEL),
                   help="base model: the embedded default, a local folder or a hub id")
    p.add_argument("--precision", default=env.get("PREFIXLAB_PRECISION", "auto"),
                   choices=PRECISIONS, help=PRECISION_HELP)
    p.add_argument("--device", default=env.get("PREFIXLAB_DEVICE"),
                   help="where the app's own model scores and generates (cpu, cuda, cuda:1; "
                        "default: CUDA when present, else CPU); runs pick their own")
    p.add_argument("--share", action="store_true",
                   help="open a public Gradio share link (needs --auth)")
    p.add_argument("--auth", default=env.get("PREFIXLAB_AUTH"),
                   help="user:password, required when listening beyond this machine")
    return p.parse_args(argv)


def access(args: argparse.Namespace) -> tuple[str, str] | None:
    """The credentials to demand, or None for a local-only app; refuses an open exposure
    (the rule in prefixlab.serve.access, which the API server follows too)."""
    try:
        return credentials(args.auth, args.host, share=args.share)
    except ConfigError as e:
        refuse(str(e))


def refuse(message: str) -> NoReturn:
    """End with the message and exit status 2, as `python -m prefixlab` ends on a user error
    (the app and the API server refuse the same exposure the same way)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    auth = access(args)
    try:
        workbench = Workbench(Path(args.data_dir), model=args.model, precision=args.precision,
                              device=args.device)
    except (RunError, ConfigError) as e:
        refuse(str(e))
    pin_threads()  # request threads share torch's thread count: no tuner may change it
    demo = build_ui(workbench)
    workbench.warm_up()  # the page is served while the model loads (or converts, once)
    if auth:
        print(f"PrefixLab: login required (user {auth[0]!r}); listening on {args.host}",
              file=sys.stderr)
    # exports: downloads; uploads: a reloaded page shows the file it had chosen
    launch(demo, workbench, args.host, args.port, auth, share=args.share, css=CSS,
           allowed_paths=[str(workbench.exports_dir), str(workbench.uploads_dir)])

if __name__ == "__main__":
    main()
