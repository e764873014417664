"""The Alignment tab (admins only): a persona's feedback, training jobs started, watched and stopped.

What it shows and does lives in alignment/board.py (``JobBoard``); this module
only draws it. Every handler asks ``identity.require_admin`` first, so a
non-admin gets a refusal whether they click in the page or call the Gradio
API directly. Jobs run in the worker process; the page polls their status
every few seconds (``gr.Timer``) while it is open.
"""

from __future__ import annotations

import html
from pathlib import Path

import gradio as gr
import pandas as pd

from ..settings import Settings
from .identity import Identity, NotAllowed
from .safe_markdown import literal, safe_markdown

ACTION = "run alignment jobs"


def _frame(rows: list[dict], columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=columns)


def kind_label(kind: str) -> str:
    return "simulate (SIMULATED)" if kind == "simulate" else kind


def canary_text(running: dict | None) -> str:
    """A running canary's live figures: each arm's like rate and votes, the difference with its 95 % CI."""
    if running is None:
        return ""
    canary, stats = running["canary"], running["stats"]
    arms = " · ".join(f"{arm.arm}: {'-' if arm.like_rate is None else f'{arm.like_rate:.0%}'} of {arm.votes} votes"
                      for arm in (stats.control, stats.candidate))
    ci = "" if stats.ci is None else \
        f", difference {stats.difference:+.0%} [{stats.ci[0]:+.0%}, {stats.ci[1]:+.0%}]"
    waiting = "" if stats.min_votes_reached else f" (deciding from {canary.min_votes} votes per arm)"
    return (f"**Canary running:** version {canary.candidate_id} on {canary.share:.0%} of new conversations. "
            f"{arms}{ci}{waiting}")


def progress_html(job) -> str:
    """A progress bar, its percentage and status; the ETA once the job has made progress."""
    if job is None:
        return ""
    from alignment.board import eta_seconds
    from chatbot.store.models import utcnow

    eta = eta_seconds(job, utcnow())
    eta_text = f" · about {int(eta // 60)} min {int(eta % 60)} s left" if eta is not None else ""
    return (f'<div id="alignment-progress" data-status="{html.escape(job.status)}" '
            f'data-progress="{job.progress:.4f}"><progress max="1" value="{job.progress:.4f}" '
            f'style="width:100%"></progress><div>job {job.id} · {html.escape(kind_label(job.kind))} · '
            f"{html.escape(job.status)} · {job.progress:.0%}{eta_text}</div></div>")


def create(app: gr.Blocks, service, board, identity: Identity, tab: gr.Tab) -> None:
    notice = gr.Markdown(elem_id="alignment-notice")
    if board is None:
        notice.value = "Alignment jobs need the server's store and data folder (`persona-studio serve`)."
        return
    with gr.Row():
        persona = gr.Dropdown(sorted(service.personas.ids()), label="Persona", scale=3,
                              elem_id="alignment-persona")
        refresh = gr.Button("Refresh", size="sm", scale=1, elem_id="alignment-refresh")
    with gr.Accordion("Data", open=True):
        data_summary = gr.Markdown(elem_id="alignment-data")
        like_rate = gr.LinePlot(x="day", y="like_rate", color="who", y_lim=[0, 1], height=220,
                                title="Like rate by day (people and SIMULATED apart)", elem_id="alignment-like-rate")
        readiness = gr.Dataframe(headers=["recipe", "ready", "detail"], interactive=False, wrap=True,
                                 elem_id="alignment-readiness")
    with gr.Accordion("Start a job", open=True):
        with gr.Row():
            recipes = board.recipes()
            recipe = gr.Dropdown(recipes, value=recipes[0], label="Recipe (alignment/recipes/)", scale=2,
                                 elem_id="alignment-recipe")
            part = gr.Radio(["policy", "judge", "all"], value="policy", label="Feedback part", scale=2,
                            elem_id="alignment-part")
            start = gr.Button("Start", variant="primary", scale=1, elem_id="alignment-start")
        recipe_text = gr.Textbox(label="Recipe (YAML): edit any field; checked as the CLI checks --recipe",
                                 value=board.recipe_text(recipes[0]), lines=12, max_lines=40,
                                 elem_id="alignment-recipe-text")
    with gr.Accordion("Jobs", open=True):
        jobs_table = gr.Dataframe(headers=["job", "kind", "status", "progress", "run", "asked", "by"],
                                  interactive=False, elem_id="alignment-jobs")
        with gr.Row():
            # Any id may be typed: the handlers look it up (and check the role) themselves.
            job = gr.Dropdown([], label="Job", scale=2, allow_custom_value=True, elem_id="alignment-job")
            cancel = gr.Button("Cancel", variant="stop", size="sm", scale=1, elem_id="alignment-cancel")
            resume = gr.Button("Resume", size="sm", scale=1, elem_id="alignment-resume")
        progress = gr.HTML(elem_id="alignment-job-progress")
        curves = gr.LinePlot(x="step", y="value", color="metric", height=260, title="Curves",
                             elem_id="alignment-curves")
        log_tail = gr.Textbox(label="Output (last lines)", lines=10, max_lines=10, interactive=False,
                              autoscroll=True, elem_id="alignment-log")
    with gr.Accordion("Simulate (SIMULATED feedback: demos and tests only)", open=False):
        gr.Markdown("A declared rule votes on generated replies instead of people. Every vote is stored "
                    "marked **SIMULATED**, and its conversations are titled so.")
        with gr.Row():
            sim_rule = gr.Textbox(label="Rule", placeholder="digits, contains:WORD, mark:TEXT, short:40, list",
                                  scale=2, elem_id="alignment-sim-rule")
            sim_n = gr.Number(16, label="Prompts", precision=0, minimum=1, scale=1, elem_id="alignment-sim-n")
            sim_samples = gr.Number(4, label="Replies per prompt", precision=0, minimum=1, scale=1,
                                    elem_id="alignment-sim-samples")
            simulate = gr.Button("Simulate", scale=1, elem_id="alignment-simulate")
    with gr.Accordion("Evaluate and decide", open=True):
        with gr.Row():
            version = gr.Dropdown([], label="Candidate version", scale=3, allow_custom_value=True,
                                  elem_id="alignment-version")
            rule = gr.Textbox(label="Rule (SIMULATED feedback only)", placeholder="digits, contains:WORD, ...",
                              scale=2, elem_id="alignment-rule")
            evaluate = gr.Button("Evaluate", scale=1, elem_id="alignment-evaluate")
        report = gr.Markdown(elem_id="alignment-report")
        plots = gr.Gallery(label="Plots", columns=3, height=260, allow_preview=True, elem_id="alignment-plots")
        with gr.Row():
            force_reason = gr.Textbox(label="Reason to force past the gate (leave empty to respect it)",
                                      scale=3, elem_id="alignment-force-reason")
            promote = gr.Button("Promote", variant="primary", scale=1, elem_id="alignment-promote")
            rollback = gr.Button("Roll back", scale=1, elem_id="alignment-rollback")
        with gr.Row():
            share = gr.Number(0.2, label="Canary share of new conversations", minimum=0.01, maximum=0.99,
                              scale=1, elem_id="alignment-canary-share")
            min_votes = gr.Number(100, label="Votes per arm before deciding", precision=0, minimum=1, scale=1,
                                  elem_id="alignment-canary-votes")
            canary_start = gr.Button("Start canary", scale=1, elem_id="alignment-canary-start")
            canary_stop = gr.Button("Stop canary", scale=1, elem_id="alignment-canary-stop")
        canary = gr.Markdown(elem_id="alignment-canary")
        history = gr.Dataframe(headers=["when", "action", "version", "by", "forced", "people before",
                                        "people after", "evaluation predicted", "gate"],
                               interactive=False, wrap=True, label="Promotion log: people's like rate before "
                               "and after, next to what the evaluation predicted", elem_id="alignment-history")
    timer = gr.Timer(board.poll_seconds if board is not None else Settings.job_poll_seconds, active=False)

    def refused(exc: Exception) -> str:
        return f"**{literal(str(exc))}**"

    def on_open(request: gr.Request):
        try:
            identity.require_admin(request, ACTION)
        except NotAllowed as exc:
            return refused(exc), gr.update(value=None)
        service.personas.refresh()
        ids = sorted(service.personas.ids())
        return "", gr.update(choices=ids, value=ids[0] if ids else None)

    def load_persona(persona_id: str | None, request: gr.Request):
        try:
            identity.require_admin(request, ACTION)
        except NotAllowed as exc:
            return refused(exc), "", _frame([], ["day", "who", "like_rate"]), [], [], gr.update()
        if not persona_id:
            return "", "", _frame([], ["day", "who", "like_rate"]), [], [], gr.update()
        votes = board.votes(persona_id)
        counts = board.data_counts(persona_id)
        (pl, pd_), (sl, sd) = votes["people"], votes["simulated"]
        summary = (f"**People:** {pl} 👍 / {pd_} 👎 · **SIMULATED:** {sl} 👍 / {sd} 👎  \n"
                   f"Same-context pairs: **{counts['pairs']}** · KTO rows: **{counts['kto_rows']}** · "
                   f"prompts: **{counts['prompts']}**")
        ready = [[r.recipe, "ready" if r.ready else "not yet", r.detail] for r in board.readiness(persona_id)]
        table, choices = jobs_rows(persona_id)
        return ("", summary, _frame(votes["by_day"], ["day", "who", "like_rate", "votes"]), ready, table,
                gr.update(choices=choices, value=choices[0] if choices else None))

    def jobs_rows(persona_id: str | None):
        jobs = board.jobs(persona_id)
        table = [[j.id, kind_label(j.kind), j.status, f"{j.progress:.0%}", j.run_id or "", f"{j.created_at:%Y-%m-%d %H:%M}",
                  j.requested_by] for j in jobs]
        return table, [j.id for j in jobs]

    def pick_recipe(name: str | None, request: gr.Request):
        try:
            identity.require_admin(request, ACTION)
            return board.recipe_text(name) if name else "", ""
        except (NotAllowed, ValueError) as exc:
            return "", refused(exc)

    def start_job(persona_id, name, text, part_name, request: gr.Request):
        from alignment.jobs import JobError

        try:
            user = identity.require_admin(request, ACTION)
            if not persona_id or not name:
                raise ValueError("pick a persona and a recipe first")
            job_id = board.submit(name, text, persona_id, user.name, part_name)
        except (NotAllowed, ValueError, JobError) as exc:
            return refused(exc), gr.update(), gr.update(), gr.update()
        table, choices = jobs_rows(persona_id)
        return (f"Job {job_id} queued: the worker runs it in its own process.", table,
                gr.update(choices=choices, value=job_id), gr.Timer(active=True))

    def watch(job_id, persona_id, request: gr.Request):
        empty = _frame([], ["step", "metric", "value"])
        try:
            identity.require_admin(request, ACTION)
        except NotAllowed as exc:
            return refused(exc), "", empty, "", gr.Timer(active=False), gr.update()
        if job_id in (None, ""):
            return gr.update(), "", empty, "", gr.Timer(active=False), gr.update()
        try:
            status = board.status(int(job_id))
        except (LookupError, ValueError) as exc:
            return refused(exc), "", empty, "", gr.Timer(active=False), gr.update()
        error = f"**{status.job.status}:** {literal(status.job.error)}" if status.job.error else gr.update()
        # A finished job may have made a version: offer it for evaluation.
        versions = gr.update()
        if status.job.finished and persona_id:
            choices = [(f"v{v.id} · run {v.run_id} · {v.status}", v.id) for v in board.versions(persona_id)]
            versions = gr.update(choices=choices)
        return (error, progress_html(status.job), _frame(status.curves, ["step", "metric", "value"]),
                status.log_tail, gr.Timer(active=not status.job.finished), versions)

    def act(job_id, persona_id, what: str, request: gr.Request):
        try:
            user = identity.require_admin(request, ACTION)
            if job_id in (None, ""):
                raise ValueError("pick a job first")
            if what == "cancel":
                done = board.cancel(int(job_id))
                message = (f"Job {done.id} cancelled." if done.status == "cancelled" else
                           f"Job {done.id} asked to stop: it writes a checkpoint at the end of its step.")
                target = done.id
            else:
                target = board.resume(int(job_id), user.name)
                message = f"Job {target} queued: it resumes job {job_id} from its last checkpoint."
        except (NotAllowed, ValueError, LookupError) as exc:
            return refused(exc), gr.update(), gr.update(), gr.update()
        table, choices = jobs_rows(persona_id)
        return message, table, gr.update(choices=choices, value=target), gr.Timer(active=True)

    def decide_view(persona_id: str | None):
        """Versions to pick, the canary's live figures and the promotion log, for the persona."""
        if not persona_id:
            return gr.update(choices=[]), "", []
        versions = board.versions(persona_id)
        choices = [(f"v{v.id} · run {v.run_id} · {v.status}", v.id) for v in versions]
        figures = canary_text(board.canary(persona_id))
        history_rows = [[r[k] for k in ("when", "action", "version", "by", "forced", "people before", "people after",
                                        "evaluation predicted", "gate")] for r in board.promotion_history(persona_id)]
        return gr.update(choices=choices, value=choices[0][1] if choices else None), figures, history_rows

    def show_version(version_id, request: gr.Request):
        from PIL import Image

        try:
            identity.require_admin(request, ACTION)
        except NotAllowed as exc:
            return refused(exc), "", []
        if version_id in (None, ""):
            return gr.update(), "", []
        try:
            evaluation = board.evaluation(int(version_id))
        except (LookupError, ValueError) as exc:
            return refused(exc), "", []
        if evaluation is None:
            return gr.update(), f"_Version {int(version_id)} has not been evaluated yet: press Evaluate._", []
        files = evaluation.get("files") or {}
        try:
            text = Path(files["report"]).read_text(encoding="utf-8")
        except (KeyError, OSError):
            text = "_The evaluation's report file is gone._"
        images = [Image.open(p) for p in files.get("plots", []) if Path(p).is_file()]
        return gr.update(), safe_markdown(text), images

    def decide(what: str, persona_id, version_id, reason, rule_text, share_value, votes_value, request):
        from alignment.jobs import JobError

        try:
            user = identity.require_admin(request, ACTION)
            if not persona_id:
                raise ValueError("pick a persona first")
            if what in ("evaluate", "promote", "canary") and version_id in (None, ""):
                raise ValueError("pick a candidate version first")
            if what == "evaluate":
                job_id = board.evaluate(int(version_id), user.name, rule=(rule_text or "").strip() or None)
                message = f"Job {job_id} queued: evaluating version {int(version_id)}."
            elif what == "promote":
                change = board.promote(int(version_id), user.name, reason)
                message = f"Version {change.version.id} now serves {literal(persona_id)}" + (
                    " (forced past the gate)." if change.entry.forced else " (gate passed).")
            elif what == "rollback":
                change = board.rollback(persona_id, user.name)
                message = f"Rolled back version {change.entry.version_id} of {literal(persona_id)}."
            elif what == "canary":
                started = board.start_canary(int(version_id), user.name, float(share_value), int(votes_value))
                message = f"Canary {started.id} started: version {started.candidate_id} on {started.share:.0%}."
            else:
                stopped = board.stop_canary(persona_id, user.name)
                message = f"Canary {stopped.id} stopped."
        except (NotAllowed, ValueError, LookupError, JobError) as exc:
            return (refused(exc),) + (gr.update(),) * 6
        versions, figures, history_rows = decide_view(persona_id)
        table, choices = jobs_rows(persona_id)
        job_update = gr.update(choices=choices, value=choices[0]) if what == "evaluate" else gr.update(choices=choices)
        return message, versions, figures, history_rows, table, job_update, gr.Timer(active=what == "evaluate")

    data_outputs = [notice, data_summary, like_rate, readiness, jobs_table, job]
    def load_decide(persona_id, request: gr.Request):
        try:
            identity.require_admin(request, ACTION)
        except NotAllowed:
            return gr.update(), "", []
        return decide_view(persona_id)

    decide_outputs = [version, canary, history]
    # Opening the tab refreshes the persona list, then shows the picked persona's data (its value may
    # not change, so its change event cannot be relied on for that).
    tab.select(on_open, None, [notice, persona]).then(load_persona, persona, data_outputs).then(
        load_decide, persona, decide_outputs)
    persona.change(load_persona, persona, data_outputs).then(load_decide, persona, decide_outputs)
    refresh.click(load_persona, persona, data_outputs).then(load_decide, persona, decide_outputs)
    version.change(show_version, version, [notice, report, plots])
    decided = [notice, version, canary, history, jobs_table, job, timer]
    decide_inputs = [persona, version, force_reason, rule, share, min_votes]

    def on_evaluate(persona_id, version_id, reason, rule_text, share_value, votes_value, request: gr.Request):
        return decide("evaluate", persona_id, version_id, reason, rule_text, share_value, votes_value, request)

    def on_promote(persona_id, version_id, reason, rule_text, share_value, votes_value, request: gr.Request):
        return decide("promote", persona_id, version_id, reason, rule_text, share_value, votes_value, request)

    def on_rollback(persona_id, version_id, reason, rule_text, share_value, votes_value, request: gr.Request):
        return decide("rollback", persona_id, version_id, reason, rule_text, share_value, votes_value, request)

    def on_canary_start(persona_id, version_id, reason, rule_text, share_value, votes_value,
                        request: gr.Request):
        return decide("canary", persona_id, version_id, reason, rule_text, share_value, votes_value, request)

    def on_canary_stop(persona_id, version_id, reason, rule_text, share_value, votes_value,
                       request: gr.Request):
        return decide("canary-stop", persona_id, version_id, reason, rule_text, share_value, votes_value, request)

    def on_simulate(persona_id, rule_text, n, samples, request: gr.Request):
        try:
            user = identity.require_admin(request, ACTION)
            if not persona_id:
                raise ValueError("pick a persona first")
            job_id = board.simulate(persona_id, (rule_text or "").strip(), user.name, int(n or 0), int(samples or 0))
        except (NotAllowed, ValueError) as exc:
            return refused(exc), gr.update(), gr.update(), gr.update()
        table, choices = jobs_rows(persona_id)
        return (f"Job {job_id} queued: SIMULATED votes by rule {literal(rule_text)}.", table,
                gr.update(choices=choices, value=job_id), gr.Timer(active=True))

    simulate.click(on_simulate, [persona, sim_rule, sim_n, sim_samples], [notice, jobs_table, job, timer])

    for button, handler in ((evaluate, on_evaluate), (promote, on_promote), (rollback, on_rollback),
                            (canary_start, on_canary_start), (canary_stop, on_canary_stop)):
        button.click(handler, decide_inputs, decided)
    recipe.change(pick_recipe, recipe, [recipe_text, notice])
    start.click(start_job, [persona, recipe, recipe_text, part], [notice, jobs_table, job, timer])
    watch_outputs = [notice, progress, curves, log_tail, timer, version]
    job.change(watch, [job, persona], watch_outputs)
    timer.tick(watch, [job, persona], watch_outputs)
    def cancel_job(job_id, persona_id, request: gr.Request):
        return act(job_id, persona_id, "cancel", request)

    def resume_job(job_id, persona_id, request: gr.Request):
        return act(job_id, persona_id, "resume", request)

    cancel.click(cancel_job, [job, persona], [notice, jobs_table, job, timer])
    resume.click(resume_job, [job, persona], [notice, jobs_table, job, timer])
