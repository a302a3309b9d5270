"""Why a training loop ends: its last step, or a stop request (a signal, the launcher going away, --stop_after_steps)."""

import enum
import os
import signal

import torch


class Stop(enum.Enum):
    """What a pass over the data ended with."""

    EPOCH_END = "epoch_end"  # the data ran out: the next epoch follows
    FINISHED = "finished"  # max_steps reached: the model is exported
    STOPPED = "stopped"  # a stop request: checkpointed, exported by a later resume


class StopRequest:
    """Set by SIGTERM/SIGINT, or when the process that launched this one dies: `accelerate launch` exits on SIGTERM
    without passing it on, and a scheduler that sent it is about to kill the container. The training loop then
    finishes its step, checkpoints and exits; with several processes they agree on the step (an all-reduce)."""

    def __init__(self):
        self.reason = None
        self.parent = os.getppid()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        launched = any(k in os.environ for k in ("ACCELERATE_MIXED_PRECISION", "TORCHELASTIC_RUN_ID", "LOCAL_RANK"))
        if launched:  # Linux: the kernel sends SIGTERM when the launcher dies (not when a shell does: nohup stays)
            try:
                import ctypes

                ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
            except (OSError, AttributeError):
                pass
        self.watch_parent = launched

    def _on_signal(self, signum, frame):
        self.reason = f"signal {signal.Signals(signum).name}"

    def requested(self, accelerator) -> bool:
        if self.reason is None and self.watch_parent and os.getppid() != self.parent:
            self.reason = "the launcher exited"
        flag = torch.tensor(float(self.reason is not None), device=accelerator.device)
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(flag, "max")
            if self.reason is None and flag.item():
                self.reason = "another process was stopped"
        return bool(flag.item())
