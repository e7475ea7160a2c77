"""Bookkeeping of the KV cache ring (docs/DESIGN.md sections 3-4), shared by every backend.

The cache holds W-1 turn slots of P tokens each. A slot's age is how many turns ago it was
written (1..W-1); an empty slot has age W, which the encoder step maps to a masking bias. A new
turn overwrites the oldest slot (or an empty one), so nothing is ever shifted or copied.
The ring is immutable: `advance` returns a new ring, so a failed turn leaves the old one intact.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TurnRing:
    context_turns: int          # W
    tokens_per_turn: int        # P
    slot_age: tuple[int, ...]   # W-1 entries, 1..W-1 filled, W empty
    visible_turns: int | None = None   # keep only this many past turns visible (context experiment)

    @classmethod
    def empty(cls, context_turns: int, tokens_per_turn: int, visible_turns: int | None = None) -> "TurnRing":
        if visible_turns is not None and not 0 <= visible_turns <= context_turns - 1:
            raise ValueError(f"visible_turns: expected 0..{context_turns - 1}, got {visible_turns}")
        return cls(context_turns, tokens_per_turn, (context_turns,) * (context_turns - 1), visible_turns)

    @property
    def slots(self) -> int:
        return self.context_turns - 1

    def next_slot(self) -> int:
        """The slot the next turn's keys/values go to: the oldest one, or the first empty one."""
        return int(np.argmax(self.slot_age)) if self.slots else -1

    def advance(self) -> "TurnRing":
        """The ring after committing one turn into `next_slot()`."""
        if not self.slots:
            return self
        w = self.context_turns
        slot = self.next_slot()
        ages = [min(a + 1, w) if a < w else w for a in self.slot_age]
        ages[slot] = 1
        return TurnRing(w, self.tokens_per_turn, tuple(ages), self.visible_turns)

    def token_ages(self, batch: int = 1) -> np.ndarray:
        """past_turn_age input: int64 [batch, (W-1)*P]; slots outside the visible context read W."""
        ages = np.array(self.slot_age, dtype=np.int64)
        if self.visible_turns is not None:
            ages[ages > self.visible_turns] = self.context_turns
        per_token = np.repeat(ages, self.tokens_per_turn)
        return np.broadcast_to(per_token, (batch, per_token.size)).copy()
