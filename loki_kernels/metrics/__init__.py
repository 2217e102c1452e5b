"""Evaluation metrics of the K-FAC curvature edit (Merullo et al. 2025): memorisation, nDCG@k, perplexity.

* :func:`memorization`: greedy continuation of prefix → suffix windows, scored as ``strict_acc`` (every suffix
  token right), ``loose_acc`` (similarity ``1 − d/L ≥ loose``, 0.75 by default) and ``avg_levenshtein_norm``
  (mean of ``d/L``), where ``d`` is the token-level Levenshtein distance (rapidfuzz, on id lists) between the
  ``L`` generated tokens and the gold suffix. Windows come from :func:`load_memorization_windows`.
* :func:`ndcg`: the edited model's top-k next-token ranking at every position against the **unedited**
  model's, cached by :func:`ndcg_baseline` / :func:`save_ndcg_baseline`. The r-th predicted token scores
  relevance ``k − b`` if it is the baseline's b-th token (0-based), else 0; nDCG = DCG/IDCG per position,
  averaged over positions.
* :func:`perplexity`: exp of the corpus-mean token NLL; :func:`mean_batch_perplexity`: the original's formula.

Where this differs from the original (``goodfire-ai/memorization_kfac`` ``metrics/``):

* Generation is a greedy loop that always makes exactly ``L`` tokens. ``model.generate`` stops once every row
  of a batch has produced EOS, and the original then slices ``gen[:, -L:]``, which takes prompt tokens into
  the "suffix"; rows that stop early are filled with pad (= EOS) tokens. Both make a window's score depend
  on its batch. Here EOS is an ordinary token, as it is in the gold suffix.
* The attention mask comes from the padding, not from ``ids != pad_id`` (which masks real EOS tokens), and
  position ids count real tokens only, so left padding changes nothing.
* Windows of different suffix lengths are scored (grouped by length); the original assumed one length. Text
  records are tokenized without special tokens, prompts too (the original's quotes prompts got the
  tokenizer's defaults), and generation runs in the model's own dtype (the original autocast quotes to bf16).
* A missing or mismatched nDCG baseline is an error; the original silently built it from the model being
  scored, so nDCG came out as 1.0.
* The original's perplexity is :func:`mean_batch_perplexity`; it depends on the batch size.

Modules: :mod:`.recitation` (memorisation), :mod:`.ranking` (nDCG and its baseline file), :mod:`.likelihood`
(perplexity), :mod:`.common` (eval mode, progress, checks). Text corpora become token rows with
:func:`loki_kernels.data.read_texts` and :func:`loki_kernels.data.pack_text`.
"""

from __future__ import annotations

from .likelihood import mean_batch_perplexity, perplexity
from .ranking import (
    NDCGBaseline,
    check_ndcg_baseline,
    load_ndcg_baseline,
    model_hash,
    ndcg,
    ndcg_at_k,
    ndcg_baseline,
    save_ndcg_baseline,
    tokens_hash,
)
from .recitation import (
    DEFAULT_LOOSE,
    MemorizationResult,
    Window,
    greedy_suffixes,
    levenshtein,
    load_memorization_windows,
    memorization,
)

__all__ = [
    "DEFAULT_LOOSE", "Window", "MemorizationResult", "load_memorization_windows", "levenshtein", "greedy_suffixes",
    "memorization", "NDCGBaseline", "model_hash", "tokens_hash", "ndcg_baseline", "save_ndcg_baseline",
    "load_ndcg_baseline", "check_ndcg_baseline", "ndcg_at_k", "ndcg", "perplexity", "mean_batch_perplexity",
]
