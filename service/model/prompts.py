"""Text side: learned object-agnostic prompts with deep text prompts, and training-free ensemble prompts.

Learned prompts (spec B §3): two token sequences ``[SOT] [V1..V12] object . [EOT]`` and
``[SOT] [W1..W12] damaged object . [EOT]``; the 12 context embeddings are learned; at the start of text blocks
1..depth-1 the residual stream's positions 1..t_n_ctx are overwritten by deep prompt D_{b-1}, rounded to float16
first (quirk Q1). Text feature of each prompt = ln_final(x)[EOT] @ text_projection, L2-normalised.
Rows of every text-feature tensor: 0 = normal, 1 = anomalous.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_tokenizer = None  # open_clip's SimpleTokenizer, made (and open_clip imported) on first use


def tokenize(texts: list[str], context_length: int = 77) -> torch.Tensor:
    """CLIP BPE ids, (len(texts), context_length), zero-padded (the tokenizer ships with open_clip)."""
    global _tokenizer
    if _tokenizer is None:
        from open_clip.tokenizer import SimpleTokenizer

        _tokenizer = SimpleTokenizer()
    return _tokenizer(texts, context_length=context_length)


def prompt_strings(n_ctx: int, class_name: str = "object") -> tuple[str, str]:
    ctx = " ".join(["X"] * n_ctx)
    return f"{ctx} {class_name}.", f"{ctx} damaged {class_name}."


class PromptLearner(nn.Module):
    """The trainable prompt tensors: 2 x 12 context vectors and depth-1 deep prompts of t_n_ctx tokens."""

    def __init__(self, width: int, n_ctx: int = 12, depth: int = 9, t_n_ctx: int = 4, init_std: float = 0.02):
        super().__init__()
        if depth < 1 or t_n_ctx > n_ctx:
            raise ValueError(f"need depth >= 1 and t_n_ctx <= n_ctx, got depth={depth}, t_n_ctx={t_n_ctx}")
        self.ctx_pos = nn.Parameter(torch.randn(n_ctx, width) * init_std)  # normal context
        self.ctx_neg = nn.Parameter(torch.randn(n_ctx, width) * init_std)  # anomalous context
        self.deep = nn.Parameter(torch.randn(depth - 1, t_n_ctx, width) * init_std)  # D_0 .. D_{depth-2}

    @property
    def n_ctx(self) -> int:
        return self.ctx_pos.shape[0]

    @property
    def depth(self) -> int:
        return self.deep.shape[0] + 1

    @property
    def t_n_ctx(self) -> int:
        return self.deep.shape[1]

    @property
    def width(self) -> int:
        return self.ctx_pos.shape[1]


def _text_blocks(clip) -> tuple[nn.ModuleList, torch.Tensor]:
    transformer = clip.transformer
    mask = clip.attn_mask
    if getattr(transformer, "batch_first", True) is False:
        raise RuntimeError("open_clip text transformer must be batch_first (open_clip >= 2.x)")
    return transformer.resblocks, mask


def encode_learned(clip, prompts: PromptLearner, class_name: str = "object") -> torch.Tensor:
    """(2, D) raw (unnormalised) text features of the learned prompts; differentiable w.r.t. ``prompts``.

    ``clip`` is an open_clip CLIP (text tower on the same device as ``prompts``).
    """
    device = prompts.ctx_pos.device
    normal, anomalous = prompt_strings(prompts.n_ctx, class_name)
    ids = tokenize([normal, anomalous], clip.context_length).to(device)  # (2, 77)
    emb = clip.token_embedding(ids).float()  # (2, 77, W)
    ctx = torch.stack([prompts.ctx_pos, prompts.ctx_neg])  # (2, n_ctx, W)
    x = torch.cat([emb[:, :1], ctx, emb[:, 1 + prompts.n_ctx :]], dim=1) + clip.positional_embedding.float()
    blocks, mask = _text_blocks(clip)
    t = prompts.t_n_ctx
    for b, blk in enumerate(blocks):
        if 1 <= b < prompts.depth:
            deep = prompts.deep[b - 1].unsqueeze(0).expand(2, -1, -1).half().float()  # fp16 rounding (quirk Q1)
            x = torch.cat([x[:, :1], deep, x[:, 1 + t :]], dim=1)
        x = blk(x, attn_mask=mask)
    x = clip.ln_final(x)
    eot = x[torch.arange(2, device=device), ids.argmax(dim=-1)]  # (2, W)
    return eot @ clip.text_projection


NORMAL_STATES = [
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "intact {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
    "clean {}",
]
ANOMALOUS_STATES = [
    "damaged {}",
    "broken {}",
    "defective {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
    "scratched {}",
    "cracked {}",
    "contaminated {}",
    "{} with a hole",
    "dented {}",
]
TEMPLATES = [
    "a photo of a {}.",
    "a close-up photo of a {}.",
    "a cropped photo of the {}.",
    "a bright photo of a {}.",
    "a dark photo of the {}.",
    "a photo of the {} for visual inspection.",
    "an industrial photo of a {}.",
    "a high-resolution photo of the {}.",
    "a photo of a {} on a production line.",
    "a low-resolution photo of a {}.",
]


@torch.no_grad()
def encode_ensemble(clip, class_name: str = "object") -> torch.Tensor:
    """(2, D) training-free text features: mean over state phrases x templates of unit text embeddings, per state.

    Returned rows are unnormalised means (normalise before use, like the learned features).
    """
    rows = []
    device = clip.token_embedding.weight.device
    for states in (NORMAL_STATES, ANOMALOUS_STATES):
        texts = [tpl.format(state.format(class_name)) for state in states for tpl in TEMPLATES]
        feats = clip.encode_text(tokenize(texts, clip.context_length).to(device))  # (n, D)
        rows.append(F.normalize(feats.float(), dim=-1).mean(dim=0))
    return torch.stack(rows)
