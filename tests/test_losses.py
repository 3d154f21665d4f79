"""group_advantages and policy_loss (Eq. 2) against an independent float64 reference, values and gradients."""
import math

import pytest
import torch

from ril import group_advantages, policy_loss


def ref_advantages(rewards, g, scale):
    out = []
    for i in range(0, len(rewards), g):
        grp = [float(x) for x in rewards[i:i + g]]
        mean = sum(grp) / g
        std = math.sqrt(sum((x - mean) ** 2 for x in grp) / (g - 1)) if scale else None
        out += [(x - mean) / (std + 1e-6) if scale else x - mean for x in grp]
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("scale", [False, True])
def test_group_advantages(scale):
    r = torch.tensor([1., 0., 2., 1., 0., 0., 0., 0., 2., 1., 1., 0.], dtype=torch.float64)
    a = group_advantages(r, 4, scale_by_std=scale)
    torch.testing.assert_close(a, ref_advantages(r.tolist(), 4, scale))
    assert torch.equal(a[4:8], torch.zeros(4, dtype=torch.float64))  # identical rewards -> zeros
    assert abs(a.view(-1, 4).sum(1)).max() < 1e-9  # zero-mean per group


def ref_loss(logp, old, ref, adv, mask, eps, beta, agg, norm_len):
    """Per-sequence loops in float64, written independently of ril.policy_loss."""
    N, T = logp.shape
    per_seq_sum, per_seq_n, tok_sum, tok_n = [], [], 0.0, 0
    for i in range(N):
        s, n = 0.0, 0
        for t in range(T):
            if not mask[i, t]:
                continue
            r = torch.exp(logp[i, t] - old[i, t])
            term = -torch.minimum(r * adv[i], torch.clamp(r, 1 - eps, 1 + eps) * adv[i])
            if beta:
                d = ref[i, t] - logp[i, t]
                term = term + beta * (torch.exp(d) - d - 1)
            s, n = s + term, n + 1
        per_seq_sum.append(s)
        per_seq_n.append(n)
        tok_sum, tok_n = tok_sum + s, tok_n + n
    if agg == "token-mean":
        return tok_sum / tok_n
    if agg == "seq-mean-token-mean":
        return sum(s / max(n, 1) for s, n in zip(per_seq_sum, per_seq_n)) / N
    return tok_sum / (N * norm_len)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_policy_loss_matches_reference(agg, beta):
    g = torch.Generator().manual_seed(0)
    N, T = 6, 7
    old = -torch.rand(N, T, generator=g, dtype=torch.float64) * 3
    logp0 = old + 0.4 * torch.randn(N, T, generator=g, dtype=torch.float64)  # ratios well outside [0.8, 1.2]
    ref = old + 0.3 * torch.randn(N, T, generator=g, dtype=torch.float64)
    adv = torch.tensor([1.0, -0.5, 0.0, 2.0, -1.5, 0.25], dtype=torch.float64)
    mask = torch.rand(N, T, generator=g) < 0.7
    mask[:, 0] = True
    mask[2, 3:] = False
    logp0 = torch.where(mask, logp0, 0.0)  # what response_logprobs gives: 0 where masked
    a = logp0.clone().requires_grad_()
    b = logp0.clone().requires_grad_()
    loss, stats = policy_loss(a, old, ref if beta else None, adv, mask, clip_eps=0.2, beta=beta, agg=agg,
                              norm_len=9)
    want = ref_loss(b, old, ref, adv, mask, 0.2, beta, agg, 9)
    torch.testing.assert_close(loss, want)
    loss.backward()
    want.backward()
    torch.testing.assert_close(a.grad, b.grad)
    assert torch.all(a.grad[~mask] == 0)  # masked tokens get no gradient
    r = torch.exp(logp0 - old)[mask]
    assert stats["ratio_min"] == pytest.approx(r.min().item())
    assert stats["ratio_max"] == pytest.approx(r.max().item())
    assert 0 < stats["clip_frac"] < 1


def test_policy_loss_at_ratio_one_is_minus_mean_advantage():
    """mu = 1: pi_old = pi_theta, so the surrogate's value is -A and its gradient is -A * grad log pi."""
    logp = torch.log(torch.tensor([[0.5, 0.25], [0.1, 0.9]])).requires_grad_()
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[True, True], [True, False]])
    loss, stats = policy_loss(logp, logp.detach(), None, adv, mask, beta=0.0)
    assert loss.item() == pytest.approx(-(1 + 1 - 2) / 3)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1 / 3, -1 / 3], [2 / 3, 0.0]]))
    assert stats["clip_frac"] == 0 and stats["kl"] == 0
