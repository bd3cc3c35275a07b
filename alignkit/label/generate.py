"""Candidate responses for labelling, and how different they are from each other.

Two ways to draw ``K`` candidates per prompt from one or more models (round robin over the models:
candidate ``j`` comes from model ``j mod M``):

* ``independent``: every candidate is an ordinary sample of the prompt (temperature ``T``, top-p).
  Samples from one model tend to share the model's favourite answer, so the pair an annotator sees
  often differs only in wording, and a preference between near-copies teaches little.
* ``nc`` (negatively-correlated sampling): candidate ``j`` is sampled from the original prompt with a
  system message that lists the earlier candidates ``1..j-1`` (each clipped to ``context_chars``
  characters) and asks for a clearly different approach or viewpoint (`NC_INSTRUCTION`); a prompt that
  already has a system message keeps it, with the request appended. The reply is stored as a response
  to the original prompt. This is the sequential form of the idea in Community Alignment (each new
  candidate is conditioned on the earlier ones and asked to differ); each step is one batch over all
  prompts. Putting the earlier answers in the system message rather than as earlier assistant turns
  was chosen on the embedded 135M model, which, shown its "previous answers", tends to talk about them
  ("Here's a different way to look at your previous answer...") or copy them.
  ``nc_pool > 1`` adds a selection step: each candidate after the first is drawn ``nc_pool`` times and
  the draw least similar (bag-of-words) to the earlier candidates is kept. It costs ``nc_pool`` times
  the sampling and makes the set more diverse even when the model follows the request poorly.

Diversity of a candidate set (each prompt's K candidates, averaged over prompts; `candidate_diversity`):
``distinct-1``/``distinct-2`` (unique n-grams / all n-grams within the set, `alignkit.evaluate.drift.distinct_n`),
``lexical similarity`` (mean cosine similarity of the bag-of-words count vectors over all pairs in the
set) and, when a model is given, ``embedding similarity`` (mean cosine of the model's mean-pooled final
hidden states over all pairs). Higher distinct-n and lower similarity mean a more diverse set.
"""
from __future__ import annotations

import math
import re
import time
from collections import Counter
from dataclasses import dataclass
from itertools import combinations
from typing import Any, Sequence

import torch

from alignkit.data import PromptExample, tokenize_prompt
from alignkit.errors import UsageError
from alignkit.evaluate.drift import distinct_n
from alignkit.generation import generate_ids
from alignkit.label.tasks import Candidate, Task
from alignkit.model.forward import decoder_hidden_states, left_pad

DIVERSITY_MODES = ("nc", "independent")
NC_INSTRUCTION = ("Answers to the next request have already been written:\n{answers}\n"
                  "Write an answer that takes a clearly different approach or viewpoint from all of them: "
                  "different ideas, structure or angle, not just different wording. Do not mention the other answers.")
_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass
class CandidateModel:
    """A model that writes candidates; ``name`` is what the tasks file and the leaderboard call it."""

    name: str
    model: Any
    tokenizer: Any


def clip_text(text: str, max_chars: int) -> str:
    """``text`` cut to at most ``max_chars`` characters at a word boundary, marked with an ellipsis."""
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars].rsplit(None, 1)[0] if " " in text[:max_chars] else text[:max_chars]
    return cut.rstrip() + " ..."


def nc_conversation(prompt: list[dict], earlier: Sequence[str], context_chars: int = 300,
                    instruction: str = NC_INSTRUCTION) -> list[dict]:
    """The conversation that asks for a candidate unlike ``earlier`` (see the module docstring)."""
    messages = [dict(m) for m in prompt]
    if not earlier:
        return messages
    answers = "\n".join(f"- {clip_text(' '.join(text.split()), context_chars)}" for text in earlier)
    request = instruction.format(answers=answers)
    if messages[0]["role"] == "system":
        messages[0]["content"] = messages[0]["content"].rstrip() + "\n\n" + request
        return messages
    return [{"role": "system", "content": request}] + messages


def _sample(candidate_model: CandidateModel, conversations: list[list[dict]], settings: dict) -> list[str]:
    tokenizer = candidate_model.tokenizer
    prompt_ids = [tokenize_prompt(tokenizer, conversation) for conversation in conversations]
    rows = generate_ids(candidate_model.model, tokenizer, prompt_ids, **settings)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in rows]


def generate_candidates(models: Sequence[CandidateModel], prompts: Sequence[PromptExample], candidates: int = 4,
                        diversity: str = "independent", temperature: float = 0.8, top_p: float = 0.95,
                        max_new_tokens: int = 256, seed: int = 0, batch_size: int = 16,
                        context_chars: int = 300, retries: int = 1, nc_pool: int = 1) -> tuple[list[Task], dict[str, Any]]:
    """``candidates`` responses per prompt (see the module docstring); returns the tasks and a report
    (``seconds``, ``empty_dropped``: empty samples left after ``retries`` fresh draws, ``tasks_dropped``:
    prompts left with fewer than two candidates).

    ``nc_pool`` (nc only): draw that many conditioned samples for each candidate after the first and keep
    the one whose largest `lexical_similarity` to the earlier candidates is smallest; a selection step
    that makes the set more diverse even when the model follows the "be different" request poorly.
    """
    if diversity not in DIVERSITY_MODES:
        raise UsageError(f"diversity must be one of {DIVERSITY_MODES}, got {diversity!r}")
    if candidates < 2:
        raise UsageError(f"--candidates must be at least 2 (a pair to compare), got {candidates}")
    if not models:
        raise UsageError("need at least one model")
    if temperature <= 0:
        raise UsageError("temperature must be > 0: candidates drawn greedily are all the same answer")
    if nc_pool < 1 or (nc_pool > 1 and diversity != "nc"):
        raise UsageError(f"nc_pool must be >= 1 and applies to --diversity nc only, got {nc_pool} with {diversity}")
    settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, batch_size=batch_size)
    started = time.time()
    torch.manual_seed(seed)
    texts: list[list[str | None]] = [[None] * candidates for _ in prompts]
    owner = [models[j % len(models)] for j in range(candidates)]

    def draw(slots: list[tuple[int, int, int]], conversation_of) -> dict[tuple[int, int, int], str]:
        """Sample every (prompt, candidate, draw) slot with the candidate's model; redraw empty ones."""
        drawn: dict[tuple[int, int, int], str] = {}
        pending = slots
        for _ in range(1 + retries):
            for candidate_model in models:
                mine = [slot for slot in pending if owner[slot[1]] is candidate_model]
                if mine:
                    outputs = _sample(candidate_model, [conversation_of(p, j) for p, j, _ in mine], settings)
                    drawn.update((slot, text) for slot, text in zip(mine, outputs) if text)
            pending = [slot for slot in pending if slot not in drawn]
            if not pending:
                break
        return drawn

    if diversity == "independent":
        drawn = draw([(p, j, 0) for p in range(len(prompts)) for j in range(candidates)], lambda p, j: prompts[p].prompt)
        for (p, j, _), text in drawn.items():
            texts[p][j] = text
    else:
        for j in range(candidates):
            pool = 1 if j == 0 else nc_pool
            earlier = [[t for t in texts[p][:j] if t] for p in range(len(prompts))]
            drawn = draw([(p, j, r) for p in range(len(prompts)) for r in range(pool)],
                         lambda p, j: nc_conversation(prompts[p].prompt, earlier[p], context_chars))
            for p in range(len(prompts)):
                options = [drawn[(p, j, r)] for r in range(pool) if (p, j, r) in drawn]
                if options:
                    texts[p][j] = min(options, key=lambda text: max(
                        (lexical_similarity(text, other) for other in earlier[p]), default=0.0))
    tasks, empty, dropped = [], 0, 0
    for example, row in zip(prompts, texts):
        kept = [Candidate(text=text, model=owner[j].name, metadata={"order": j})
                for j, text in enumerate(row) if text]
        empty += len(row) - len(kept)
        if len(kept) < 2:
            dropped += 1
            continue
        task = Task(id="", prompt=[dict(m) for m in example.prompt], candidates=kept,
                    metadata={"diversity": diversity, "source": example.source}, source=example.source)
        identifier = example.fields.get("id")
        task.id = str(identifier) if identifier not in (None, "") else "sha256:" + task.fingerprint()[:16]
        tasks.append(task)
    report = {"diversity": diversity, "prompts": len(prompts), "candidates": candidates, "tasks": len(tasks),
              "empty_dropped": empty, "tasks_dropped": dropped, "seconds": round(time.time() - started, 1),
              "models": [m.name for m in models], "temperature": temperature, "top_p": top_p,
              "max_new_tokens": max_new_tokens, "seed": seed, "nc_pool": nc_pool if diversity == "nc" else None}
    return tasks, report


# ------------------------------------------------------------------------------------------ diversity

def lexical_similarity(text_a: str, text_b: str) -> float:
    """Cosine similarity of the two texts' bag-of-words count vectors (lower-cased word tokens)."""
    a, b = Counter(_WORD.findall(text_a.lower())), Counter(_WORD.findall(text_b.lower()))
    norm = math.sqrt(sum(v * v for v in a.values())) * math.sqrt(sum(v * v for v in b.values()))
    if norm == 0.0:
        return 1.0 if not a and not b else 0.0
    return sum(count * b[word] for word, count in a.items()) / norm


@torch.no_grad()
def text_embeddings(model, tokenizer, texts: Sequence[str], batch_size: int = 16, max_tokens: int = 512) -> torch.Tensor:
    """Mean-pooled final hidden states of ``model`` for each text, ``[len(texts), hidden]`` float32."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for start in range(0, len(texts), batch_size):
        rows = [tokenizer.encode(text, add_special_tokens=False)[:max_tokens] or [pad]
                for text in texts[start:start + batch_size]]
        input_ids, attention = left_pad(rows, pad)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        hidden = decoder_hidden_states(model, input_ids.to(device), attention.to(device), positions.to(device)).float()
        mask = attention.to(device).unsqueeze(-1).float()
        out.append(((hidden * mask).sum(1) / mask.sum(1)).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def _mean_pairwise(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def candidate_diversity(candidate_sets: Sequence[Sequence[str]], embedder: CandidateModel | None = None) -> dict[str, float]:
    """Diversity of each prompt's candidate set, averaged over prompts (see the module docstring)."""
    sets = [list(texts) for texts in candidate_sets if len(texts) >= 2]
    if not sets:
        raise UsageError("diversity needs at least one prompt with two or more candidates")
    result = {"prompts": len(sets), "candidates": sum(map(len, sets)),
              "distinct_1": _mean_pairwise([distinct_n(texts, 1) for texts in sets]),
              "distinct_2": _mean_pairwise([distinct_n(texts, 2) for texts in sets]),
              "lexical_similarity": _mean_pairwise([
                  _mean_pairwise([lexical_similarity(a, b) for a, b in combinations(texts, 2)]) for texts in sets]),
              "mean_words": _mean_pairwise([len(_WORD.findall(t)) for texts in sets for t in texts])}
    if embedder is not None:
        flat = [t for texts in sets for t in texts]
        vectors = torch.nn.functional.normalize(text_embeddings(embedder.model, embedder.tokenizer, flat), dim=-1)
        per_set, offset = [], 0
        for texts in sets:
            block = vectors[offset:offset + len(texts)]
            offset += len(texts)
            cosine = block @ block.T
            per_set.append(_mean_pairwise([float(cosine[i, j]) for i, j in combinations(range(len(texts)), 2)]))
        result["embedding_similarity"] = _mean_pairwise(per_set)
    return result


def diversity_table(results: dict[str, dict[str, float]]) -> str:
    """A Markdown table of `candidate_diversity` results keyed by sampling mode."""
    columns = [("distinct_1", "distinct-1 ↑"), ("distinct_2", "distinct-2 ↑"),
               ("lexical_similarity", "lexical similarity ↓"), ("embedding_similarity", "embedding similarity ↓"),
               ("mean_words", "mean words")]
    columns = [c for c in columns if any(c[0] in r for r in results.values())]
    lines = ["| sampling | prompts | candidates | " + " | ".join(title for _, title in columns) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in columns) + " |"]
    for mode, r in results.items():
        cells = ["n/a" if key not in r else f"{r[key]:.1f}" if key == "mean_words" else f"{r[key]:.3f}"
                 for key, _ in columns]
        lines.append(f"| {mode} | {r['prompts']} | {r['candidates']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
