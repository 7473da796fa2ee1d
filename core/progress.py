"""Progress events yielded by every long-running engine call.

Long work is a generator: ``quantize_model``, ``compute_fisher``, ``perplexity`` and
friends yield ``ProgressEvent`` values and ``return`` their result. The GUI forwards
the events as signals, the command line feeds a tqdm bar, tests just iterate.
Cancelling is cooperative: the consumer stops iterating (``generator.close()``),
which raises ``GeneratorExit`` at the current ``yield``; code that writes files
cleans up in ``finally`` blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class ProgressEvent:
    """One step of a long job.

    stage:   short machine-friendly name of the phase ("fisher", "kmeans", "save"...).
    done:    units finished in this stage (0..total).
    total:   units in this stage (0 when unknown).
    message: one human sentence about what is happening now.
    item:    what this event finished, when it is one named part (a decoder block such as
             "model.layers.3"), so a view can mark it; empty otherwise.
    """

    stage: str
    done: int
    total: int
    message: str = ""
    item: str = ""

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 0.0


class Cancelled(Exception):
    """Raised when a job was asked to stop; nothing half-written is left behind."""


def run_to_end(gen: Generator[ProgressEvent, None, T],
               on_event: Callable[[ProgressEvent], None] | None = None,
               should_stop: Callable[[], bool] | None = None) -> T:
    """Drive a progress generator to completion and return its result.

    ``on_event`` sees every event; if ``should_stop`` returns True after an event the
    generator is closed (its ``finally`` blocks run) and ``Cancelled`` is raised.
    """
    while True:
        try:
            event = next(gen)
        except StopIteration as stop:
            return stop.value
        if on_event is not None:
            on_event(event)
        if should_stop is not None and should_stop():
            gen.close()
            raise Cancelled(f"stopped during {event.stage}")
