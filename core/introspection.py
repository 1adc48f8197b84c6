"""Looking inside a model: attention maps, next-token distributions, embeddings, occlusion.

These are the measurements the web Lab draws. Each works on the very model
that is being served, through its ordinary forward pass: attention weights
come from the explicit (book) attention path, which is the one that can
return them, not from a second implementation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from core.classifier import SequenceClassifier, class_logits
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


def word_index(pieces: list[bytes]) -> list[int]:
    """The word each token belongs to: a word starts at the first token and at every token
    whose bytes start with whitespace, and goes on until the next one ("WINNER!!" and
    " 09061701461" are one word each, however many tokens they take)."""
    words, current = [], -1
    for i, piece in enumerate(pieces):
        if i == 0 or piece[:1].isspace():
            current += 1
        words.append(current)
    return words


@dataclass
class Occlusion:
    log_odds: float  # of class ``positive`` against ``negative`` for the whole text
    push: list[float]  # per group: the whole text's log-odds minus those of the text without the group


@torch.inference_mode()
def occlusion(classifier: SequenceClassifier, token_ids: list[int], groups: list[int], positive: int, negative: int,
              pad_id: int, batch_size: int = 32) -> Occlusion:
    """Leave-one-out occlusion (Zeiler & Fergus, 2014; Li et al., 2016, "Understanding Neural
    Networks through Representation Erasure") of each group of tokens on a classifier's log-odds.

    ``groups[i]`` numbers the group of token i (0, 1, ...). A group's push is
    ``log p(positive)/p(negative)`` of the text minus the same of the text with the group's
    tokens deleted: positive means the group moved the decision towards ``positive``, negative
    towards ``negative``. It is the model's own answer to "what if this were not there",
    measured with the very forward pass that classifies; a gradient at the input (gradient x
    input) is only a linear guess at that and can get the sign wrong where the model saturates.
    A text left with no token reads as one padding token, as :func:`core.classifier.classify` does.
    """
    if len(groups) != len(token_ids):
        raise ValueError(f"{len(token_ids)} tokens but {len(groups)} group numbers")
    n_groups = max(groups) + 1 if groups else 0
    variants = [list(token_ids)] + [
        [t for t, g in zip(token_ids, groups) if g != k] or [pad_id] for k in range(n_groups)
    ]
    logits = class_logits(classifier, variants, pad_id, batch_size=batch_size)
    log_odds = (logits[:, positive] - logits[:, negative]).tolist()
    return Occlusion(log_odds[0], [log_odds[0] - lo for lo in log_odds[1:]])


@torch.inference_mode()
def last_token_attention(classifier: SequenceClassifier, token_ids: list[int]) -> list[float]:
    """How much the last token attends to each token in the last layer, averaged over heads."""
    ids = torch.tensor([token_ids], device=next(classifier.parameters()).device)
    _, attentions = classifier.backbone(ids, return_attention=True)
    return attentions[-1][0, :, -1].float().mean(0).tolist()
