"""Greedy generation: a model's answers to prompts, cut at the first stop token.

Batches are sorted by prompt length and left-padded, so every row's next token is generated
at the same position; only the generated ids are kept.
"""

from __future__ import annotations

import torch

from deltatune.data.examples import end_of_turn_id, prompt_ids
from deltatune.evaluate.loss import evaluation_mode


@torch.no_grad()
def greedy_continuations(model, prompts: list[list[int]], *, pad_id: int, stop_ids: set[int],
                         max_new_tokens: int = 64, batch_size: int = 8,
                         device: torch.device | None = None) -> list[list[int]]:
    """Greedy new token ids after each prompt, cut at the first stop id; left-padded length-sorted batches."""
    device = device or next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[list[int]] = [[] for _ in prompts]
    with evaluation_mode(model):
        for start in range(0, len(order), batch_size):
            idx = order[start: start + batch_size]
            width = max(len(prompts[i]) for i in idx)
            # Left padding, so every row's next token is generated at the same position.
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
                mask[row, width - len(prompts[i]):] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                                 eos_token_id=sorted(stop_ids) or None)
            for row, i in enumerate(idx):
                new = out[row, width:].tolist()
                outputs[i] = new[: next((k for k, t in enumerate(new) if t in stop_ids), len(new))]
    return outputs


def stop_ids(tokenizer) -> set[int]:
    """Generation stops at eos, padding, and the chat template's end-of-turn token (where training stopped)."""
    return {tokenizer.eos_token_id, tokenizer.pad_token_id, end_of_turn_id(tokenizer)} - {None}


def generate(model, tokenizer, conversations: list[list[dict]], *, max_new_tokens: int = 64,
             batch_size: int = 8, device: torch.device | None = None) -> list[str]:
    """Greedy answers to each conversation's prompt (its last assistant turn is left out)."""
    prompts = [prompt_ids(tokenizer, conv) for conv in conversations]
    new = greedy_continuations(model, prompts, pad_id=tokenizer.pad_token_id, stop_ids=stop_ids(tokenizer),
                               max_new_tokens=max_new_tokens, batch_size=batch_size, device=device)
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in new]
