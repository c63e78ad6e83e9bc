"""Transformer encoder blocks with LayerNorm (pre-LN and post-LN)."""

from __future__ import annotations

from torch import nn

from ._registry import calibrate, register

D_MODEL, HEADS, SEQ = 64, 4, 16


class EncoderBlock(nn.Module):
    """Multi-head self-attention + GELU feed-forward, LayerNorm over d_model before or after."""

    def __init__(self, pre_ln: bool, d_model: int = D_MODEL, heads: int = HEADS) -> None:
        super().__init__()
        self.pre_ln = pre_ln
        self.attn = nn.MultiheadAttention(d_model, heads, batch_first=True)
        self.ln1 = nn.LayerNorm(d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)
        )
        self.dropout = nn.Dropout(0.1)

    def forward(self, x):
        if self.pre_ln:
            h = self.ln1(x)
            x = x + self.dropout(self.attn(h, h, h, need_weights=False)[0])
            return x + self.dropout(self.ffn(self.ln2(x)))
        x = self.ln1(x + self.dropout(self.attn(x, x, x, need_weights=False)[0]))
        return self.ln2(x + self.dropout(self.ffn(x)))


@register(
    "transformer_preln", "transformer", "Pre-LN encoder block (MHA, GELU FFN)", (SEQ, D_MODEL)
)
def transformer_preln() -> nn.Module:
    return calibrate(EncoderBlock(pre_ln=True), (SEQ, D_MODEL), seed=8)


@register(
    "transformer_postln",
    "transformer",
    "Post-LN encoder block (MHA, GELU FFN)",
    (SEQ, D_MODEL),
)
def transformer_postln() -> nn.Module:
    return calibrate(EncoderBlock(pre_ln=False), (SEQ, D_MODEL), seed=9)
