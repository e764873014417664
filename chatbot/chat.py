"""ChatService: one conversation's turns, the engine and the store, tied together.

Both the browser UI and the `chat` command go through here, so a reply is
stored the same way whichever way it was asked for. A `ChatSession` is the
per-user state (the UI keeps it in `gr.State`); the service itself holds only
shared, thread-safe services.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterator, Sequence

from . import conversation_tree as tree
from .default_model import ModelLoadError
from .engine import Engine, EngineUnavailable, GenerationParams, Reply
from .knowledge.lorebook import Activation, activate
from .knowledge.retrieval import Passages, PersonaKnowledge
from .personas import LoadedPersona, PersonaLibrary, RenderedPersona, parse_persona, render
from .prompting import Prompt, PromptTooLong, build_prompt, estimate_tokens
from .store import ChatStore, ConversationRecord, MessageRecord, ModelVersionRecord, NotFound
from .store.repository import SEARCH_LENGTH, UNCHANGED, VoteRow

log = logging.getLogger(__name__)

# The longest message accepted, checked before anything reads it: tokenizing is what costs
# (a 10 MB message took 30 s of CPU and 1.2 GB to refuse). 100,000 characters are about
# 25,000 tokens, far more than the bundled model's 8,192-token context holds.
MAX_MESSAGE_CHARS = 100_000
# Feedback is stored twice (the vote and its history row): the longest comment and reason tags accepted.
MAX_COMMENT_CHARS = 10_000
MAX_REASON_CHARS = 200
# The longest search of one's conversations; the store refuses longer ones (the UI's box stops there).
MAX_SEARCH_CHARS = SEARCH_LENGTH
DELETED = "this conversation was deleted (perhaps in another window); start a new chat"


class ChatError(Exception):
    """Something the user asked for cannot be done; the message says why."""


def check_text(text: str | None, limit: int, what: str) -> None:
    """ChatError when ``text`` is longer than ``limit`` characters, or holds a NUL character.

    PostgreSQL cannot store NUL in text, and SQLite's LIKE stops reading at
    one (search would miss what follows): refused the same on every database.
    """
    if text is None:
        return
    if len(text) > limit:
        raise ChatError(f"the {what} is too long: {len(text):,} characters, at most {limit:,}")
    if "\x00" in text:
        raise ChatError(f"the {what} contains a NUL character (\\x00), which cannot be stored")


@dataclass
class Turn:
    role: str
    content: str
    message_id: int | None = None  # None until stored
    provenance: dict | None = None  # a reply's: what persona knowledge added to its prompt


@dataclass
class ChatSession:
    """The active branch of one conversation, as the user sees it."""

    user_id: int
    persona: LoadedPersona  # pinned: a running chat keeps the persona version it started with
    rendered: RenderedPersona  # the persona's text for the model, macros expanded for this user
    conversation_id: int | None = None  # created by the first message, so idle visits store nothing
    turns: list[Turn] = field(default_factory=list)
    read_only: bool = False  # an admin looking at someone else's conversation

    def check_writable(self) -> None:
        if self.read_only:
            raise ChatError("this conversation belongs to another user: you can read it, not add to it")

    def history(self) -> list[dict]:
        return [{"role": t.role, "content": t.content} for t in self.turns]

    @property
    def adapter(self) -> str | None:
        """The persona file's LoRA adapter folder; what serves may be a promoted one (ChatService.serving)."""
        return persona_adapter(self.persona)

    def prompt(self, extra: list[dict] = (), count_tokens: Callable[[str], int] = estimate_tokens,
               passages: Passages | None = None) -> Prompt:
        """The messages for the model: the persona, what its lorebook adds for this conversation
        (`count_tokens` counts the lorebook's budget), the `passages` found in its documents, the
        turns and `extra` after them."""
        r = self.rendered
        history = self.history() + list(extra)
        lore = activate(r.lorebook, history, count_tokens, r.expand) if r.lorebook else Activation()
        passages = passages or Passages()
        at_depth = lore.at_depth()
        if r.depth_prompt is not None:
            at_depth.append((r.depth_prompt.depth, r.depth_prompt.role, r.depth_prompt.prompt))
        provenance = {key: rows for key, rows in (("lorebook", lore.provenance()),
                                                   ("documents", passages.provenance())) if rows}
        return build_prompt(r.system(lore, passages.text()), history, r.examples, r.post_history_instructions,
                            at_depth, provenance or None)


def persona_adapter(persona: LoadedPersona) -> str | None:
    """The persona file's LoRA adapter folder (relative paths are next to the persona file)."""
    adapter = persona.persona.adapter
    return str((persona.path.parent / adapter).resolve()) if adapter else None


def params_for(persona: LoadedPersona, **overrides) -> GenerationParams:
    """The persona's generation settings, with any non-None overrides on top."""
    base = persona.persona.generation.model_dump()
    base.update({k: v for k, v in overrides.items() if v is not None})
    return GenerationParams(**base)


class ChatService:
    def __init__(self, engine: Engine, personas: PersonaLibrary, store: ChatStore,
                 knowledge: PersonaKnowledge | None = None):
        """``knowledge``: the persona documents' index; None leaves documents out of every prompt."""
        self.engine = engine
        self.personas = personas
        self.store = store
        self.knowledge = knowledge
        self._base_mismatch_warned: set[int] = set()  # promoted versions made for another base model

    def serving(self, persona: LoadedPersona,
                conversation_id: int | None = None) -> tuple[str | None, ModelVersionRecord | None]:
        """(adapter folder, promoted version) that answers for ``persona`` now.

        Asked for every reply, so a promotion or rollback made anywhere (the
        `models` command in another process) takes effect on the next one.
        In a conversation that a running canary put in its candidate arm, the
        canary's candidate version answers: every reply of it, Retry included
        (the arm was stored when the conversation was created).
        Without a promoted version for this engine's base model: the persona
        file's own adapter (or the bare base, None), and no version.
        """
        version = self.store.serving_version(persona.id, conversation_id)
        if version is not None and version.base_model == self.engine.model_id:
            return version.adapter_path, version
        if version is not None and version.id not in self._base_mismatch_warned:
            self._base_mismatch_warned.add(version.id)
            log.warning("persona %s: promoted version %s was made for %r, but this app serves %r; "
                        "using the persona file's adapter instead", persona.id, version.id,
                        version.base_model, self.engine.model_id)
        return persona_adapter(persona), None

    def close(self) -> None:
        """Release the engine and the store's connections (a command that is done with them)."""
        self.engine.close()
        if self.knowledge is not None:
            self.knowledge.close()
        self.store.close()

    def user_id(self, name: str) -> int:
        return self.store.get_or_create_user(name)

    def new_session(self, user_id: int, persona_id: str, user_name: str = "User",
                    greeting: int = 0) -> ChatSession:
        """A new chat on the persona's current file (edits on disk are picked up here).

        `greeting` picks the greeting: 0 the main one, 1.. the alternates.
        """
        self.personas.refresh()
        persona = self.personas.get(persona_id)
        rendered = render(persona, user_name)
        if not 0 <= greeting < len(rendered.greetings):
            raise ChatError(f"persona {persona_id!r} has no greeting number {greeting}")
        return ChatSession(user_id=user_id, persona=persona, rendered=rendered,
                           turns=[Turn("assistant", rendered.greetings[greeting])])

    def try_draft(self, persona: LoadedPersona, text: str, params: GenerationParams,
                  user_name: str = "User", stop: threading.Event | None = None) -> Iterator[Reply]:
        """Stream a reply from a persona that is not saved yet; nothing is stored."""
        session = ChatSession(user_id=0, persona=persona, rendered=render(persona, user_name))
        session.turns = [Turn("assistant", session.rendered.greetings[0])]
        check_text(text, MAX_MESSAGE_CHARS, "message")
        if not text.strip():
            raise ChatError("the message is empty")
        yield from self._stream(session, self._prompt(session, [{"role": "user", "content": text.strip()}]),
                                params, stop, *self.serving(persona))

    def send(self, session: ChatSession, text: str, params: GenerationParams,
             stop: threading.Event | None = None, history: Sequence[dict] = ()) -> Iterator[Reply]:
        """Store the user's message, then stream and store the reply.

        ``history``: earlier turns said elsewhere, stored first (see ``_with_history``),
        for clients that keep a conversation themselves and send it whole (the /v1 API).
        A last message still without a reply (its reply was cut off) is replaced
        by this one, a sibling of it: never two user turns in a row.
        """
        session.check_writable()
        check_text(text, MAX_MESSAGE_CHARS, "message")  # before anything tokenizes it
        text = text.strip()
        if not text:
            raise ChatError("the message is empty")
        self._existing(session)
        current = session.turns[:-1] if self.unanswered(session) else session.turns
        turns = self._with_history(replace(session, turns=current), history)
        # Check the context before storing anything: a message that cannot fit is refused whole.
        # The prompt built here is the reply's: the turns stored below are these, with this message last
        # (so the documents are searched once per message).
        prompt = self._prompt(replace(session, turns=turns), [{"role": "user", "content": text}])
        self.engine.fit(prompt, params.max_new_tokens)
        session.turns = current
        if turns[0] is not session.turns[0]:  # the client's own opening instead of the greeting
            session.turns = [turns[0]]
        self._ensure_conversation(session)
        for turn in turns[len(session.turns):]:
            turn.message_id = self._add_message(session, turn.role, turn.content)
            session.turns.append(turn)
        session.turns.append(Turn("user", text, self._add_message(session, "user", text)))
        yield from self._reply(session, params, stop, prompt)

    @staticmethod
    def _with_history(session: ChatSession, history: Sequence[dict]) -> list[Turn]:
        """The session's turns with ``history``'s user and assistant messages after them (not stored yet).

        A history that opens a new conversation with an assistant message (a
        client's own greeting) replaces the persona's greeting with it. The
        assistant messages added here carry no model version or prompt when
        stored: nothing here wrote them, and training data skips them as it
        skips greetings.
        """
        turns = list(session.turns)
        history = list(history)
        for m in history:
            if m["role"] not in ("user", "assistant"):
                raise ChatError(f"a {m['role']} message cannot be part of a conversation's history")
            check_text(m["content"], MAX_MESSAGE_CHARS, f"{m['role']} message in the history")
            if not m["content"].strip():
                raise ChatError(f"an empty {m['role']} message cannot be part of a conversation's history")
        if history and history[0]["role"] == "assistant" and session.conversation_id is None \
                and len(turns) == 1:
            turns[0] = Turn("assistant", history.pop(0)["content"])
        return turns + [Turn(m["role"], m["content"]) for m in history]

    def retry(self, session: ChatSession, params: GenerationParams,
              stop: threading.Event | None = None) -> Iterator[Reply]:
        """Regenerate the last reply; the new one is stored as a sibling of the old.

        A last message still without a reply (its reply was cut off: the
        server stopped mid-reply) is answered instead.
        """
        session.check_writable()
        self._existing(session)
        if self.unanswered(session):
            yield from self._reply(session, params, stop)
            return
        if len(session.turns) < 2 or session.turns[-1].role != "assistant" \
                or session.turns[-2].role != "user":
            raise ChatError("there is no reply to retry yet")
        previous = session.turns.pop()
        try:
            yield from self._reply(session, params, stop)
        except ChatError:
            session.turns.append(previous)  # nothing new was written: keep showing the old reply
            raise

    def send_samples(self, session: ChatSession, text: str, params: GenerationParams, n: int) -> list[Turn]:
        """Store the user's message and ``n`` replies to it, sampled together in one batch.

        The replies are siblings, as Retry makes them, each stored with its own
        seed (the given seed + its row); the session shows the last.
        For `simulate`, where several replies to one prompt are wanted at once.
        """
        session.check_writable()
        check_text(text, MAX_MESSAGE_CHARS, "message")
        text = text.strip()
        if not text:
            raise ChatError("the message is empty")
        self._existing(session)
        current = session.turns[:-1] if self.unanswered(session) else session.turns  # as in send
        prompt = self._prompt(replace(session, turns=current), [{"role": "user", "content": text}])
        self.engine.fit(prompt, params.max_new_tokens)  # refused whole before anything is stored
        session.turns = current
        self._ensure_conversation(session)
        session.turns.append(Turn("user", text, self._add_message(session, "user", text)))
        adapter, promoted = self.serving(session.persona, session.conversation_id)
        try:  # `prompt` is still the reply's: the turns are `current` and this message, as it was built from
            replies = self.engine.generate_batch(prompt, params, n, adapter=adapter)
        except ModelLoadError as exc:
            raise _load_failed(exc, session, promoted) from None
        except EngineUnavailable as exc:
            raise ChatError(str(exc)) from None
        turns = [self._store_reply(session, reply, adapter, prompt.provenance) for reply in replies]
        session.turns.append(turns[-1])
        return turns

    def undo(self, session: ChatSession) -> str:
        """Take back the last exchange; returns the user's text so it can be edited.

        Nothing is deleted: the stored messages stay in the conversation tree,
        and the next message branches from the turn before them. A last message
        without a reply (cut off) is taken back alone.
        """
        if len(session.turns) >= 2 and self.unanswered(session):
            return session.turns.pop().content
        if len(session.turns) < 3 or session.turns[-2].role != "user":
            raise ChatError("there is nothing to undo")
        session.turns.pop()
        return session.turns.pop().content

    def edit(self, session: ChatSession, turn_index: int, text: str, params: GenerationParams,
             stop: threading.Event | None = None) -> Iterator[Reply]:
        """Replace one of the user's messages: a new branch from the turn before it, answered anew."""
        if not 0 < turn_index < len(session.turns) or session.turns[turn_index].role != "user":
            raise ChatError(f"message {turn_index} is not one of your messages in this conversation")
        kept = session.turns[:turn_index]
        removed = session.turns[turn_index:]
        session.turns = kept
        try:
            yield from self.send(session, text, params, stop)
        except (ChatError, PromptTooLong):
            session.turns = kept + removed  # refused: the conversation stays as it was
            raise

    def vote(self, session: ChatSession, turn_index: int, rating: int | None, *,
             reason: str | None | object = UNCHANGED, comment: str | None | object = UNCHANGED,
             simulated: bool = False) -> None:
        """Record, change (+1/-1) or clear (None) the user's vote on one reply of this session.

        `reason` (preset tags) and `comment` are kept as they were unless given.
        `simulated` marks a vote cast by a rule (`persona-studio simulate`), not a person.
        """
        session.check_writable()
        _check_feedback(reason, comment)
        if not 0 <= turn_index < len(session.turns) or session.turns[turn_index].role != "assistant":
            raise ChatError(f"message {turn_index} is not a reply in this conversation")
        self._existing(session)
        message_id = session.turns[turn_index].message_id
        if message_id is None:  # the greeting of a chat that has no messages yet
            self._ensure_conversation(session)
            message_id = session.turns[turn_index].message_id
        try:
            self.store.set_feedback(message_id, session.user_id, rating, reason=reason, comment=comment,
                                    simulated=simulated)
        except NotFound:
            self._existing(session)  # deleted meanwhile: say so, not "message N does not exist"
            raise

    def vote_message(self, user_id: int, message_id: int, rating: int | None, *,
                     reason: str | None | object = UNCHANGED,
                     comment: str | None | object = UNCHANGED) -> None:
        """``vote`` by stored message id (the /v1 API): the user's vote on a reply in one of their conversations.

        ChatError("message N not found") for a message that is missing, in
        someone else's conversation or not a reply: others' look like missing ones.
        """
        _check_feedback(reason, comment)
        try:
            message = self.store.get_message(int(message_id))
            self._owned(user_id, message.conversation_id)
        except (NotFound, TypeError, ValueError, ChatError):
            raise ChatError(f"message {message_id} not found") from None
        if message.role != "assistant":
            raise ChatError(f"message {message_id} not found: it is a {message.role} message, not a reply")
        self.store.set_feedback(message.id, user_id, rating, reason=reason, comment=comment)

    def current_vote(self, session: ChatSession, turn_index: int) -> int | None:
        message_id = session.turns[turn_index].message_id if 0 <= turn_index < len(session.turns) else None
        return None if message_id is None else self.store.get_feedback(message_id, session.user_id)

    # -- the history of conversations ----------------------------------------

    def conversations(self, user_id: int, search: str = "") -> list[ConversationRecord]:
        """The user's conversations, newest first; ``search`` (matched literally) must be short."""
        try:
            return self.store.list_conversations(user_id, search)
        except ValueError as exc:  # the search is too long
            raise ChatError(str(exc)) from None

    def conversation(self, user_id: int, conversation_id: int, as_admin: bool = False) -> ConversationRecord:
        """The stored conversation (its title, persona, dates) if this user may see it: their own,
        or anyone's for an admin (``as_admin``); others' are ChatError("not found"), like missing ones."""
        return self._owned(user_id, conversation_id, as_admin)

    def all_feedback(self, as_admin: bool) -> list[VoteRow]:
        """Everyone's current votes with their replies and context, oldest first (the Feedback tab).

        Admins only: ChatError unless ``as_admin`` (the role, read afresh for the request).
        """
        if not as_admin:
            raise ChatError("only admins can see everyone's feedback")
        return self.store.feedback_rows()

    def check_access(self, session: ChatSession, as_admin: bool) -> None:
        """ChatError unless whoever holds ``session`` may still see its conversation.

        Asked on every action, not only when the conversation was opened: its
        owner may while it exists, anyone else only while an admin now
        (``as_admin``, the role read afresh), so a demoted admin loses a
        conversation they had open at their next click.
        """
        conversation = self._existing(session)
        if conversation is not None and conversation.user_id != session.user_id and not as_admin:
            raise ChatError("only admins can see other people's conversations; start a new chat")

    def _existing(self, session: ChatSession) -> ConversationRecord | None:
        """The session's stored conversation (None before its first message); ChatError if it was deleted."""
        if session.conversation_id is None:
            return None
        try:
            return self.store.get_conversation(session.conversation_id)
        except NotFound:
            raise ChatError(DELETED) from None

    @staticmethod
    def unanswered(session: ChatSession) -> bool:
        """Does the session end with a stored message of the user's without a reply?

        A reply cut off before it was stored (the server stopped mid-reply)
        leaves one; Retry answers it, and a new message replaces it.
        """
        return len(session.turns) > 1 and session.turns[-1].role == "user" \
            and session.turns[-1].message_id is not None

    def _add_message(self, session: ChatSession, role: str, content: str, **fields) -> int:
        """Store a message after the session's last turn; ChatError if the conversation was deleted meanwhile."""
        try:
            return self.store.add_message(session.conversation_id, role, content,
                                          parent_id=session.turns[-1].message_id, **fields)
        except NotFound:
            self._existing(session)  # raises ChatError(DELETED) when that was the cause
            raise

    def _owned(self, user_id: int, conversation_id: int, as_admin: bool = False) -> ConversationRecord:
        """The conversation if it is this user's (any, for an admin); others' look like missing ones."""
        try:
            conversation = self.store.get_conversation(int(conversation_id))
        except (NotFound, TypeError, ValueError):
            conversation = None
        if conversation is None or (conversation.user_id != user_id and not as_admin):
            raise ChatError(f"conversation {conversation_id} not found")
        return conversation

    def resume(self, user_id: int, conversation_id: int, user_name: str = "User",
               as_admin: bool = False) -> ChatSession:
        """Reopen a conversation on its latest branch, with the persona version it was started with.

        An admin may open anyone's (links from the Feedback tab); what they add is theirs.
        """
        conversation = self._owned(user_id, conversation_id, as_admin)
        library_copy = self.personas.personas.get(conversation.persona_id)
        if library_copy is not None and library_copy.version == conversation.persona_hash:
            persona = library_copy
        else:  # the file changed or is gone: use the text this conversation was started with
            text = self.store.persona_version_text(conversation.persona_id, conversation.persona_hash)
            path = self.personas.folder / f"{conversation.persona_id}.yaml"
            persona = LoadedPersona(conversation.persona_id, parse_persona(text, str(path)), text,
                                    conversation.persona_hash, path)
        session = ChatSession(user_id=user_id, persona=persona, rendered=render(persona, user_name),
                              conversation_id=conversation.id, read_only=conversation.user_id != user_id)
        self._show_branch(session, tree.latest_branch(self.store.conversation_messages(conversation.id)))
        return session

    def sibling_position(self, session: ChatSession, turn_index: int) -> tuple[int, int]:
        """(1-based position, count) of a turn among its siblings; (1, 1) when it has none."""
        turn = session.turns[turn_index]
        if turn.message_id is None:
            return 1, 1
        ids = [m.id for m in tree.siblings(self._messages(session), turn.message_id)]
        return ids.index(turn.message_id) + 1, len(ids)

    def switch_sibling(self, session: ChatSession, turn_index: int, step: int) -> None:
        """Show the previous (-1) or next (+1) sibling of a turn, continuing along its newest replies."""
        turn = session.turns[turn_index] if 0 <= turn_index < len(session.turns) else None
        if turn is None or turn.message_id is None:
            raise ChatError("that message has no other versions")
        messages = self._messages(session)
        ids = [m.id for m in tree.siblings(messages, turn.message_id)]
        target = ids.index(turn.message_id) + step
        if not 0 <= target < len(ids):
            raise ChatError("no more versions in that direction")
        self._show_branch(session, tree.branch_through(messages, ids[target]))

    def _messages(self, session: ChatSession) -> list[MessageRecord]:
        """All the stored messages of the session's conversation; ChatError if it was deleted."""
        messages = self.store.conversation_messages(session.conversation_id)
        if not messages:  # every stored conversation has its greeting: this one is gone
            self._existing(session)
        return messages

    def rename(self, user_id: int, conversation_id: int, title: str) -> None:
        self._owned(user_id, conversation_id)
        try:
            self.store.rename_conversation(int(conversation_id), title)
        except ValueError as exc:
            raise ChatError(str(exc)) from None

    def delete(self, user_id: int, conversation_id: int) -> None:
        self._owned(user_id, conversation_id)
        self.store.delete_conversation(int(conversation_id))

    def export_conversation(self, user_id: int, conversation_id: int) -> dict:
        """The whole conversation (every branch, with the user's votes) as JSON-ready data."""
        conversation = self._owned(user_id, conversation_id)
        votes = self.store.conversation_votes(conversation.id, user_id)

        def message(m: MessageRecord) -> dict:
            data = {k: v.isoformat() if hasattr(v, "isoformat") else v for k, v in asdict(m).items()}
            vote = votes.get(m.id)
            data["feedback"] = None if vote is None else {
                "rating": vote.rating, "reason": vote.reason, "comment": vote.comment,
                "updated_at": vote.updated_at.isoformat()}
            return data

        return {
            "conversation": {k: v.isoformat() if hasattr(v, "isoformat") else v
                             for k, v in asdict(conversation).items()},
            "persona_text": self.store.persona_version_text(conversation.persona_id, conversation.persona_hash),
            "messages": [message(m) for m in self.store.conversation_messages(conversation.id)],
        }

    def _show_branch(self, session: ChatSession, branch: list[MessageRecord]) -> None:
        session.turns = [Turn(m.role, m.content, m.id, m.provenance) for m in branch]

    def _prompt(self, session: ChatSession, extra: Sequence[dict] = ()) -> Prompt:
        """The session's prompt (with `extra` after its turns), with the passages the persona's
        documents hold for the newest user message."""
        passages = None
        settings = session.persona.persona.knowledge
        if self.knowledge is not None and settings is not None:
            history = session.history() + list(extra)
            query = next((m["content"] for m in reversed(history) if m["role"] == "user"), "")
            passages = self.knowledge.retrieve(session.persona.id, settings, query, self.engine.count_text_tokens)
        return session.prompt(extra, self.engine.count_text_tokens, passages)

    def _stream(self, session: ChatSession, prompt: Prompt, params: GenerationParams,
                stop: threading.Event | None, adapter: str | None,
                promoted: ModelVersionRecord | None = None) -> Iterator[Reply]:
        try:
            yield from self.engine.stream(prompt, params, stop, adapter=adapter)
        except ModelLoadError as exc:
            raise _load_failed(exc, session, promoted) from None
        except EngineUnavailable as exc:  # the model server is down: the message is kept, the reply is not
            raise ChatError(str(exc)) from None

    def _ensure_conversation(self, session: ChatSession) -> None:
        if session.conversation_id is not None:
            return
        persona = session.persona
        self.store.record_persona_version(persona.id, persona.version, persona.text)
        session.conversation_id = self.store.create_conversation(
            session.user_id, persona.id, persona.version)
        greeting = session.turns[0]
        greeting.message_id = self.store.add_message(
            session.conversation_id, "assistant", greeting.content, finish_reason="greeting")

    def _reply(self, session: ChatSession, params: GenerationParams, stop: threading.Event | None,
               prompt: Prompt | None = None) -> Iterator[Reply]:
        """Stream and store the reply to the session's last turn; `prompt`: its prompt, if already built."""
        # Looked up once per reply: the adapter that writes it is the one recorded with it.
        adapter, promoted = self.serving(session.persona, session.conversation_id)
        reply = None
        prompt = prompt or self._prompt(session)
        for reply in self._stream(session, prompt, params, stop, adapter, promoted):
            yield reply
        assert reply is not None and reply.done
        session.turns.append(self._store_reply(session, reply, adapter, prompt.provenance))

    def _store_reply(self, session: ChatSession, reply: Reply, adapter: str | None,
                     provenance: dict | None = None) -> Turn:
        """Store a finished reply to the session's last (user) turn, with what persona knowledge
        added to its prompt (``provenance``); its Turn."""
        # A promoted version's row, since identity is (base model, adapter folder).
        version = self.store.get_or_create_model_version(self.engine.model_id, adapter)
        params = reply.params.to_dict()
        message_id = self._add_message(
            session, "assistant", reply.text, model_version_id=version,
            generation_params=params, prompt=reply.prompt,
            prompt_tokens=reply.prompt_tokens, completion_tokens=reply.completion_tokens,
            latency_ms=reply.latency_ms, first_token_ms=reply.first_token_ms,
            finish_reason=reply.finish_reason, provenance=provenance)
        return Turn("assistant", reply.text, message_id, provenance)


def _check_feedback(reason, comment) -> None:
    """ChatError for reason tags or a comment longer than is stored (each vote is stored twice)."""
    check_text(reason if isinstance(reason, str) else None, MAX_REASON_CHARS, "feedback reason")
    check_text(comment if isinstance(comment, str) else None, MAX_COMMENT_CHARS, "feedback comment")


def _load_failed(exc: ModelLoadError, session: ChatSession, promoted: ModelVersionRecord | None) -> ChatError:
    """The chat's one-line error for an adapter that would not load, saying how to take it off."""
    if promoted is not None and promoted.status != "serving":  # a canary's candidate
        return ChatError(f"{exc} (model version {promoted.id}, on trial in a canary for persona "
                         f"{session.persona.id}; `persona-studio models canary-stop {session.persona.id}` ends it)")
    if promoted is not None:
        return ChatError(f"{exc} (model version {promoted.id}, promoted for persona {session.persona.id}; "
                         f"`persona-studio models rollback {session.persona.id}` puts back what served before)")
    return ChatError(str(exc))
