"""Replicas of real architectures' blocks, built here so that no test fetches anything.

Each factory returns ``(module, example_inputs)`` like a user's ``package.module:factory``, so
the same builders serve the library tests, the CLI tests (``tests.replicas:densenet_like``) and
``benchmarks/tolerance_bench.py``, which measures the tolerance policy's constants on them.

- ``preact_bn_stack``: a deep pre-activation residual stack (BN→ReLU→Conv, 40+ blocks) with
  running statistics made the way training makes them;
- ``repvgg_like``, ``densenet_like``, ``mobilevit_like``: the block structure of timm's
  ``repvgg_a0`` (3×3+BN, 1×1+BN and identity-BN branches summed), ``densenet121`` (dense
  layers of timm's ``BatchNormAct2d``, a BatchNorm2d subclass whose forward also applies its
  activation, with concatenation) and ``mobilevit_xxs`` (inverted residuals, then a transformer
  over unfolded patches), handed over in train mode with fresh BatchNorm statistics, as timm
  builds them;
- ``wide_range_head``: logits spanning 1e3+ with entries near zero;
- ``clip_like``: an image tower and an int64-token text tower whose output is the B×B
  similarity matrix;
- ``seq_first_transformer``: ``nn.TransformerEncoder`` with ``batch_first=False`` (axis 0 is
  the sequence);
- ``token_dict_model``: int64 tokens in, a dict of outputs out;
- ``bert_like``: BERT's interface (``input_ids`` and ``attention_mask``, int64, whose
  sequence length varies with the input; learned positions sliced to it; a masked attention
  layer) and a dict of outputs, for exports with a dynamic batch and sequence;
- ``fcn_like``: a fully-convolutional segmenter (strided Conv+BN encoder, upsampling decoder
  with a skip connection: H and W must be multiples of 4), for exports with a dynamic H/W;
- ``cnn_module_only``: a module without example inputs, as torchvision/timm constructors
  return one.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


def calibrate_bn(model: nn.Module, inputs: tuple[torch.Tensor, ...], steps: int = 3) -> None:
    """Running statistics as training makes them: train-mode passes over shifted, scaled
    batches; non-trivial affine parameters. Leaves the model in eval mode."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
                m.momentum = 0.5
        model.train()
        for step in range(steps):
            batch = tuple(
                x.repeat(4, *([1] * (x.dim() - 1))) * (1.5 + 0.25 * step) + 0.5
                if x.is_floating_point()
                else x
                for x in inputs
            )
            model(*batch)
    model.eval()


# --------------------------------------------------------------------- deep BN stacks


class PreActBlock(nn.Module):
    """BN → ReLU → Conv3×3, twice, plus the identity (ResNet v2)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.bn1(x)))
        return x + self.conv2(self.act(self.bn2(h)))


class PreActStack(nn.Module):
    def __init__(self, blocks: int, width: int, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.blocks = nn.Sequential(*(PreActBlock(width) for _ in range(blocks)))
        self.bn = nn.BatchNorm2d(width)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn(self.blocks(self.stem(x))))
        return self.fc(torch.flatten(self.pool(h), 1))


def preact_bn_stack(blocks: int = 40, width: int = 8, size: int = 8, seed: int = 0):
    """A deep pre-activation BN network (``blocks`` residual blocks, 2 BN each), eval mode."""
    _seeded(seed)
    model = PreActStack(blocks, width)
    x = torch.randn(1, 3, size, size)
    calibrate_bn(model, (x,))
    return model, (x,)


# -------------------------------------------------------------------------------- RepVGG


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    )


class RepVggBlock(nn.Module):
    """relu(BN(conv3×3 x) + BN(conv1×1 x) + BN(x)); the identity branch only when shapes agree."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.identity = nn.BatchNorm2d(cout) if cin == cout and stride == 1 else None
        self.conv_kxk = conv_bn(cin, cout, 3, stride)
        self.conv_1x1 = conv_bn(cin, cout, 1, stride)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_kxk(x) + self.conv_1x1(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return self.act(y)


class RepVggLike(nn.Module):
    def __init__(
        self, widths=(8, 12, 16, 24), depths=(1, 2, 4, 1), classes: int = 100
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [RepVggBlock(3, widths[0], 2)]
        cin = widths[0]
        for width, depth in zip(widths, depths, strict=True):
            for i in range(depth):
                layers.append(RepVggBlock(cin, width, 2 if i == 0 else 1))
                cin = width
        self.stages = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.stages(x)), 1))


def repvgg_like(seed: int = 0):
    """RepVGG-A0's structure, fresh (identity BN statistics) and in train mode, as timm hands
    it over: three summed branches per block make the logits large (thousands)."""
    _seeded(seed)
    model = RepVggLike().train()
    return model, (torch.randn(1, 3, 32, 32),)


# ------------------------------------------------------------------------------ DenseNet


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d: a BatchNorm2d subclass whose forward also applies ReLU."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.norm1 = BatchNormAct2d(cin)
        self.conv1 = nn.Conv2d(cin, 2 * growth, 1, bias=False)
        self.norm2 = BatchNormAct2d(2 * growth)
        self.conv2 = nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv2(self.norm2(self.conv1(self.norm1(x))))], 1)


class DenseNetLike(nn.Module):
    def __init__(self, growth: int = 6, layers=(3, 4), classes: int = 10) -> None:
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(3, 12, 3, 2, 1, bias=False), BatchNormAct2d(12)]
        cin = 12
        for i, n in enumerate(layers):
            for _ in range(n):
                blocks.append(DenseLayer(cin, growth))
                cin += growth
            if i < len(layers) - 1:  # transition: BNAct → 1×1 conv → average pool
                blocks += [BatchNormAct2d(cin), nn.Conv2d(cin, cin // 2, 1, bias=False)]
                blocks.append(nn.AvgPool2d(2))
                cin //= 2
        blocks.append(BatchNormAct2d(cin))
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def densenet_like(seed: int = 0):
    """DenseNet-121's dense layers with timm's BatchNormAct2d, in train mode as built."""
    _seeded(seed)
    return DenseNetLike().train(), (torch.randn(1, 3, 32, 32),)


# ----------------------------------------------------------------------------- MobileViT


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int = 2) -> None:
        super().__init__()
        mid = cin * expand
        self.block = nn.Sequential(
            conv_bn(cin, mid, 1), nn.SiLU(),
            conv_bn(mid, mid, 3, stride, groups=mid), nn.SiLU(),
            conv_bn(mid, cout, 1),
        )  # fmt: skip
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


class TransformerLayer(nn.Module):
    def __init__(self, dim: int, heads: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class MobileVitBlock(nn.Module):
    """Local 3×3 + 1×1 convs, a transformer over 2×2 patches (unfold → attend → fold), a 1×1
    projection, then concatenation with the input and a 3×3 fusion conv."""

    def __init__(self, channels: int, dim: int, patch: int = 2) -> None:
        super().__init__()
        self.patch = patch
        self.local = nn.Sequential(conv_bn(channels, channels, 3), nn.SiLU())
        self.to_dim = nn.Conv2d(channels, dim, 1, bias=False)
        self.transformer = nn.Sequential(TransformerLayer(dim), TransformerLayer(dim))
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Sequential(conv_bn(dim, channels, 1), nn.SiLU())
        self.fusion = nn.Sequential(conv_bn(2 * channels, channels, 3), nn.SiLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        p = self.patch
        y = self.to_dim(self.local(x))
        d = y.shape[1]
        # (B, D, H, W) → (B·p·p, H/p·W/p, D): one sequence per position inside a patch
        t = y.reshape(b, d, h // p, p, w // p, p).permute(0, 3, 5, 2, 4, 1)
        t = t.reshape(b * p * p, (h // p) * (w // p), d)
        t = self.norm(self.transformer(t))
        t = t.reshape(b, p, p, h // p, w // p, d).permute(0, 5, 3, 1, 4, 2)
        y = self.proj(t.reshape(b, d, h, w))
        return self.fusion(torch.cat([x, y], 1))


class MobileVitLike(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 8, 3, 2), nn.SiLU())
        self.stages = nn.Sequential(
            InvertedResidual(8, 8, 1), InvertedResidual(8, 12, 2),
            MobileVitBlock(12, 16), InvertedResidual(12, 16, 2), MobileVitBlock(16, 24),
        )  # fmt: skip
        self.head = nn.Sequential(conv_bn(16, 32, 1), nn.SiLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.head(self.stages(self.stem(x)))), 1))


def mobilevit_like(seed: int = 0):
    """MobileViT-XXS's block structure, in train mode as built."""
    _seeded(seed)
    return MobileVitLike().train(), (torch.randn(1, 3, 32, 32),)


# --------------------------------------------------------------------- output structures


class WideRangeHead(nn.Module):
    """A small CNN whose logits are scaled per class from 1e3 down to 1e-3: entries near zero
    beside entries in the thousands."""

    def __init__(self, classes: int = 12) -> None:
        super().__init__()
        self.features = nn.Sequential(conv_bn(3, 16, 3, 2), nn.ReLU(), conv_bn(16, 16, 3, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)
        self.register_buffer("scale", torch.logspace(3, -3, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1)) * self.scale


def wide_range_head(seed: int = 0):
    _seeded(seed)
    model = WideRangeHead()
    x = torch.randn(1, 3, 16, 16)
    calibrate_bn(model, (x,))
    return model, (x,)


class ClipLike(nn.Module):
    """Image tower (Conv→BN→pool→Linear) and text tower (int64 tokens → Embedding → LayerNorm →
    mean), both L2-normalized; the output is the B×B image-text similarity matrix."""

    def __init__(self, vocab: int = 16, dim: int = 16) -> None:
        super().__init__()
        self.image = nn.Sequential(
            conv_bn(3, 8, 3, 2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(8, dim),
        )  # fmt: skip
        self.embed = nn.Embedding(vocab, dim)
        self.text_norm = nn.LayerNorm(dim)
        self.text_proj = nn.Linear(dim, dim)
        self.logit_scale = nn.Parameter(torch.tensor(2.6592))

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        img = self.image(image)
        txt = self.text_proj(self.text_norm(self.embed(tokens)).mean(1))
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return self.logit_scale.exp() * img @ txt.t()


def clip_like(seed: int = 0):
    _seeded(seed)
    model = ClipLike()
    image, tokens = torch.randn(1, 3, 16, 16), torch.randint(0, 4, (1, 6))
    calibrate_bn(model, (image, tokens))
    return model, (image, tokens)


def seq_first_transformer(seed: int = 0):
    """``nn.TransformerEncoder`` with ``batch_first=False``: input (sequence, batch, d_model)."""
    _seeded(seed)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=False)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    return model, (torch.randn(5, 1, 16),)


class TokenDictModel(nn.Module):
    """int64 tokens → Embedding → pre-LN transformer layer → {"logits", "pooled"}."""

    def __init__(self, vocab: int = 16, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layer = TransformerLayer(dim)
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.norm(self.layer(self.embed(tokens)))
        return {"logits": self.lm_head(h), "pooled": h.mean(1)}


def token_dict_model(seed: int = 0):
    _seeded(seed)
    return TokenDictModel().eval(), (torch.randint(0, 4, (1, 6)),)


class BertLike(nn.Module):
    """Token + learned position embeddings (sliced to the sequence), LayerNorm, one attention
    layer whose padded keys the mask hides, a pooled classifier and a token head."""

    def __init__(self, vocab: int = 32, dim: int = 16, max_len: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(0.1 * torch.randn(1, max_len, dim))
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, 3)
        self.token_head = nn.Linear(dim, 5)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        h = self.norm(self.embed(input_ids) + self.position[:, : input_ids.shape[1]])
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        scores = q @ k.transpose(1, 2) / 4.0
        scores = scores.masked_fill(attention_mask[:, None, :] == 0, -1e4)
        h = self.norm2(h + self.out(scores.softmax(-1) @ v))
        weights = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return {"logits": self.classifier(pooled), "token_logits": self.token_head(h)}


def bert_like(seed: int = 0):
    """BertLike and (input_ids, attention_mask) of batch 2, length 6, the second one padded."""
    _seeded(seed)
    ids = torch.randint(0, 32, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    return BertLike().eval(), (ids, mask)


class FcnLike(nn.Module):
    """Encoder: two strided Conv+BN+ReLU (1/4 resolution); decoder: 4× nearest upsampling
    added to a full-resolution Conv+BN skip branch, then a 1×1 classifier."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.skip = nn.Sequential(conv_bn(3, 8, 3), nn.ReLU())
        self.encoder = nn.Sequential(
            conv_bn(3, 8, 3, 2), nn.ReLU(), conv_bn(8, 8, 3, 2), nn.ReLU()
        )
        self.up = nn.Upsample(scale_factor=4, mode="nearest")
        self.head = nn.Conv2d(8, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.skip(x) + self.up(self.encoder(x)))


def fcn_like(seed: int = 0):
    _seeded(seed)
    model = FcnLike()
    x = torch.randn(1, 3, 64, 64)
    calibrate_bn(model, (x,))
    return model, (x,)


def cnn_module_only(seed: int = 0) -> nn.Module:
    """A classifier without example inputs (any H, W): what torchvision/timm constructors
    hand over."""
    _seeded(seed)
    model = nn.Sequential(
        conv_bn(3, 8, 3, 2), nn.ReLU(), conv_bn(8, 16, 3, 2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip
    calibrate_bn(model, (torch.randn(1, 3, 32, 32),))
    return model


# ---------------------------------------------------------------------------- faults


def weight_tensors(model: onnx.ModelProto) -> list[str]:
    """Floating initializers of rank ≥ 2, in the order the graph first reads them."""
    inits = {t.name: t for t in model.graph.initializer}
    order: list[str] = []
    for node in model.graph.node:
        for name in node.input:
            t = inits.get(name)
            float_matrix = t is not None and t.data_type == onnx.TensorProto.FLOAT
            if float_matrix and len(t.dims) >= 2 and name not in order:
                order.append(name)
    return order


def plant_noise(
    model: onnx.ModelProto, name: str, seed: int, scale: float = 1e-4
) -> onnx.ModelProto:
    """A copy with seeded noise of ``scale``·std added to one weight tensor."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    init = next(t for t in out.graph.initializer if t.name == name)
    w = numpy_helper.to_array(init).astype(np.float64)
    rng = np.random.default_rng(seed)
    noisy = w + rng.standard_normal(w.shape) * scale * float(w.std())
    init.CopyFrom(numpy_helper.from_array(noisy.astype(np.float32), name))
    return out


ALL = {
    "preact_bn_stack": preact_bn_stack,
    "repvgg_like": repvgg_like,
    "densenet_like": densenet_like,
    "mobilevit_like": mobilevit_like,
    "wide_range_head": wide_range_head,
    "clip_like": clip_like,
    "seq_first_transformer": seq_first_transformer,
    "token_dict_model": token_dict_model,
}
