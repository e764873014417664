"""The Feedback tab (admins only): like rates over time, counts, and the latest comments.

Numbers come from chatbot.feedback_export (the same code as `persona-studio
feedback stats`), so the tab and the command line always agree.
"""

from __future__ import annotations

import gradio as gr
import pandas as pd

from ..chat import ChatError, ChatService
from ..feedback_export import daily_like_rates, like_rates
from .identity import Identity, NotAllowed
from .safe_markdown import literal

LATEST_COMMENTS = 20


def _plot_frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["day", "group", "likes", "dislikes", "like_rate"])
    frame["day"] = pd.to_datetime(frame["day"])
    return frame


def latest_comments(votes: list) -> str:
    """The latest comments (and reasons) as Markdown, newest first, each linking to its conversation.

    One list item each: what people typed is literal() (one line, no Markdown or HTML), so a
    comment cannot start another entry or pass for someone else's (the author is in bold).
    """
    with_comments = [v for v in votes if v.feedback.comment or v.feedback.reason][-LATEST_COMMENTS:][::-1]
    lines = [f"### Latest comments ({len(with_comments)})"] if with_comments else ["_No comments yet._"]
    for v in with_comments:
        thumb = {1: "👍", -1: "👎"}.get(v.feedback.rating, "·")
        text = f" “{literal(v.feedback.comment)}”" if v.feedback.comment else ""
        reason = f" _{literal(v.feedback.reason)}_" if v.feedback.reason else ""
        lines.append(f"- {thumb}{reason}{text} — **{literal(v.user_name)}**, {literal(v.message.persona_id)}, "
                     f"{v.feedback.updated_at:%Y-%m-%d %H:%M} "
                     f"[open conversation](?conversation={int(v.message.conversation_id)})")
    return "\n".join(lines)


def create(app: gr.Blocks, service: ChatService, identity: Identity, tab: gr.Tab) -> None:
    notice = gr.Markdown(elem_id="feedback-notice")
    refresh = gr.Button("Refresh", size="sm", elem_id="feedback-refresh")
    by_persona = gr.LinePlot(x="day", y="like_rate", color="group", y_lim=[0, 1], height=260,
                             title="Like rate per persona, by day", elem_id="feedback-plot-persona")
    by_model = gr.LinePlot(x="day", y="like_rate", color="group", y_lim=[0, 1], height=260,
                           title="Like rate per model version, by day", elem_id="feedback-plot-model")
    counts = gr.Dataframe(headers=["persona", "model", "likes", "dislikes", "like rate"], interactive=False,
                          elem_id="feedback-counts")
    comments = gr.Markdown(elem_id="feedback-comments")

    def load(request: gr.Request):
        try:
            user = identity.require_admin(request, "see everyone's feedback")
            votes = service.all_feedback(as_admin=user.is_admin)
        except (NotAllowed, ChatError) as exc:
            empty = _plot_frame([])
            return str(exc), empty, empty, [], ""
        table = [[r.persona_id or "-", r.model, r.likes, r.dislikes, "-" if r.rate is None else f"{r.rate:.0%}"]
                 for r in like_rates(votes)]
        comment_list = latest_comments(votes)
        rated = sum(1 for v in votes if v.feedback.rating)
        summary = f"{rated} current votes on {len({v.message.id for v in votes})} replies."
        return (summary, _plot_frame(daily_like_rates(votes, "persona")),
                _plot_frame(daily_like_rates(votes, "model")), table, comment_list)

    outputs = [notice, by_persona, by_model, counts, comments]
    tab.select(load, None, outputs)  # fresh numbers whenever the tab is opened
    refresh.click(load, None, outputs)
