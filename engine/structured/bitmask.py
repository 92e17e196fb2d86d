"""Token bitmasks: one bit per vocabulary entry, 32 to an int32 word, bit k of word w = token 32w + k.

This is the layout llguidance fills. The host fills a packed mask (4 KB per row for a 32k
vocabulary instead of 32 KB of bools) and the unpacking happens where the logits live: on CPU
numpy's `unpackbits` (one C pass), on a GPU shifts on the device after a 200 KB copy.
"""

from __future__ import annotations

import numpy as np
import torch

_NEG_INF = float("-inf")
# Per device, the [32] int32 bit positions, so a step does not build them again.
_BIT_INDEX: dict[torch.device, torch.Tensor] = {}


def words_per_row(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def allocate_bitmask(rows: int, vocab_size: int, pin: bool = False) -> torch.Tensor:
    """A host [rows, words] int32 mask with every token allowed (-1 is all bits set)."""
    return torch.full((rows, words_per_row(vocab_size)), -1, dtype=torch.int32, pin_memory=pin)


def blocked_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, vocab_size] bool, True where a token is NOT allowed, on the bitmask's device."""
    if bitmask.device.type == "cpu":
        # Little-endian int32 words viewed as bytes keep token order, so a little-endian bit
        # unpack of the inverted bytes lists the blocked tokens in vocabulary order.
        inverted = np.invert(bitmask.numpy()).view(np.uint8)
        bits = np.unpackbits(inverted, axis=1, bitorder="little")[:, :vocab_size]
        return torch.from_numpy(bits.view(np.bool_))
    return blocked_tokens_by_shifts(bitmask, vocab_size)


def blocked_tokens_by_shifts(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The device path of `blocked_tokens`: pure torch, so it runs wherever the logits are."""
    shifts = _BIT_INDEX.get(bitmask.device)
    if shifts is None:
        shifts = _BIT_INDEX[bitmask.device] = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size] == 0


def apply_blocked(logits: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
    """`logits` with blocked tokens at -inf, in a new tensor (the caller's stays intact)."""
    return logits.masked_fill(blocked, _NEG_INF)


def allowed_token_ids(bitmask_row: torch.Tensor, vocab_size: int) -> list[int]:
    """The reference decoding, one token at a time: for tests and debugging, never the hot path."""
    words = bitmask_row.tolist()
    return [t for t in range(vocab_size) if (words[t // 32] >> (t % 32)) & 1]
