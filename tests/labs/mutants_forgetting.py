"""Known-wrong versions of lab 06's exercises: each check must fail on them, with the hint in its message."""

import warnings

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------- answer_loss
def _nll(logits, input_ids):
    """-log p(token t+1 | tokens <= t): ``[B, T-1]``."""
    return -torch.log_softmax(logits, -1)[:, :-1].gather(-1, input_ids[:, 1:, None])[..., 0]


def loss_no_shift(logits, input_ids, answer_mask):
    return F.cross_entropy(logits[answer_mask], input_ids[answer_mask])


def loss_every_token(logits, input_ids, answer_mask):
    return _nll(logits, input_ids).mean()


def loss_mask_on_predictor(logits, input_ids, answer_mask):
    return _nll(logits, input_ids)[answer_mask[:, :-1]].mean()


def loss_per_example_mean(logits, input_ids, answer_mask):
    nll, mask = _nll(logits, input_ids), answer_mask[:, 1:].float()
    return ((nll * mask).sum(1) / mask.sum(1)).mean()


def loss_sum(logits, input_ids, answer_mask):
    return _nll(logits, input_ids)[answer_mask[:, 1:]].sum()


def loss_raw_logits(logits, input_ids, answer_mask):
    return -logits[:, :-1].gather(-1, input_ids[:, 1:, None])[..., 0][answer_mask[:, 1:]].mean()


def loss_stub(logits, input_ids, answer_mask):
    raise NotImplementedError()


# ---------------------------------------------------------------------- token_kl
def kl_reversed(logits_base, logits_ft, mask):
    log_p, log_q = torch.log_softmax(logits_base, -1), torch.log_softmax(logits_ft, -1)
    return (log_q.exp() * (log_q - log_p)).sum(-1)[mask].mean()


def kl_f_kl_div_wrong_order(logits_base, logits_ft, mask):
    # F.kl_div(input=log p_base, target=p_ft) computes KL(p_ft || p_base)
    per = F.kl_div(torch.log_softmax(logits_base, -1), torch.softmax(logits_ft, -1), reduction="none").sum(-1)
    return per[mask].mean()


def kl_raw_logits(logits_base, logits_ft, mask):
    p = torch.softmax(logits_base, -1)
    return (p * (logits_base - logits_ft)).sum(-1)[mask].mean()


def kl_probabilities(logits_base, logits_ft, mask):
    p, q = torch.softmax(logits_base, -1), torch.softmax(logits_ft, -1)
    return (p * (p - q)).sum(-1)[mask].mean()


def kl_sum_positions(logits_base, logits_ft, mask):
    log_p, log_q = torch.log_softmax(logits_base, -1), torch.log_softmax(logits_ft, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)[mask].sum()


def kl_ignore_mask(logits_base, logits_ft, mask):
    log_p, log_q = torch.log_softmax(logits_base, -1), torch.log_softmax(logits_ft, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def kl_div_reduction_mean(logits_base, logits_ft, mask):
    with warnings.catch_warnings():  # torch warns that reduction="mean" is not the KL: that is the mutant
        warnings.simplefilter("ignore")
        return F.kl_div(torch.log_softmax(logits_ft[mask], -1), torch.log_softmax(logits_base[mask], -1), reduction="mean", log_target=True)


def kl_stub(logits_base, logits_ft, mask):
    raise NotImplementedError()


# ---------------------------------------------------------------------- spearman
def _pearson(a, b):
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def _ordinal(v):
    return v.double().argsort(stable=True).argsort().double() + 1


def _average(v):
    # ties get the mean of their ordinal ranks
    ranks = _ordinal(v)
    out = ranks.clone()
    for value in v.unique():
        out[v == value] = ranks[v == value].mean()
    return out


def spearman_pearson(x, y):
    return _pearson(x, y)


def spearman_ordinal_ties(x, y):
    return _pearson(_ordinal(x), _ordinal(y))


def spearman_d2_formula(x, y):
    n = len(x)
    return 1 - 6 * float(((_average(x) - _average(y)) ** 2).sum()) / (n * (n * n - 1))


def spearman_stub(x, y):
    raise NotImplementedError()


MUTANTS = {
    "check_answer_loss": [
        (loss_no_shift, "shift by one"),
        (loss_every_token, "answer tokens only"),
        (loss_mask_on_predictor, "*predicted* tokens"),
        (loss_per_example_mean, "per-example means"),
        (loss_sum, "not their sum"),
        (loss_raw_logits, "apply log_softmax"),
    ],
    "check_token_kl": [
        (kl_reversed, "weight by the *base* model's"),
        (kl_f_kl_div_wrong_order, "F.kl_div(input, target) computes KL(target || input)"),
        (kl_raw_logits, "take log_softmax of each logits tensor first"),
        (kl_probabilities, "use log-probabilities inside the KL"),
        (kl_sum_positions, "do not sum them"),
        (kl_ignore_mask, "only over the positions where mask is True"),
        (kl_div_reduction_mean, "reduction='mean'"),
    ],
    "check_spearman": [
        (spearman_pearson, "rank both vectors first"),
        (spearman_ordinal_ties, "average of the ranks they occupy"),
        (spearman_d2_formula, "exact only without ties"),
    ],
}
STUBS = {"check_answer_loss": loss_stub, "check_token_kl": kl_stub, "check_spearman": spearman_stub}
