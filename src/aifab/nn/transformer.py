"""A decoder-only Transformer: RMSNorm, rotary position embeddings, SwiGLU MLP, SDPA attention.

The config also selects the GPT-2 layout (LayerNorm, learned positions, GELU, biases) and grouped-query
attention (Llama, Mistral, Qwen2). Read top to bottom: Transformer -> Block -> Attention / MLP. Shapes: B batch,
T time, C d_model, nh heads, nkv key/value heads, hs head size, V vocabulary. The same forward serves training
(whole sequences, causal) and generation (a KVCache plus the position of the first new token).
"""

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aifab.nn.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:  # one fused kernel: a decode step runs this 2L+1 times on tiny tensors
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)
        # normalise in fp32 so bf16 activations do not lose the small variances
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "layer":
        return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)
    return RMSNorm(config.d_model, config.norm_eps)


def rope_tables(context_len: int, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin of shape (T, hs/2) for every position up to context_len."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(context_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the two halves of each head (the Llama layout). x: (B, nh, T, hs), cos/sin: (T, hs/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.type_as(x)


class Cache(Protocol):
    """Where attention keeps its keys and values during generation. `attend` stores this step's k, v for
    `layer` and returns the attention output for q; q: (B, nh, T, hs), k/v: (B, nkv, T, hs) -> (B, nh, T, hs).
    `KVCache` holds one batch of equal-length sequences; the serving engine's slot cache holds many."""

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, pos: int, gqa: bool) -> Tensor: ...


class KVCache:
    """Keys and values of every layer for up to `max_len` positions: (B, nkv, max_len, hs) each."""

    def __init__(self, config: ModelConfig, batch: int, max_len: int, device: torch.device, dtype: torch.dtype):
        shape = (batch, config.kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]

    def update(self, layer: int, pos: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, nkv, T, hs) at positions pos..pos+T and return everything up to pos+T."""
        end = pos + k.size(2)
        self.k[layer][:, :, pos:end] = k
        self.v[layer][:, :, pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, pos: int, gqa: bool) -> Tensor:
        T = q.size(2)
        k, v = self.update(layer, pos, k, v)  # (B, nkv, pos+T, hs)
        if T == 1:  # one new token sees every cached position: no mask needed
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        # new token i (absolute pos+i) sees keys 0..pos+i
        mask = torch.ones(T, pos + T, dtype=torch.bool, device=q.device).tril(diagonal=pos)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.n_head, self.n_kv, self.head_dim = layer, config.n_head, config.kv_heads, config.head_dim
        self.rope = config.pos == "rope"
        kv_dim = self.n_kv * self.head_dim
        # one fused projection: rows are q (nh*hs), then k and v (nkv*hs each)
        self.wqkv = nn.Linear(config.d_model, config.d_model + 2 * kv_dim, bias=config.bias or config.qkv_bias)
        self.wo = nn.Linear(config.d_model, config.d_model, bias=config.bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: Cache | None, pos: int) -> Tensor:
        B, T, C = x.shape
        nh, nkv = self.n_head, self.n_kv
        heads = self.wqkv(x).view(B, T, nh + 2 * nkv, self.head_dim).transpose(1, 2)  # (B, nh+2nkv, T, hs)
        qk, v = heads[:, : nh + nkv], heads[:, nh + nkv :]
        if self.rope:  # q and k heads rotate together: one pass of the elementwise ops, not two
            qk = apply_rope(qk, cos, sin)
        q, k = qk[:, :nh], qk[:, nh:]  # (B, nh, T, hs), (B, nkv, T, hs)
        gqa = self.n_kv != self.n_head  # query head h reads key/value head h // (nh / nkv), as in Hugging Face
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = cache.attend(self.layer, q, k, v, pos, gqa)
        out: Tensor = self.wo(y.transpose(1, 2).contiguous().view(B, T, C))
        return out


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); or GELU (GPT-2): down(gelu_tanh(up(x)))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        if self.swiglu:
            self.gate = nn.Linear(config.d_model, config.hidden, bias=config.bias)
        self.up = nn.Linear(config.d_model, config.hidden, bias=config.bias)
        self.down = nn.Linear(config.hidden, config.d_model, bias=config.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = F.silu(self.gate(x)) * self.up(x) if self.swiglu else F.gelu(self.up(x), approximate="tanh")
        out: Tensor = self.down(h)
        return out


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config, layer)
        self.mlp_norm = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: Cache | None, pos: int) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, pos)
        out: Tensor = x + self.mlp(self.mlp_norm(x))
        return out


class Transformer(nn.Module):
    rope_cos: Tensor  # (context_len, hs/2) buffers, not parameters
    rope_sin: Tensor

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        if config.pos == "learned":
            self.pos_emb = nn.Embedding(config.context_len, config.d_model)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        # without rope the tables are empty: (context_len, 0)
        cos, sin = rope_tables(config.context_len, config.head_dim if config.pos == "rope" else 0, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # scale the projections that write into the residual stream, so its variance does not grow with depth
        for name, p in self.named_parameters():
            if name.endswith(("wo.weight", "down.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        cache: Cache | None = None,
        pos: int = 0,
        positions: Tensor | None = None,
        logits_at: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """idx (B, T) token ids -> logits (B, T, V), and the mean cross-entropy if targets (B, T) are given.

        With a cache, idx holds the tokens at positions pos..pos+T and earlier positions come from the cache.
        `positions` (T,) gives each token its own position instead (the serving engine packs tokens of many
        sequences into one row); the cache then knows which sequence each token belongs to. `logits_at` (K,)
        computes logits for those token indices only: (B, K, V).
        """
        T = idx.size(1)
        # packed positions come from the serving engine, which admits only sequences that fit the context;
        # reading their max would cost a device sync every step
        last = pos + T
        if positions is None and last > self.config.context_len:
            raise ValueError(f"sequence of {last} tokens exceeds the context length {self.config.context_len}")
        window = self.config.sliding_window
        if positions is None and window is not None and last > window:
            raise ValueError(f"sequence of {last} tokens exceeds the sliding window {window} (not implemented)")
        if positions is None:
            cos, sin = self.rope_cos[pos : pos + T], self.rope_sin[pos : pos + T]
            positions = torch.arange(pos, pos + T, device=idx.device) if self.config.pos == "learned" else None
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        x = self.tok_emb(idx)  # (B, T, C)
        if positions is not None and self.config.pos == "learned":
            x = x + self.pos_emb(positions)
        for block in self.blocks:
            x = block(x, cos, sin, cache, pos)
        if logits_at is not None:
            x = x[:, logits_at]
        logits = self.lm_head(self.norm(x))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss


def num_params(model: nn.Module) -> int:
    """Parameters counted once even when tied."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
