"""Who may connect: one rule (prefixlab.serve.access) for the app and the API-only server."""

from __future__ import annotations

import pytest

import app
from prefixlab.errors import ConfigError
from prefixlab.serve.access import LOCAL_HOSTS, credentials
from prefixlab.ui.api import serve_api


def test_this_machine_needs_no_login_and_another_interface_does():
    assert all(credentials(None, host) is None for host in LOCAL_HOSTS)
    with pytest.raises(ConfigError, match="listening on 0.0.0.0 exposes"):
        credentials(None, "0.0.0.0")
    with pytest.raises(ConfigError, match="a public share link"):
        credentials(None, "127.0.0.1", share=True)
    assert credentials("u:p:q", "0.0.0.0", share=True) == ("u", "p:q")
    for bad in ("u", "u:", ":p", ":"):
        with pytest.raises(ConfigError, match="user:password"):
            credentials(bad, "127.0.0.1")


def test_the_app_and_the_api_server_refuse_the_same_exposure_in_the_same_words(
        tmp_path, monkeypatch, capsys):
    for name in ("PREFIXLAB_HOST", "PREFIXLAB_AUTH"):
        monkeypatch.delenv(name, raising=False)
    for host, auth in (("0.0.0.0", None), ("127.0.0.1", "nopassword")):
        argv = ["--host", host] + (["--auth", auth] if auth else [])
        with pytest.raises(SystemExit) as refused:
            app.access(app.parse_args(argv))
        assert refused.value.code == 2  # as `python -m prefixlab serve` exits on it
        # The API server refuses before it opens the data directory or loads a model.
        with pytest.raises(ConfigError) as also:
            serve_api(tmp_path / "data", host=host, auth=auth)
        assert capsys.readouterr().err == f"error: {also.value}\n"
    assert not (tmp_path / "data").exists()
