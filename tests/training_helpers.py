"""Training-test helpers shared by the alignment job tests: TrainerCallbacks that
record parameters or interrupt a run."""

from __future__ import annotations


class Snapshot:
    """A TrainerCallback that keeps the trainable parameters at the start."""

    def __init__(self):
        from transformers import TrainerCallback

        outer = self
        self.before: dict = {}
        self.after: dict = {}

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                outer.before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

            def on_train_end(self, args, state, control, model=None, **kwargs):
                outer.after = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

        self.callback = Callback()


class InterruptAt:
    """A TrainerCallback that raises KeyboardInterrupt (Ctrl-C) at one step."""

    def __init__(self, step: int):
        from transformers import TrainerCallback

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == step:
                    raise KeyboardInterrupt

        self.callback = Callback()
