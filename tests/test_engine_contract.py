"""One contract, both backends: the embedded transformers engine and a real vLLM server.

The vLLM server runs from ``.venv-vllm`` (``make vllm``; ``make test`` builds
it) on the bundled model, started once for this module (about a minute on 2
cores). Both serve the same random LoRA adapter.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from chatbot.default_model import ModelLoadError
from chatbot.engine import EngineUnavailable, GenerationParams
from chatbot.transformers_engine import TransformersEngine
from chatbot.vllm_engine import VLLMEngine, VLLMServer, default_python, free_port

pytestmark = pytest.mark.model

PIRATE = [{"role": "system", "content": "You are a pirate. Talk like a pirate."},
          {"role": "user", "content": "Where is the treasure?"}]
CHEF = [{"role": "system", "content": "You are a chef."},
        {"role": "user", "content": "How do I boil an egg?"}]
GREEDY = GenerationParams(temperature=0, max_new_tokens=16)
CONTEXT = 2048  # both backends' context window here


def final(replies):
    replies = list(replies)
    assert replies[-1].done and all(not r.done for r in replies[:-1])
    return replies[-1]


@pytest.fixture(scope="module")
def lora(checkpoint, tmp_path_factory) -> Path:
    """A random (non-identity) LoRA adapter on the bundled model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    folder = tmp_path_factory.mktemp("adapter")
    get_peft_model(model, config).save_pretrained(folder)
    return folder.resolve()


@pytest.fixture(scope="module")
def vllm_server(checkpoint, tmp_path_factory):
    python = default_python()
    if not python.exists():
        pytest.fail(f"{python} is missing: `make vllm` creates the vLLM environment these tests run")
    server = VLLMServer(python, checkpoint, "bundled", free_port(), tmp_path_factory.mktemp("vllm") / "vllm.log",
                        max_model_len=CONTEXT)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module", params=["transformers", "vllm"])
def backend(request, checkpoint):
    if request.param == "transformers":
        engine = TransformersEngine.load(str(checkpoint), checkpoint.parent.parent, "bfloat16", CONTEXT)
    else:
        server = request.getfixturevalue("vllm_server")
        engine = VLLMEngine.connect(server.url, checkpoint, "bundled")
    yield engine
    engine.close()


def test_a_reply_streams_and_reports_what_the_store_records(backend):
    replies = list(backend.stream(PIRATE, GenerationParams(max_new_tokens=16, seed=3)))
    texts = [r.text for r in replies]
    assert len(replies) > 3, "the reply arrives piece by piece"
    assert all(b.startswith(a) for a, b in zip(texts[:-2], texts[1:-1])), "each update extends the last"
    last = replies[-1]
    assert last.done and last.text.strip() and 0 < last.completion_tokens <= 16
    assert last.finish_reason in ("eos", "length")
    assert last.prompt == PIRATE and last.prompt_ids == backend.encode(PIRATE)
    assert last.prompt_tokens == len(last.prompt_ids)
    assert last.params.seed == 3 and 0 < last.first_token_ms <= last.latency_ms


def test_both_backends_give_the_model_the_same_token_ids(checkpoint, vllm_server):
    local = TransformersEngine.load(str(checkpoint), checkpoint.parent.parent, "bfloat16")
    remote = VLLMEngine.connect(vllm_server.url, checkpoint, "bundled")
    conversation = PIRATE + [{"role": "assistant", "content": "Arr, buried <b>deep</b>!"},
                             {"role": "user", "content": "Dig where? 🗺️ Über den Fluss?"}]
    try:
        got = [final(engine.stream(conversation, GREEDY)) for engine in (local, remote)]
    finally:
        local.close()
        remote.close()
    assert got[0].prompt_ids == got[1].prompt_ids == local.encode(conversation), \
        "the vLLM server was given other tokens than the embedded model"
    assert got[0].prompt_tokens == got[1].prompt_tokens


def test_stop_ends_the_reply_within_a_few_tokens_and_keeps_it(backend):
    stop = threading.Event()
    seen = None
    for reply in backend.stream(CHEF, GenerationParams(temperature=0, max_new_tokens=200), stop):
        if seen is None and reply.completion_tokens >= 2:
            seen = reply.completion_tokens
            stop.set()
    assert reply.done and reply.finish_reason == "stopped" and reply.text.strip()
    assert reply.completion_tokens <= seen + 4, f"{reply.completion_tokens} tokens, stop asked at {seen}"


def test_a_seeded_reply_is_the_same_with_others_chatting(backend):
    params = GenerationParams(temperature=1.0, max_new_tokens=24, seed=11)
    alone = final(backend.stream(PIRATE, params))
    barrier, got = threading.Barrier(5), {}

    def chat(name, messages, params):
        barrier.wait()
        got[name] = final(backend.stream(messages, params))

    threads = [threading.Thread(target=chat, args=(i, CHEF + [{"role": "assistant", "content": "Boil it."},
                                                               {"role": "user", "content": "Longer? " * i}],
                                                   GenerationParams(temperature=1.0, max_new_tokens=20, seed=i)))
               for i in range(1, 5)]
    threads.append(threading.Thread(target=chat, args=("pirate", PIRATE, params)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert got["pirate"].text == alone.text


def test_adapters_switch_per_request_while_requests_overlap(backend, lora):
    base_alone = final(backend.stream(CHEF, GREEDY)).text
    tuned_alone = final(backend.stream(CHEF, GREEDY, adapter=str(lora))).text
    assert tuned_alone != base_alone, "the adapter changed nothing"
    barrier, got = threading.Barrier(4), {}

    def chat(name, adapter):
        barrier.wait()
        got[name] = final(backend.stream(CHEF, GREEDY, adapter=adapter)).text

    threads = [threading.Thread(target=chat, args=(f"{kind}{i}", str(lora) if kind == "tuned" else None))
               for i in range(2) for kind in ("base", "tuned")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert got == {"base0": base_alone, "base1": base_alone, "tuned0": tuned_alone, "tuned1": tuned_alone}


def test_a_long_history_is_cut_to_the_context_window(backend):
    history = [PIRATE[0]]
    for i in range(60):
        history += [{"role": "user", "content": f"Tell me story number {i} about the sea and its ships."},
                    {"role": "assistant", "content": "Arr, a long tale of waves and wind and salt. " * 4}]
    history.append({"role": "user", "content": "And the last one?"})
    assert backend.count_tokens(history) > backend.context_tokens
    last = final(backend.stream(history, GenerationParams(temperature=0, max_new_tokens=16)))
    assert last.prompt[0] == PIRATE[0] and last.prompt[-1] == history[-1] and len(last.prompt) < len(history)
    assert last.prompt_tokens + 16 <= backend.context_tokens


def test_an_adapter_that_cannot_load_is_a_clear_error(backend, tmp_path):
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot load LoRA adapter"):
        final(backend.stream(CHEF, GREEDY, adapter=str(tmp_path)))
    assert final(backend.stream(CHEF, GREEDY)).text, "the engine still answers"


class Switch:
    """A TCP forwarder to the vLLM server that can be cut and restored: the server going away and back."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open = threading.Event()
        self.open.set()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self):
        """Refuse new connections and drop the open ones (the client's pooled keep-alive too)."""
        self.open.clear()
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _accept(self):
        while True:
            client, _ = self.listener.accept()
            if not self.open.is_set():
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source, sink):
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            sink.close()


def test_a_server_that_goes_away_is_a_clear_error_and_it_recovers(checkpoint, vllm_server):
    switch = Switch(vllm_server.port)
    engine = VLLMEngine.connect(f"http://127.0.0.1:{switch.port}/v1", checkpoint, "bundled")
    try:
        assert final(engine.stream(CHEF, GREEDY)).text
        switch.cut()
        with pytest.raises(EngineUnavailable, match=f"127.0.0.1:{switch.port}.*unreachable"):
            final(engine.stream(CHEF, GREEDY))
        switch.open.set()
        assert final(engine.stream(CHEF, GREEDY)).text, "the engine did not recover once the server was back"
    finally:
        engine.close()
    with pytest.raises(EngineUnavailable, match="unreachable"):
        VLLMEngine.connect(f"http://127.0.0.1:{free_port()}/v1", checkpoint, "bundled")
