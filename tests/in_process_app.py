"""The web app in this process on real HTTP: what `serve` runs, answering from FakeEngine.

``running_app`` (browser_helpers.py) starts ``python app.py``, which loads the
bundled model: seconds to start and to answer. Tests of the HTTP surface (the
/v1 API, signing in, who may see what) do not depend on what the model says;
they get the same server here (``build_server``, as `serve` builds it, over
the data directory's SQLite file and a personas folder) on a free port, with
a ``FakeEngine`` (tests/fake_engine.py) in place of the model. `python app.py`
itself keeps its own tests (test_cli.py, the browser tests).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from browser_helpers import free_port, wait_until
from fake_engine import FakeEngine

from chatbot.chat import ChatService
from chatbot.cli.serve import build_server
from chatbot.settings import Settings
from chatbot.startup import build_service
from chatbot.ui.identity import Identity

REPO = Path(__file__).resolve().parent.parent


class ErrorRecords(logging.Handler):
    """What `python app.py` would have logged as an ERROR or a traceback while the app ran.

    A request handler that crashed is logged so (uvicorn, Gradio); bad requests must be answered instead.
    """

    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            self.records.append(record)

    def text(self) -> str:
        return "\n".join(self.format(r) for r in self.records)


@dataclass
class InProcessApp:
    url: str
    service: ChatService
    identity: Identity
    engine: FakeEngine
    errors: ErrorRecords = field(default_factory=ErrorRecords)


@contextmanager
def running_in_process(data_dir: Path, personas_dir: Path = REPO / "personas", auth: str = "auto",
                       engine: FakeEngine | None = None) -> Iterator[InProcessApp]:
    """`serve --data-dir data_dir --personas-dir personas_dir --auth auth` in a thread; stopped afterwards.

    As `serve` decides, the app has accounts when the database holds some
    (``auth`` "auto"). ``engine``: the FakeEngine to answer with (a new one if not given).
    """
    settings = Settings(data_dir=data_dir, personas_dir=personas_dir, port=free_port())
    data_dir.mkdir(parents=True, exist_ok=True)
    engine = engine or FakeEngine()
    service = build_service(settings, engine)  # as `serve` builds it, documents' index included
    identity = Identity.for_store(service.store, settings.user, auth, session_lifetime=settings.session_hours * 3600.0)
    # log_config=None: uvicorn's loggers propagate to the root logger, where ErrorRecords listens.
    server = uvicorn.Server(uvicorn.Config(build_server(service, identity, settings, auth), host=settings.host,
                                           port=settings.port, log_level="warning", log_config=None,
                                           timeout_graceful_shutdown=3))
    app = InProcessApp(f"http://{settings.host}:{settings.port}/", service, identity, engine)
    logging.getLogger().addHandler(app.errors)
    thread = threading.Thread(target=server.run, name="in-process app", daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), timeout=60, what="the app to listen")
        assert server.started, "the app stopped while starting"
        yield app
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        logging.getLogger().removeHandler(app.errors)
        service.close()  # the engine, the documents' index and the store
