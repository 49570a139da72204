"""How sure a model was of its answer, from the logprobs vLLM returns. Plain functions, no I/O.

- ``choice``: the probability of the chosen label. Under structured outputs vLLM returns
  logprobs renormalised over the tokens the grammar allows, and one label can be produced
  through several token paths (``other`` as one token, or ``ot`` + ``h`` + ``e`` + ``r``). The
  product along the path taken understates the label's probability, so the label's probability
  is summed over every path the reply shows: the path taken, plus each path that leaves it at
  some step by one alternative token of ``top_logprobs`` that completes the same label. Paths
  that leave it and need two or more further tokens are not in the reply: the figure is a lower
  bound of the label's probability, exact when every path to it is one token away from the one
  taken (always for a label of one token).
- everything else (JSON, regex, free text): the exponentiated mean token logprob of the reply.
"""

from __future__ import annotations

import math
from typing import Any

TOP_LOGPROBS = 5  # alternatives per position asked of vLLM


def logprob_params(api: str) -> dict[str, Any]:
    """The request fields that make vLLM return the logprobs the confidence needs."""
    if api == "chat":
        return {"logprobs": True, "top_logprobs": TOP_LOGPROBS}
    return {"logprobs": TOP_LOGPROBS}


def _steps(choice: dict[str, Any]) -> list[tuple[bytes, float, list[tuple[bytes, float]]]] | None:
    """(token bytes, logprob, [(alternative bytes, logprob)]) per generated position, or None."""
    lp = choice.get("logprobs")
    if not lp:
        return None
    if "content" in lp:  # chat completions
        content = lp.get("content")
        if content is None:
            return None
        return [(_bytes(t), float(t["logprob"]), [(_bytes(a), float(a["logprob"])) for a in t.get("top_logprobs") or []])
                for t in content]
    tokens, lps, tops = lp.get("tokens"), lp.get("token_logprobs"), lp.get("top_logprobs")  # completions
    if tokens is None or lps is None:
        return None
    tops = tops or [{}] * len(tokens)
    return [(t.encode(), float(x), [(k.encode(), float(v)) for k, v in (top or {}).items()])
            for t, x, top in zip(tokens, lps, tops)]


def _bytes(entry: dict[str, Any]) -> bytes:
    b = entry.get("bytes")
    return bytes(b) if b is not None else str(entry.get("token", "")).encode()


def _exp(x: float) -> float:
    return 0.0 if x == -math.inf else math.exp(x)


def choice_confidence(choice: dict[str, Any], label: str, choices: list[str]) -> float | None:
    """P(label) summed over the paths the reply shows (see the module docstring); None without logprobs."""
    steps = _steps(choice)
    if not steps:
        return None
    target = label.encode()
    # An alternative that spells the label is only a whole path if the grammar must stop there:
    # not when another choice continues it (`bug` in front of `bugfix`).
    may_stop = not any(c != label and c.encode().startswith(target) for c in choices)
    total, prefix, logp = 0.0, b"", 0.0
    for token, lp, alts in steps:
        if prefix == target:  # the label is complete: what follows is the end of the reply (`</s>`)
            logp += lp
            continue
        if may_stop:
            for alt, alp in alts:
                if alt != token and prefix + alt == target:
                    total += _exp(logp + alp)
        prefix += token
        logp += lp
    if prefix == target:
        total += _exp(logp)
    return min(1.0, total)


def mean_confidence(choice: dict[str, Any]) -> float | None:
    """exp(mean token logprob) of the reply; None without logprobs or tokens."""
    steps = _steps(choice)
    if not steps:
        return None
    return _exp(sum(lp for _, lp, _ in steps) / len(steps))


def confidence(reply: dict[str, Any], value: Any, choices: list[str] | None) -> float | None:
    """The confidence of a reply whose parsed answer is ``value`` (see the module docstring)."""
    try:
        ch = reply["choices"][0]
    except (KeyError, IndexError, TypeError):
        return None
    if choices is not None and isinstance(value, str):
        return choice_confidence(ch, value, choices)
    return mean_confidence(ch)
