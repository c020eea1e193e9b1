"""The Trainer's progress lines for `kubectl logs`: one per logging step (unless a progress bar shows it), one per
evaluation, with step, loss, learning rate, tokens/s and ETA; and the whole run's log history for plots and metrics."""

from __future__ import annotations

import time

from transformers import TrainerCallback

from entrypoint import logs
from entrypoint.logs import duration
from entrypoint.train.metrics import perplexity

train_log, eval_log = logs.area("train"), logs.area("eval")


class ProgressLog(TrainerCallback):
    """One line per logging step (unless a progress bar shows it), one per evaluation and per save.

    `counter` is the trainer's token counter: real tokens this session, read only when a line is printed.
    After a resume, `history` starts with the records of the steps before it (see `restore`).
    """

    def __init__(self, counter, show_steps: bool):
        self.counter = counter
        self.show_steps = show_steps
        self.start = time.perf_counter()
        self.first_step = 0
        self.history: list[dict] = []  # every log record of the whole run, for the loss plot and metrics
        self.training = False
        self.eval_seconds = 0.0  # evaluations inside this session's training loop: not training time
        self.eval_seconds_before = 0.0  # the same, for the sessions before a resume

    def restore(self, state) -> None:
        """Start the history with the restored Trainer state's log (every record up to its checkpoint), so plots
        and metrics describe the whole run however many restarts it took."""
        self.history = [dict(h) for h in state.log_history if "step" in h]
        self.eval_seconds_before = sum(h.get("eval_runtime", 0.0) for h in self.history)
        self.first_step = state.global_step

    def training_seconds(self) -> float:
        """Seconds this session has spent training, evaluations excluded."""
        return time.perf_counter() - self.start - self.eval_seconds if self.training else 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.restore(state)  # Trainer restores a checkpoint's state before this call
        self.start, self.training = time.perf_counter(), True
        # Trainer calls this after restoring a checkpoint: the line marks when resuming is done.
        train_log.info(f"starting at step {state.global_step} of {state.max_steps}", step=state.global_step,
                       max_steps=state.max_steps)

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        self.history.append({"step": state.global_step, **logs})
        if self.training:
            self.eval_seconds += logs.get("eval_runtime", 0.0)
        if "eval_rewards/accuracy" in logs:  # DPO: the loss is per pair, so no perplexity
            loss, accuracy = logs["eval_loss"], logs["eval_rewards/accuracy"]
            eval_log.progress(f"step {state.global_step}: eval loss {loss:.4f}, reward accuracy {accuracy:.2f}, "
                              f"margin {logs['eval_rewards/margin']:.3f}", step=state.global_step, eval_loss=loss,
                              reward_accuracy=accuracy, reward_margin=logs["eval_rewards/margin"])
        elif "eval_loss" in logs:
            loss = logs["eval_loss"]
            eval_log.progress(f"step {state.global_step}: eval loss {loss:.4f}, perplexity {perplexity(loss):.2f}",
                              step=state.global_step, eval_loss=loss, perplexity=perplexity(loss))
        elif "loss" in logs and self.show_steps:
            elapsed = time.perf_counter() - self.start
            done = state.global_step - self.first_step
            left = state.max_steps - state.global_step
            eta = duration(elapsed / done * left) if done else "?"
            # Every rank consumes the same number of (packed) positions, so rank 0's count x world is the total.
            tokens = self.counter.tokens() * args.world_size / elapsed if elapsed > 0 else 0.0
            percent = 100 * state.global_step / max(1, state.max_steps)
            train_log.progress(f"step {state.global_step}/{state.max_steps} ({percent:.0f}%) "
                               f"epoch {state.epoch:.2f} loss {logs['loss']:.4f} "
                               f"lr {logs.get('learning_rate', 0):.2e}{_accuracy(logs)} "
                               f"tokens/s {tokens:,.0f} eta {eta}",
                               step=state.global_step, epoch=state.epoch, loss=logs["loss"],
                               learning_rate=logs.get("learning_rate"), tokens_per_second=tokens)


def _accuracy(logs: dict) -> str:
    """DPO's reward accuracy in the window, for the step line ('' for other runs)."""
    return f" reward accuracy {logs['rewards/accuracy']:.2f}" if "rewards/accuracy" in logs else ""
