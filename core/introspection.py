"""Looking inside a model: attention maps, next-token distributions, embeddings, attributions.

These are the measurements the web Lab draws. Each works on the very model
that is being served, through its ordinary forward pass: attention weights
come from the explicit (book) attention path, which is the one that can
return them, not from a second implementation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from core.classifier import SequenceClassifier
from core.model import GPTModel
from core.generation.sampling import SamplingConfig, next_token_probabilities


@torch.inference_mode()
def attention_maps(model: GPTModel, token_ids: list[int]) -> list[torch.Tensor]:
    """Per layer, the attention weights (heads, T, T) of one sequence; each row sums to 1."""
    ids = torch.tensor([token_ids], device=next(model.parameters()).device)
    _, attentions = model(ids, return_attention=True)
    return [a[0].float().cpu() for a in attentions]


@dataclass
class TokenChoice:
    token_id: int
    probability: float
    logit: float


@dataclass
class NextToken:
    choices: list[TokenChoice]  # the k most likely tokens under the sampling settings
    entropy: float  # of the sampling distribution, in nats
    greedy_id: int


@torch.inference_mode()
def next_token(model: GPTModel, token_ids: list[int], sampling: SamplingConfig, k: int = 10) -> NextToken:
    """The distribution the sampler would draw the next token from, after temperature and top-k/top-p."""
    ids = torch.tensor([token_ids[-model.cfg.context_length:]], device=next(model.parameters()).device)
    logits = model(ids, last_only=True)[:, -1].float()
    probs = next_token_probabilities(logits, sampling)[0] if not sampling.greedy else logits.softmax(-1)[0]
    top = torch.topk(probs, min(k, probs.shape[-1]))
    nonzero = probs[probs > 0]
    entropy = float(-(nonzero * nonzero.log()).sum())
    choices = [TokenChoice(int(i), float(p), float(logits[0, i])) for p, i in zip(top.values, top.indices)]
    return NextToken(choices, entropy, int(logits[0].argmax()))


@torch.inference_mode()
def token_probabilities(model: GPTModel, prompt_ids: list[int], completion_ids: list[int]) -> list[float]:
    """Probability the model gave each completion token, one forward pass (teacher forcing)."""
    if not completion_ids:
        return []
    ids = (prompt_ids + completion_ids)[-model.cfg.context_length:]
    n = min(len(completion_ids), len(ids) - 1)
    x = torch.tensor([ids], device=next(model.parameters()).device)
    logprobs = model(x).float().log_softmax(-1)[0]
    targets = torch.tensor(ids[-n:], device=x.device)
    picked = logprobs[-n - 1 : -1].gather(-1, targets[:, None])[:, 0]
    probs = picked.exp().tolist()
    return [math.nan] * (len(completion_ids) - n) + probs


def pca_2d(vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Project (N, d) vectors on their two principal components; also return explained variance ratios."""
    x = vectors.float()
    x = x - x.mean(0, keepdim=True)
    # SVD of the centred data: rows of vh are the principal directions.
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    coords = x @ vh[:2].T
    if coords.shape[1] < 2:
        coords = torch.nn.functional.pad(coords, (0, 2 - coords.shape[1]))
    variance = s.pow(2)
    ratios = variance[:2] / variance.sum().clamp(min=1e-12)
    return coords, ratios


@torch.inference_mode()
def embedding_vectors(model: GPTModel, token_groups: list[list[int]]) -> torch.Tensor:
    """One vector per word: the mean of its tokens' input embeddings."""
    table = model.tok_emb.weight
    return torch.stack([table[torch.tensor(g, device=table.device)].float().mean(0) for g in token_groups]).cpu()


def input_x_gradient(classifier: SequenceClassifier, token_ids: list[int], target: int) -> list[float]:
    """Gradient x input attribution (Shrikumar et al., 2016) of each token to one class logit.

    The score of a token is the dot product of its input embedding with the
    gradient of the class logit with respect to that embedding: positive
    pushes towards the class, negative away from it.
    """
    backbone = classifier.backbone
    ids = torch.tensor([token_ids], device=next(classifier.parameters()).device)
    with torch.enable_grad():
        ctx = backbone.context(ids)
        embedded = backbone.tok_emb(ids).detach().requires_grad_(True)
        x = embedded + (backbone.pos_emb(ctx.positions) if backbone.pos_emb is not None else 0)
        hidden, _ = backbone.run_blocks(x, ctx)
        logit = classifier.classify_hidden(hidden, None)[0, target]
        (grad,) = torch.autograd.grad(logit, embedded)
    return (grad * embedded).sum(-1)[0].float().tolist()


@torch.inference_mode()
def last_token_attention(classifier: SequenceClassifier, token_ids: list[int]) -> list[float]:
    """How much the last token attends to each token in the last layer, averaged over heads."""
    ids = torch.tensor([token_ids], device=next(classifier.parameters()).device)
    _, attentions = classifier.backbone(ids, return_attention=True)
    return attentions[-1][0, :, -1].float().mean(0).tolist()
