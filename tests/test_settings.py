from pathlib import Path

import pytest

from chatbot.settings import Settings


def test_defaults_env_and_flags_in_order_of_precedence(tmp_path):
    env = {"PERSONA_STUDIO_PORT": "9000", "PERSONA_STUDIO_MODEL": "/models/x", "PERSONA_STUDIO_HOST": ""}
    s = Settings.from_sources({"port": "9100", "data_dir": str(tmp_path)}, environ=env)
    assert s.port == 9100  # flag beats environment
    assert s.model == "/models/x"  # environment beats default
    assert s.host == "127.0.0.1"  # an empty variable counts as unset
    assert s.data_dir == tmp_path
    assert s.database_url == f"sqlite:///{tmp_path / 'chat.db'}"


def test_db_url_setting_replaces_sqlite_default():
    s = Settings.from_sources({"db_url": "postgresql+psycopg://u:p@localhost/db"}, environ={})
    assert s.database_url == "postgresql+psycopg://u:p@localhost/db"


def test_bad_integer_names_the_setting():
    with pytest.raises(ValueError, match="setting port: expected an integer, got 'abc'"):
        Settings.from_sources({}, environ={"PERSONA_STUDIO_PORT": "abc"})


def test_default_data_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert Settings.from_sources({}, environ={}).data_dir == Path(tmp_path) / "persona-studio"
