"""Activation checkpointing that recomputes each AdaMix layer with the experts its forward drew.

A checkpointed block runs its forward twice: once without keeping activations, and again inside the
backward to rebuild them. A routed layer would draw a new expert on the second run, so the backward
would differentiate a function the forward never computed. ``torch.utils.checkpoint``'s ``context_fn``
runs the forward and the recompute under two context managers made together: the first records every
route drawn in the block, the second hands the same routes back, in order.

    enable_activation_checkpointing(model)   # instead of model.activation_checkpointing_enable()

A recompute without that pairing (reentrant checkpointing, or plain ``activation_checkpointing_enable``)
is detected and raises instead of silently training the wrong experts.
"""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager

import torch
from torch import nn

Route = tuple[int, int]


class RouteTape:
    """The routes one checkpointed block drew in its forward, replayed by its recompute(s)."""

    def __init__(self) -> None:
        self._entries: list[tuple[nn.Module, list[Route]]] = []
        self._cursor = 0

    def record(self, layer: nn.Module, routes: list[Route]) -> None:
        self._entries.append((layer, routes))

    def rewind(self) -> None:
        # A backward with retain_graph=True and a later backward each recompute the block from its start.
        self._cursor = 0

    def replay(self, layer: nn.Module) -> list[Route]:
        if self._cursor == len(self._entries):
            raise RuntimeError(f"activation checkpointing: {layer.extra_repr()} ran in the recompute but not in the forward")
        recorded_layer, routes = self._entries[self._cursor]
        if recorded_layer is not layer:
            raise RuntimeError(
                f"activation checkpointing: the recompute reached {layer.extra_repr()} where the forward reached "
                f"{recorded_layer.extra_repr()}: the checkpointed block must call its layers in the same order"
            )
        self._cursor += 1
        return routes


_state = threading.local()


class _TapeContext:
    """Makes ``tape`` the current one for recording or replaying; re-enterable (one per checkpoint call)."""

    def __init__(self, mode: str, tape: RouteTape) -> None:
        self.mode, self.tape = mode, tape
        self._previous: list[tuple[str, RouteTape] | None] = []

    def __enter__(self) -> None:
        # Thread-local: on GPU the autograd engine runs the recompute on its own device thread, where it
        # enters the replay context itself.
        self._previous.append(getattr(_state, "current", None))
        if self.mode == "replay":
            self.tape.rewind()
        _state.current = (self.mode, self.tape)

    def __exit__(self, *exc_info: object) -> None:
        _state.current = self._previous.pop()


def replayed_routes(layer: nn.Module) -> list[Route] | None:
    """The routes ``layer`` must reuse because this call is a checkpoint recompute; ``None`` for a fresh forward.

    Raises ``RuntimeError`` for a recompute that nothing recorded (checkpointing without ``routing_context_fn``).
    """
    current = getattr(_state, "current", None)
    if current is not None and current[0] == "replay":
        return current[1].replay(layer)
    if current is None and _inside_backward():
        raise RuntimeError(
            f"{layer.extra_repr()} was re-run inside the backward (activation checkpointing) without its forward's "
            "routes: enable checkpointing with adamix_ds.enable_activation_checkpointing(model), or pass "
            "use_reentrant=False, context_fn=adamix_ds.routing_context_fn to torch.utils.checkpoint"
        )
    return None


def record_routes(layer: nn.Module, routes: list[Route]) -> None:
    """Keep ``routes`` for the recompute if ``layer`` runs inside a checkpointed block's forward."""
    current = getattr(_state, "current", None)
    if current is not None and current[0] == "record":
        current[1].record(layer, routes)


def _inside_backward() -> bool:
    # The autograd engine's current graph task; -1 outside a backward. The same probe torch.utils.checkpoint uses.
    return torch._C._current_graph_task_id() != -1


def routing_context_fn() -> tuple[AbstractContextManager[None], AbstractContextManager[None]]:
    """``context_fn`` for ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: a forward context that
    records the block's routes and a recompute context that replays them."""
    tape = RouteTape()
    return _TapeContext("record", tape), _TapeContext("replay", tape)


def routing_checkpoint_kwargs() -> dict[str, object]:
    """``torch.utils.checkpoint`` keyword arguments under which recomputes reuse the forward's experts."""
    return {"use_reentrant": False, "context_fn": routing_context_fn}


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Turn on a Hugging Face model's activation checkpointing (every Transformer block) so that recomputes reuse
    the forward's experts. ``model`` is a ``transformers.PreTrainedModel`` with AdaMix layers."""
    kwargs = routing_checkpoint_kwargs()
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):  # transformers 4
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise TypeError(f"cannot checkpoint a {type(model).__name__}: allowed a transformers PreTrainedModel")
