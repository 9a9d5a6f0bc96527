"""mHC mixing matrices: entropy, distance to the identity and to the nearest permutation, Sinkhorn errors."""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch

from .common import _frame, _get, _layers, _row, token_mask


# ----------------------------------------------------------------------------- 3. Sinkhorn / mHC
def hc_prefixes(model, cache=None, layers=None) -> list[str]:
    """Every mHC in forward order: `blocks.0.attn_hc`, `blocks.0.mlp_hc`, ..., then MTP blocks'."""
    return [f"{p}.{hc}" for p in _layers(model, cache, layers) for hc in ("attn_hc", "mlp_hc")]


def comb_entropy(comb: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Entropy (nats) of each row (dim=-1) or column (dim=-2) of comb [..., n, n] -> [..., n].

    Each line is renormalised first (Sinkhorn leaves rows summing to 1 only approximately).
    0 = the stream goes to / comes from one place; log n = spread evenly.
    """
    share = comb / comb.sum(dim, keepdim=True)
    return -torch.xlogy(share, share).sum(dim)


def distance_to_identity(comb: torch.Tensor) -> torch.Tensor:
    """Frobenius ||comb - I|| per matrix: [..., n, n] -> [...]. 0 = each stream kept as it was."""
    eye = torch.eye(comb.shape[-1], dtype=comb.dtype, device=comb.device)
    return torch.linalg.matrix_norm(comb - eye)


def nearest_permutation(comb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The permutation matrix closest to each comb in Frobenius norm, and the distance.

    comb [..., n, n] -> (perm [..., n] int64 with P[j, perm[j]] = 1, distance [...]).
    ||C - P||² = ||C||² + n - 2 Σ_j C[j, σ(j)], so the nearest P maximises Σ_j C[j, σ(j)]: a
    linear assignment. For n <= 6 (V4 uses n = 4: 24 permutations) every permutation is scored
    at once, vectorised over tokens; larger n use scipy's `linear_sum_assignment` per matrix
    (scipy is optional and needed only then).
    """
    n = comb.shape[-1]
    if n <= 6:
        perms = torch.tensor(list(itertools.permutations(range(n))), device=comb.device)  # [n!, n]
        totals = comb[..., torch.arange(n, device=comb.device), perms].sum(-1)  # [..., n!]
        perm = perms[totals.argmax(-1)]
    else:
        try:
            from scipy.optimize import linear_sum_assignment
        except ImportError as e:
            raise ImportError(f"nearest_permutation for n = {n} > 6 needs scipy") from e
        flat = comb.detach().reshape(-1, n, n).cpu().double().numpy()
        perm = torch.tensor([linear_sum_assignment(-m)[1] for m in flat], device=comb.device)
        perm = perm.reshape(*comb.shape[:-1])
    P = torch.nn.functional.one_hot(perm, n).to(comb.dtype)
    return perm, torch.linalg.matrix_norm(comb - P)


class CombStats(NamedTuple):
    """Per token of one mHC ([b, p] unless noted)."""

    row_entropy: torch.Tensor  # [b,p,n]: how input stream j spreads over the outputs
    col_entropy: torch.Tensor  # [b,p,n]: how many inputs output stream k draws from
    dist_identity: torch.Tensor  # Frobenius distance to I
    dist_permutation: torch.Tensor  # Frobenius distance to the nearest permutation matrix
    permutation: torch.Tensor  # [b,p,n] int64: that permutation (input j -> output perm[j])


@torch.no_grad()
def comb_stats(model, cache, hc: str) -> CombStats:
    """Entropy and distances of the cached Sinkhorn mixing `{hc}.hook_comb` [b,p,n,n]
    (comb[j, k] = weight of input stream j in output stream k). hc: e.g. "blocks.1.attn_hc".

    Reads the cached value, so an edited comb is what is measured.

        s = stats.comb_stats(model, cache, "blocks.1.attn_hc")  # s.dist_identity: [b, p]
    """
    comb = _get(cache, f"{hc}.hook_comb", "comb_stats").float()
    perm, dist_perm = nearest_permutation(comb)
    return CombStats(comb_entropy(comb, -1), comb_entropy(comb, -2), distance_to_identity(comb), dist_perm, perm)


class SinkhornTrace(NamedTuple):
    """Convergence of one mHC's Sinkhorn projection, recomputed from its raw mixes."""

    row_err: torch.Tensor  # [iters, b, p]: max_j |Σ_k comb[j,k] - 1| after each iteration
    col_err: torch.Tensor  # [iters, b, p]: max_k |Σ_j comb[j,k] - 1| after each iteration
    comb: torch.Tensor  # [b,p,n,n]: the final matrix (equals the unedited hook_comb)


@torch.no_grad()
def sinkhorn_errors(model, cache, hc: str) -> SinkhornTrace:
    """Re-run the Sinkhorn projection of `{hc}` from `{hc}.hook_mixes`, recording the row- and
    column-sum errors after every iteration.

    Exactly `HyperConnection.mixings`: logits = mixes[2n:] * scale[2] + base[2n:] (as n x n),
    comb = softmax(logits, rows) + eps, then `hc_sinkhorn_iters` iterations; iteration 1 is the
    first column normalisation, iterations 2.. each a row then a column normalisation (each
    dividing by sum + eps). Errors are recorded after the column step, so col_err is ~eps
    throughout and row_err shows the convergence. If `hook_comb` was edited, `comb` here is
    still what Sinkhorn produced, not the edit.

        t = stats.sinkhorn_errors(model, cache, "blocks.0.mlp_hc")  # t.row_err: [iters, b, p]
    """
    module = model.get_submodule(hc)
    n, eps = module.n, module.hc_eps
    mixes = _get(cache, f"{hc}.hook_mixes", "sinkhorn_errors")
    m_comb, b_comb = mixes[..., 2 * n :], module.base[2 * n :]
    logits = (m_comb * module.scale[2] + b_comb).unflatten(-1, (n, n))

    def errors(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (c.sum(-1) - 1).abs().amax(-1), (c.sum(-2) - 1).abs().amax(-1)

    comb = torch.softmax(logits, dim=-1) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    trace = [errors(comb)]
    for _ in range(module.iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
        trace.append(errors(comb))
    row_err, col_err = (torch.stack(e) for e in zip(*trace))
    return SinkhornTrace(row_err, col_err, comb)


def sinkhorn_summary(model, cache, mask=None, positions=None, layers=None, errors: bool = True):
    """One row per mHC (`attn_hc`, `mlp_hc` of each block, MTP blocks included when cached).

    Columns: layer, block, layer_type, hc, then token means of row_entropy and col_entropy
    (nats, averaged over the n lines; max log n; the two means coincide for an exactly doubly
    stochastic comb, since both equal -Σ c log c / n, so only the per-line values in `comb_stats`
    tell rows from columns), dist_identity, dist_permutation, frac_identity
    (share of tokens whose nearest permutation is the identity); with errors=True (needs
    `hook_mixes` too) also row_err_first and row_err_final / col_err_final (max over tokens,
    after the first and the last Sinkhorn iteration).

        df = stats.sinkhorn_summary(model, cache)
    """
    rows = []
    for hc in hc_prefixes(model, cache, layers):
        s = comb_stats(model, cache, hc)
        keep = token_mask(mask, positions, *s.dist_identity.shape, s.dist_identity.device)
        n = s.permutation.shape[-1]
        is_identity = (s.permutation == torch.arange(n, device=keep.device)).all(-1)
        prefix, name = hc.rsplit(".", 1)
        row = {
            **_row(model, prefix), "hc": name,
            "row_entropy": float(s.row_entropy[keep].mean()), "col_entropy": float(s.col_entropy[keep].mean()),
            "dist_identity": float(s.dist_identity[keep].mean()),
            "dist_permutation": float(s.dist_permutation[keep].mean()),
            "frac_identity": float(is_identity[keep].float().mean()),
        }  # fmt: skip
        if errors:
            t = sinkhorn_errors(model, cache, hc)
            row["row_err_first"] = float(t.row_err[0][keep].max())
            row["row_err_final"] = float(t.row_err[-1][keep].max())
            row["col_err_final"] = float(t.col_err[-1][keep].max())
        rows.append(row)
    return _frame(rows)
