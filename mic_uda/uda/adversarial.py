"""Adversarial alignment pieces shared by classification (CDAN in SDAT) and detection (SADA):
gradient reversal with a warm-start coefficient, the CDAN conditioning and a domain discriminator.

Semantics follow the Transfer-Learning-Library code SDAT is built on (``tllib``), so the paper's
hyper-parameters mean the same thing here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class _GradientReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, coeff: float) -> torch.Tensor:  # type: ignore[override]
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return -ctx.coeff * grad, None


def grad_reverse(x: torch.Tensor, coeff: float = 1.0) -> torch.Tensor:
    """Identity forward; the gradient is multiplied by ``-coeff`` on the way back."""
    return _GradientReverse.apply(x, coeff)


def grl_coefficient(
    step: int, max_iters: int = 1000, alpha: float = 1.0, lo: float = 0.0, hi: float = 1.0
) -> float:
    """tllib's ``WarmStartGradientReverseLayer``: ``2 (hi - lo) / (1 + exp(-alpha t / T)) - (hi - lo) + lo``,
    0 at the start (a random discriminator's gradient would only add noise) rising to ``hi``."""
    return float(2.0 * (hi - lo) / (1.0 + math.exp(-alpha * step / max_iters)) - (hi - lo) + lo)


def entropy(probs: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-row entropy ``-sum p log(p + eps)`` (tllib's epsilon)."""
    return -(probs * torch.log(probs + eps)).sum(dim=1)


def cdan_features(
    features: torch.Tensor, probs: torch.Tensor, random_maps: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """The discriminator input of CDAN: the flattened outer product ``f (x) p`` (B, F*C), or its
    randomized multilinear approximation ``(f R_f) * (p R_p) / sqrt(d)`` when ``random_maps`` is given."""
    if random_maps is None:
        return torch.bmm(probs.unsqueeze(2), features.unsqueeze(1)).flatten(1)
    rf, rp = random_maps
    return (features @ rf) * (probs @ rp) / math.sqrt(float(rf.shape[1]))


def entropy_weights(probs: torch.Tensor) -> torch.Tensor:
    """CDAN+E: ``1 + exp(-H(p))``, normalised to mean 1 over the batch, so confident (easy to
    transfer) samples count more in the domain loss."""
    w = 1.0 + torch.exp(-entropy(probs))
    return w / w.sum() * probs.shape[0]


class DomainDiscriminator(nn.Sequential):
    """tllib's discriminator: 2 x (Linear, BatchNorm, ReLU) then one logit (source = 1)."""

    def __init__(self, in_features: int, hidden_dim: int = 1024) -> None:
        super().__init__(
            nn.Linear(in_features, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, 1),
        )


def domain_adversarial_loss(
    logits_source: torch.Tensor,
    logits_target: torch.Tensor,
    weight_source: torch.Tensor | None = None,
    weight_target: torch.Tensor | None = None,
) -> torch.Tensor:
    """Binary cross-entropy of the discriminator (source label 1, target 0), per-sample weights
    optional; the mean of the source and target halves, as tllib."""
    ls = F.binary_cross_entropy_with_logits(
        logits_source.view(-1), torch.ones_like(logits_source.view(-1)), weight=weight_source
    )
    lt = F.binary_cross_entropy_with_logits(
        logits_target.view(-1), torch.zeros_like(logits_target.view(-1)), weight=weight_target
    )
    return 0.5 * (ls + lt)


class ConditionalDomainAdversarial(nn.Module):
    """CDAN(+E): discriminator on features x (detached) predictions behind gradient reversal.

    Returns the domain loss; back-propagating it trains the discriminator to separate domains and,
    through the reversal, the features to confuse it. ``discriminator_accuracy`` is for logging.
    """

    def __init__(
        self,
        feature_dim: int,
        num_classes: int,
        hidden_dim: int = 1024,
        entropy_conditioning: bool = True,
        randomized_dim: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.entropy_conditioning = entropy_conditioning
        in_dim = feature_dim * num_classes
        if randomized_dim:
            g = torch.Generator().manual_seed(seed)
            self.register_buffer("random_f", torch.randn(feature_dim, randomized_dim, generator=g))
            self.register_buffer("random_p", torch.randn(num_classes, randomized_dim, generator=g))
            in_dim = randomized_dim
        else:
            self.random_f = self.random_p = None
        self.discriminator = DomainDiscriminator(in_dim, hidden_dim)
        self.discriminator_accuracy = torch.tensor(float("nan"))

    def forward(
        self,
        features_s: torch.Tensor,
        logits_s: torch.Tensor,
        features_t: torch.Tensor,
        logits_t: torch.Tensor,
        grl_coeff: float,
    ) -> torch.Tensor:
        f = torch.cat([features_s, features_t])
        p = torch.softmax(torch.cat([logits_s, logits_t]).float(), dim=1).detach()
        maps = (self.random_f, self.random_p) if self.random_f is not None else None
        h = cdan_features(grad_reverse(f, grl_coeff), p, maps)
        d = self.discriminator(h).view(-1)
        n = features_s.shape[0]
        w = entropy_weights(p) if self.entropy_conditioning else None
        ws, wt = (w[:n], w[n:]) if w is not None else (None, None)
        with torch.no_grad():
            self.discriminator_accuracy = torch.cat([d[:n] > 0, d[n:] <= 0]).float().mean()
        return domain_adversarial_loss(d[:n], d[n:], ws, wt)
