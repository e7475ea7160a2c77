/** Bookkeeping of the KV cache ring (docs/DESIGN.md sections 3-4), as timar_sdk/runtime/ring.py.
 *
 * The cache holds W-1 turn slots of P tokens. A slot's age is how many turns ago it was written
 * (1..W-1); an empty slot has age W. A new turn overwrites the oldest (or an empty) slot.
 * Immutable: advance() returns a new ring, so a failed turn leaves the old one intact. */
export class TurnRing {
  /** @param {number} contextTurns W @param {number} tokensPerTurn P @param {number[]} slotAge */
  constructor(contextTurns, tokensPerTurn, slotAge) {
    this.contextTurns = contextTurns;
    this.tokensPerTurn = tokensPerTurn;
    this.slotAge = Object.freeze([...slotAge]);
    Object.freeze(this);
  }

  static empty(contextTurns, tokensPerTurn) {
    return new TurnRing(contextTurns, tokensPerTurn, new Array(contextTurns - 1).fill(contextTurns));
  }

  get slots() { return this.contextTurns - 1; }

  /** The slot the next turn's keys/values go to: the oldest one (the first of equal ages). */
  nextSlot() {
    if (!this.slots) return -1;
    let best = 0;
    for (let i = 1; i < this.slotAge.length; i++) if (this.slotAge[i] > this.slotAge[best]) best = i;
    return best;
  }

  /** The ring after committing one turn into nextSlot(). */
  advance() {
    if (!this.slots) return this;
    const w = this.contextTurns;
    const slot = this.nextSlot();
    const ages = this.slotAge.map((a) => (a < w ? Math.min(a + 1, w) : w));
    ages[slot] = 1;
    return new TurnRing(w, this.tokensPerTurn, ages);
  }

  /** past_turn_age input: BigInt64Array [rows * (W-1) * P], every row the same. */
  tokenAges(rows = 1) {
    const p = this.tokensPerTurn, n = this.slots * p;
    const out = new BigInt64Array(rows * n);
    for (let r = 0; r < rows; r++) {
      for (let s = 0; s < this.slots; s++) out.fill(BigInt(this.slotAge[s]), r * n + s * p, r * n + (s + 1) * p);
    }
    return out;
  }
}
