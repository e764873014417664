"""Text from people, models and persona files, made safe to show as Markdown in Gradio.

Gradio turns a Chatbot message or a gr.Markdown value into HTML in the
browser (marked), and its sanitizer there only drops scripts and event
handlers: `<form>`, `<input>`, `<button>`, `<img>`, `style=` and `ping=`
survive it, and a Markdown image is fetched by whoever looks. So text has to
reach the browser already harmless, and every place that shows text someone
else controls goes through this module:

- `safe_markdown(text)`: Markdown still renders (emphasis, lists, tables,
  links, code, LaTeX), raw HTML never does. Outside code every `<` that could
  open a tag, comment or declaration becomes `&lt;` (it still shows as `<`);
  an image becomes `!` and a link to it, so nothing is fetched when a chat, a
  persona or a comment is opened; links keep only http, https, mailto and
  relative addresses (`#` goes before any other scheme); a task-list checkbox
  shows as `[ ]`, a mermaid block as code (mermaid renders HTML in labels).
  Code is left as written where the browser's parser is certain to agree that
  it is code: fenced blocks, whose boundaries are checked the way marked
  reads them; an inline code span with a tag in it becomes `<code>` with its
  text as character references, because marked's inline rules (links, bare
  URLs) can disagree about where a span starts. Where the two parsers might
  disagree about a fence, the rest of the text is treated as text: a `<` in
  code may then show as `&lt;`, never as HTML.
- `literal(text)`: text exactly as typed, on one line, with no Markdown or
  HTML meaning at all: for names, tags and comments placed inside a line the
  app writes itself.

`safe_markdown` is safe for a whole value (or whole lines of one), not for a
piece placed in the middle of a line; apply it once, to the finished text.
"""

from __future__ import annotations

import bisect
import functools
import html
import inspect
import re

SAFE_SCHEMES = ("http", "https", "mailto")

# A container prefix: block quote markers and list markers before a line's content.
_PREFIX = r"(?:[ \t]*(?:>|[-+*]|\d{1,9}[.)]))*[ \t]*"
_OPENER = re.compile(r"( {0,3})(?:(`{3,})[^`]*|(~{3,}).*)")
_FENCE_LIKE = re.compile(_PREFIX + r"(?:`{3}|~{3})")
_DEF_START = re.compile(_PREFIX + r"\[")
_SIMPLE_DEF_TAIL = re.compile(r"""[ \t]*\S+(?:[ \t]+(?:"[^"]*"|'[^']*'|\([^()]*\)))?[ \t]*""")
_LATEX = re.compile(r"\$\$[\s\S]+?\$\$")  # Gradio's default delimiters, matched as its frontend does
_BLANK_LINE = re.compile(r"(\n *(?=\n))")
_BACKTICKS = re.compile(r"`+")
_TAG_LIKE = re.compile(r"<[A-Za-z/!?]")
_EVEN_BACKSLASHES = r"(?<!\\)((?:\\\\)*)"
# An escaped `\<` too: marked's bare-URL autolinks (http://x\<img ...>) take the backslash along.
_ANGLE = re.compile(_EVEN_BACKSLASHES + r"(?:(<(?:https?|mailto):[^\s<>]*>)|\\?<(?=[A-Za-z/!?]))", re.IGNORECASE)
_IMAGE = re.compile(_EVEN_BACKSLASHES + r"!\[(\])?")
_TASK_BOX = re.compile(r"^((?:[ \t]*(?:>|[-+*]|\d{1,9}[.)]))*?[ \t]*(?:[-+*]|\d{1,9}[.)])[ \t]+)\[([ xX])\]",
                       re.MULTILINE)
# Where marked may read a link address: after `](` (inline link) or `]:` (definition); the
# address's first characters (enough for any real scheme, also written as character references).
_DESTINATION = re.compile(r"\][(:][ \t]*(?:\n[ \t]*)?<?(?=([^\s<>]{0,256}))")
_SCHEME = re.compile(r"([a-z][a-z0-9+.\-]*)(:?)")
_MARKDOWN_PUNCTUATION = re.compile(r"""([!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~])""")


def literal(text) -> str:
    """`text` as Markdown that shows exactly these characters on one line: no formatting,
    links, HTML, headings or list items, whatever it contains (newlines become spaces)."""
    escaped = _MARKDOWN_PUNCTUATION.sub(r"\\\1", " ".join(str(text).split()))
    return escaped.replace("\\<", "&lt;")  # like safe_markdown: no `<` leaves this module


def safe_messages(messages: list[dict]) -> list[dict]:
    """Chatbot messages with every text content passed through `safe_markdown`."""
    return [{**m, "content": safe_markdown(m["content"])} if isinstance(m.get("content"), str) else m
            for m in messages]


def safe_markdown(text: str | None) -> str:
    """Markdown that renders as before, without raw HTML, remote images or unsafe links (module doc)."""
    if not text:
        return ""
    # A streamed reply re-sends every earlier message at each step: remember the usual ones.
    return _safe_markdown_cached(text) if len(text) <= 20_000 else _safe_markdown(text)


@functools.lru_cache(maxsize=1024)
def _safe_markdown_cached(text: str) -> str:
    return _safe_markdown(text)


def _safe_markdown(text: str) -> str:
    # Gradio applies inspect.cleandoc to every Chatbot message and Markdown value (it expands
    # tabs and dedents); doing it first makes the lines checked here the lines marked reads.
    text = inspect.cleandoc(text.replace("\r\n", "\n").replace("\r", "\n").replace("\0", "\ufffd"))
    lines = text.split("\n")
    limit = len(lines)
    while True:
        out, spans = _assemble(lines, _fences(lines, limit))
        crossing = _crossed_by_latex(out, spans)
        if crossing is None:
            return out
        # Gradio lifts $$...$$ out before marked sees the text; one that crosses a fence's
        # boundary changes where the fence is, so that fence and all after it are text.
        limit = crossing


def _fences(lines: list[str], limit: int) -> list[tuple[int, int]]:
    """The fenced code blocks marked is sure to read as such, before line `limit` and before
    anything that makes it unsure: (opener line, last line) pairs."""
    fences: list[tuple[int, int]] = []
    i, n = 0, len(lines)
    while i < n:
        line = lines[i]
        opener = _OPENER.fullmatch(line) if i < limit else None
        if opener is None:
            if i >= limit or _FENCE_LIKE.match(line) or _risky_definition(lines, i):
                # A fence this check does not follow (in a list item or quote, indented, after
                # a definition whose title may run on): marked may see its boundaries elsewhere.
                return fences
            i += 1
            continue
        indent = len(opener.group(1))
        fence = opener.group(2) or opener.group(3)
        close = re.compile(re.escape(fence) + r"[~`]* *")  # marked's closing fence
        j = i + 1
        while j < n:
            content = lines[j]
            if not content.strip(" "):
                j += 1
                continue
            spaces = len(content) - len(content.lstrip(" "))
            if spaces < indent or not content.strip():
                # Less indented than the opener (a list item around the fence may end here),
                # or only odd whitespace: the fence ends here, or not; trust nothing after.
                fences.append((i, j - 1))
                return fences
            rest = content[spaces:]
            if rest.startswith(fence[0] * len(fence)) and not rest.strip("`~ \t"):
                if spaces <= 3 and close.fullmatch(rest):
                    break  # a closing fence inside or outside any list item
                if spaces <= indent + 3:  # closes it or not, depending on a list item around it
                    fences.append((i, j))
                    return fences
            j += 1
        fences.append((i, min(j, n - 1)))
        i = j + 1
    return fences


def _risky_definition(lines: list[str], i: int) -> bool:
    """A line that may start a link reference definition spanning several lines: marked
    reads a title in quotes or parentheses (and a label) across lines, even across a fence."""
    start = _DEF_START.match(lines[i])
    if start is None:
        return False
    rest = lines[i][start.end():]
    k = 0
    while k < len(rest):
        if rest[k] == "\\":
            k += 2
            continue
        if rest[k] == "[":
            return False  # not a label
        if rest[k] == "]":
            break
        k += 1
    else:
        return True  # a label that may go on over the next lines
    if not rest[k + 1:].startswith(":"):
        return False
    if not _SIMPLE_DEF_TAIL.fullmatch(rest[k + 2:]):
        return True
    following = lines[i + 1].lstrip() if i + 1 < len(lines) else ""
    return following[:1] in ("'", '"', "(")


def _assemble(lines: list[str], fences: list[tuple[int, int]]) -> tuple[str, list[tuple[int, ...]]]:
    """The output, and each fence's first line and offsets in it:
    (line, start, opener end, content start, end)."""
    parts: list[str] = []
    spans: list[tuple[int, ...]] = []
    cursor = offset = 0

    def add(piece: str) -> None:
        nonlocal offset
        if parts:
            offset += 1  # the newline joining it to the part before
        parts.append(piece)
        offset += len(piece)

    for first, last in fences:
        if first > cursor:
            add(_text_lines("\n".join(lines[cursor:first])))
        # The opener's info string is text to marked when the opener cannot end a paragraph
        # (the last line, or a line cut short by a leftover $$; see _crossed_by_latex).
        opener = _text(_unmermaid(lines[first]))
        start = offset + (1 if parts else 0)
        add(opener)
        content_start = offset + 1
        body = lines[first + 1:last + 1]
        for line in body:
            add(line)
        spans.append((first, start, start + len(opener), content_start, offset))
        cursor = last + 1
    if cursor < len(lines):
        add(_text_lines("\n".join(lines[cursor:])))
    return "\n".join(parts), spans


def _crossed_by_latex(out: str, spans: list[tuple[int, ...]]) -> int | None:
    """The first line of the first fence a $$...$$ span crosses into or out of, or None.

    A `$$` left without a partner stays for marked, and Gradio's LaTeX extension ends a
    paragraph there: on an opener's line it keeps the opener from starting a fence.
    """
    latex = [(m.start(), m.end()) for m in _LATEX.finditer(out)]
    leftover = out.find("$$", latex[-1][1] if latex else 0)
    for line, start, opener_end, content_start, end in spans:
        if start <= leftover < opener_end:
            return line
        for s, e in latex:
            if e <= start or s >= end or (s >= start and e <= opener_end) \
                    or (content_start <= s and e <= end):
                continue
            return line
    return None


def _unmermaid(line: str) -> str:
    """Gradio draws a "```mermaid" block with mermaid, which renders HTML in labels: show it as code."""
    return line.replace("```mermaid", "``` mermaid")


def _text_lines(text: str) -> str:
    """Lines outside trusted fences, paragraph by paragraph (code spans end at a blank line)."""
    text = _TASK_BOX.sub(r"\1\\[\2]", _unmermaid(text))
    return "".join(piece if i % 2 else _inline(piece) for i, piece in enumerate(_BLANK_LINE.split(text)))


def _escaped(text: str, position: int) -> bool:
    start = position
    while start > 0 and text[start - 1] == "\\":
        start -= 1
    return (position - start) % 2 == 1


def _inline(block: str) -> str:
    """One paragraph: code spans (CommonMark's rules) and the text between them."""
    runs = [(m.start(), m.end() - m.start()) for m in _BACKTICKS.finditer(block)]
    positions: dict[int, list[int]] = {}
    for position, size in runs:
        positions.setdefault(size, []).append(position)
    out: list[str] = []
    cursor = 0
    for position, size in runs:
        if position < cursor:
            continue
        if _escaped(block, position):  # \` is a literal backtick; the rest of the run may open a span
            position, size = position + 1, size - 1
            if not size:
                continue
        same = positions.get(size, [])
        k = bisect.bisect_right(same, position)
        if k == len(same):
            continue  # no closing run: literal backticks
        closing = same[k]
        out.append(_text(block[cursor:position]))
        out.append(_code_span(block[position:closing + size], block[position + size:closing]))
        cursor = closing + size
    out.append(_text(block[cursor:]))
    return "".join(out)


def _code_span(raw: str, content: str) -> str:
    if not (_TAG_LIKE.search(content) or "![" in content or _unsafe_destinations(content)):
        return raw  # nothing in it could render, whatever marked makes of it
    content = content.replace("\n", " ")  # as CommonMark does; the lines after it move up one
    if content.startswith(" ") and content.endswith(" ") and content.strip(" "):
        content = content[1:-1]
    inert = "".join(c if c.isalnum() or c == " " else f"&#{ord(c)};" for c in content)
    return f"<code>{inert}</code>"


def _text(piece: str) -> str:
    if not piece:
        return piece
    # An address with another scheme gets "#" before it: a link to a fragment of this page.
    cuts = [m.end() for m in _unsafe_destinations(piece)]
    if cuts:
        piece = "#".join(piece[a:b] for a, b in zip([0, *cuts], [*cuts, len(piece)]))
    piece = _IMAGE.sub(lambda m: m.group(1) + "\\![" + ("image]" if m.group(2) else ""), piece)
    return _ANGLE.sub(lambda m: m.group(1) + (m.group(2) or "&lt;"), piece)


def _unsafe_destinations(text: str) -> list[re.Match]:
    return [m for m in _DESTINATION.finditer(text) if _unsafe_url(m.group(1))]


def _unsafe_url(start: str) -> bool:
    """Whether a link address starting with `start` has a scheme other than http, https or
    mailto, as a browser reads it; one still looking like a scheme after 256 characters has."""
    plain = re.sub(r"[\x00-\x20\\]", "", html.unescape(start)).lower()
    scheme = _SCHEME.match(plain)
    if scheme is None:
        return False
    if not scheme.group(2):  # no colon (yet): a relative address, unless the look was cut short
        return len(start) == 256 and (scheme.end() == len(plain) or plain[scheme.end()] not in "/?#")
    return scheme.group(1) not in SAFE_SCHEMES
