"""The `persona-studio` command as a user runs it: `main(argv)` on a real SQLite file; `serve` in a real process.

`serve`'s start-up checks run in a subprocess: their exit status is the point.
"""

import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import run_cli

pytestmark = pytest.mark.model


def run(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "chatbot.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def cli():
    return run_cli


def test_chat_streams_a_reply_and_stores_it(data_dir, cli):
    done = cli("chat", "--data-dir", str(data_dir), "--persona", "pirate", "--max-new-tokens", "10",
               "--seed", "5", "Ahoy, who are ye?")
    assert done.returncode == 0, done.stderr
    reply = done.stdout.strip()
    assert reply
    with sqlite3.connect(data_dir / "chat.db") as db:
        rows = db.execute("select role, content, completion_tokens from messages order by id").fetchall()
    assert [r[0] for r in rows] == ["assistant", "user", "assistant"]
    assert rows[1][1] == "Ahoy, who are ye?"
    assert rows[2][1].strip() == reply and rows[2][2] <= 10


def one_line_error(done, expected):
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("persona-studio: error: ") and expected in lines[-1], done.stderr
    assert "Traceback" not in done.stderr


def test_port_in_use_is_one_line_error(data_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = run("serve", "--data-dir", str(data_dir), "--port", str(port), timeout=60)
    one_line_error(done, f"port {port} on 127.0.0.1 is already in use")


def test_worker_priority_out_of_range_is_one_line_error(data_dir):
    done = run("serve", "--data-dir", str(data_dir), "--port", "0", "--worker-nice", "25", timeout=60)
    one_line_error(done, "--worker-nice 25: give 0 to 19")


@pytest.mark.parametrize("given, said", [("0", "--job-poll-seconds 0: give 0.1 to 60"),
                                         ("often", "setting job_poll_seconds: expected a number, got 'often'")])
def test_a_bad_job_poll_interval_is_one_line_error(data_dir, given, said):
    done = run("serve", "--data-dir", str(data_dir), "--port", "0", "--job-poll-seconds", given, timeout=60)
    one_line_error(done, said)


def test_unwritable_data_dir_is_one_line_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    done = run("serve", "--data-dir", str(blocker / "data"), timeout=60)
    one_line_error(done, f"data directory {blocker / 'data'} is not writable")


def test_unreachable_database_is_one_line_error(data_dir, tmp_path, cli):
    done = cli("chat", "--data-dir", str(data_dir), "--db-url", f"sqlite:///{tmp_path}/missing/dir/x.db",
               "--persona", "pirate", "hi")
    one_line_error(done, "cannot open database")


def test_bad_model_path_is_one_line_error(data_dir, tmp_path, cli):
    done = cli("chat", "--data-dir", str(data_dir), "--model", str(tmp_path), "--persona", "pirate", "hi")
    one_line_error(done, "is not a checkpoint folder")


def test_model_setting_from_environment(data_dir, tmp_path, monkeypatch, cli):
    monkeypatch.setenv("PERSONA_STUDIO_MODEL", str(tmp_path))
    done = cli("chat", "--data-dir", str(data_dir), "--persona", "pirate", "hi")
    one_line_error(done, f"cannot load model '{tmp_path}'")


def test_unknown_engine_is_one_line_error(data_dir, cli):
    done = cli("chat", "--data-dir", str(data_dir), "--engine", "tgi", "--persona", "pirate", "hi")
    one_line_error(done, "unknown engine 'tgi': use transformers or vllm")


def test_unreachable_engine_url_is_one_line_error(data_dir, cli):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    done = cli("chat", "--data-dir", str(data_dir), "--engine-url", f"http://127.0.0.1:{port}/v1",
               "--persona", "pirate", "hi")
    one_line_error(done, f"the vLLM server at http://127.0.0.1:{port}/v1 is unreachable")


def test_engine_vllm_without_its_environment_says_how_to_make_it(tmp_path):
    from chatbot.engine import EngineUnavailable
    from chatbot.vllm_engine import VLLMServer

    server = VLLMServer(tmp_path / "no-venv" / "bin" / "python", tmp_path, "m", 1, tmp_path / "vllm.log")
    with pytest.raises(EngineUnavailable, match="run `make vllm`"):
        server.start()


def test_a_vllm_server_that_dies_while_starting_is_one_line_pointing_at_its_log(tmp_path):
    from chatbot.engine import EngineUnavailable
    from chatbot.vllm_engine import VLLMServer

    server = VLLMServer(Path(sys.executable), tmp_path / "no-model", "m", 1, tmp_path / "vllm.log")
    with pytest.raises(EngineUnavailable) as caught:  # this python has no vllm: the module is missing
        server.start(timeout=120)
    message = str(caught.value)
    assert "exited with status 1 while starting" in message and str(tmp_path / "vllm.log") in message
    assert "No module named 'vllm'" in message and "\n" not in message
