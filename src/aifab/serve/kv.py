"""The serving KV cache: a fixed number of slots, one per running sequence, each as long as the context.

Storage per layer is (slots, nkv, context, hs) for keys and again for values, allocated once when the engine
starts, so memory is known up front and never fragments; a finished sequence's slot is reused at once. (Paged
blocks would let short sequences share memory more tightly; fixed slots keep every step's shapes static, which
is what CUDA graphs want.)

One engine step packs the tokens of many sequences into one row (1, N): each decoding sequence's next token,
and a chunk of each prefilling sequence's prompt. `StepLayout` says which slot and position each token has.
`SlotCache.attend` writes every token's k, v into its slot, then computes attention in two shapes:
- decode tokens (one per sequence): a single batched attention over the slots up to the highest one decoding
  (a view, no copy), each row masked to its own length (rows without a decode token attend to position 0 and
  are discarded);
- prefill chunks: one causal attention per chunk over its slot's earlier positions plus the chunk.

`RowsLayout` is the decode-only step in static shapes, for CUDA graphs (`serve.graphs`): packed token i is
slot i's next token for every slot 0..R-1 (rows whose slot is not decoding carry a dummy token, written at
position 0 of that free slot, which its next owner overwrites before reading), and keys are read up to a
bucketed length L. Everything it reads comes from tensors, so one captured graph serves every step of its
(R, L) bucket.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from aifab.nn.config import ModelConfig


@dataclass(frozen=True)
class Chunk:
    slot: int
    start: int  # position of the chunk's first token in its sequence
    length: int
    offset: int  # index of the chunk's first token in the step's packed row


class StepLayout:
    """Where each of the step's N packed tokens goes. Decode tokens come first, then prefill chunks."""

    def __init__(self, decode: list[tuple[int, int]], chunks: list[Chunk], slots: int, device: torch.device):
        # decode: (slot, position) of each decoding sequence's new token, packed at indices 0..D-1
        self.n_decode, self.chunks = len(decode), chunks
        self.single = decode[0] if len(decode) == 1 and not chunks else None  # (slot, position)
        slot_of = [s for s, _ in decode] + [c.slot for c in chunks for _ in range(c.length)]
        pos_of = [p for _, p in decode] + [c.start + i for c in chunks for i in range(c.length)]
        self.slots = torch.tensor(slot_of, dtype=torch.long, device=device)
        self.positions = torch.tensor(pos_of, dtype=torch.long, device=device)
        if decode:
            self.decode_slots = self.slots[: self.n_decode]
            self.decode_len = max(p for _, p in decode) + 1  # keys to read: the longest decoding sequence
            # rows to read: slots 0..decode_rows-1 (the scheduler hands out low slots first, so under light
            # load this is a few rows, not the whole cache)
            self.decode_rows = max(s for s, _ in decode) + 1
            # row s may read key j when slot s decodes this step and j is at or before its new token
            lengths = [0] * self.decode_rows
            for s, p in decode:
                lengths[s] = p + 1
            keys = torch.arange(self.decode_len)
            mask = (keys[None, :] < torch.tensor(lengths)[:, None]) | (keys[None, :] == 0)  # idle rows: key 0
            self.decode_mask = mask[:, None, None, :].to(device)  # (rows, 1, 1, L)


class RowsLayout:
    """A decode-only step over slots 0..R-1, reading keys 0..L-1: R = positions.size(0), L = mask.size(-1).

    positions (R,): where each row's token goes; lengths (R,): keys each row may read (its position + 1; 1 for
    a dummy row). The mask is computed here from `lengths` so that, under capture, it is part of the graph."""

    def __init__(self, positions: Tensor, lengths: Tensor, rows: Tensor, keys: int) -> None:
        self.positions, self.rows = positions, rows
        key_ids = torch.arange(keys, device=positions.device)
        self.mask = (key_ids[None, :] < lengths[:, None])[:, None, None, :]  # (R, 1, 1, L)


class SlotCache:
    """Keys and values for `slots` sequences of up to `max_len` positions, and the current step's layout."""

    def __init__(self, config: ModelConfig, slots: int, max_len: int, device: torch.device, dtype: torch.dtype):
        shape = (slots, config.kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.n_slots, self.max_len, self.device = slots, max_len, device
        self.layout: StepLayout | RowsLayout | None = None
        # eager only: under torch.compile the slot and position would be constants, one recompile per step
        self.fast_single = True

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, pos: int, gqa: bool) -> Tensor:
        """q (1, nh, N, hs), k/v (1, nkv, N, hs) for the packed tokens of `self.layout`."""
        lay = self.layout
        assert lay is not None, "set the step's layout before the forward pass"
        K, V = self.k[layer], self.v[layer]
        if isinstance(lay, RowsLayout):
            return self._attend_rows(lay, K, V, q, k, v)
        if lay.single is not None and self.fast_single:  # one sequence decoding alone: plain slices, no mask
            slot, p = lay.single
            K[slot, :, p] = k[0, :, 0]
            V[slot, :, p] = v[0, :, 0]
            return F.scaled_dot_product_attention(
                q, K[slot : slot + 1, :, : p + 1], V[slot : slot + 1, :, : p + 1], enable_gqa=gqa
            )
        # K[slots, :, positions] is (N, nkv, hs): the advanced indices lead
        K[lay.slots, :, lay.positions] = k[0].transpose(0, 1)
        V[lay.slots, :, lay.positions] = v[0].transpose(0, 1)
        y = torch.empty_like(q)
        D = lay.n_decode
        if D:
            L, R = lay.decode_len, lay.decode_rows
            qd = q.new_zeros(R, q.size(1), 1, q.size(3))
            qd[lay.decode_slots] = q[0, :, :D].transpose(0, 1).unsqueeze(2)
            yd = F.scaled_dot_product_attention(
                qd, K[:R, :, :L], V[:R, :, :L], attn_mask=lay.decode_mask, enable_gqa=gqa
            )  # (rows, nh, 1, hs)
            y[0, :, :D] = yd[lay.decode_slots, :, 0].transpose(0, 1)
        for c in lay.chunks:
            end = c.start + c.length
            mask = torch.ones(c.length, end, dtype=torch.bool, device=q.device).tril(diagonal=c.start)
            y[:, :, c.offset : c.offset + c.length] = F.scaled_dot_product_attention(
                q[:, :, c.offset : c.offset + c.length],
                K[c.slot : c.slot + 1, :, :end],
                V[c.slot : c.slot + 1, :, :end],
                attn_mask=mask,
                enable_gqa=gqa,
            )
        return y

    @staticmethod
    def _attend_rows(lay: RowsLayout, K: Tensor, V: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Row r = slot r: write its k, v, then attend over K[:R, :, :L] under the length mask. The query
        heads that share a key/value head go in as that head's queries (R, nkv, nh/nkv, hs), so grouped-query
        attention needs no expanded copy of the keys (query head h reads kv head h // (nh/nkv))."""
        R, L = lay.positions.size(0), lay.mask.size(-1)
        K[lay.rows, :, lay.positions] = k[0].transpose(0, 1)  # (R, nkv, hs)
        V[lay.rows, :, lay.positions] = v[0].transpose(0, 1)
        nh, hs, nkv = q.size(1), q.size(3), K.size(1)
        qr = q[0].transpose(0, 1).reshape(R, nkv, nh // nkv, hs)
        y = F.scaled_dot_product_attention(qr, K[:R, :, :L], V[:R, :, :L], attn_mask=lay.mask)
        return y.reshape(R, nh, hs).transpose(0, 1).unsqueeze(0)  # (1, nh, R, hs)
