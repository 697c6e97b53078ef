"""The runtime against transformers on one checkpoint: greedy tokens identical and logits within
1e-4, at each budget given (shared by the parity tests of families, selection functions and
multimodal checkpoints)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from models import Runtime, RuntimeConfig
from models.runtime import expert_bytes


def prompt_ids(batch: int = 1, length: int = 10) -> torch.Tensor:
    return torch.randint(3, 120, (batch, length), generator=torch.Generator().manual_seed(7))


_greedy: dict[tuple, torch.Tensor] = {}


def transformers_greedy(checkpoint, ids: torch.Tensor, new_tokens: int, reference=None) -> torch.Tensor:
    """transformers' greedy generation of exactly `new_tokens` after `ids` (float32, CPU: deterministic),
    computed once per checkpoint and input in a session: test_decoder_runtime_families compares two
    budgets with it and test_runtime_parity the same prompt again. `reference`: the checkpoint's model,
    if the caller has it loaded. The key holds the checkpoint's files' sizes and times: one rewritten
    in place is run again."""
    checkpoint = Path(checkpoint).resolve()
    files = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(checkpoint.iterdir())
                  if f.is_file())
    key = (str(checkpoint), files, str(ids.dtype), tuple(ids.shape), ids.numpy().tobytes(), new_tokens)
    if key not in _greedy:
        if reference is None:
            reference = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
        _greedy[key] = reference.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return _greedy[key].clone()


def budgets(store_path) -> dict[str, dict]:
    """Every expert, half of them, and one token's top-k of one layer."""
    from extractor.store import ExpertStore

    store = ExpertStore.open(store_path)
    one_layer = store.top_k * expert_bytes(store, store.dtype)
    return {"100%": {"cache_fraction": 1.0}, "50%": {"cache_fraction": 0.5}, "one-layer": {"cache_bytes": one_layer}}


def two_budgets(store_path) -> dict[str, dict]:
    """The budgets the families issue names: every expert and one token's top-k of one layer."""
    every = budgets(store_path)
    return {"100%": every["100%"], "one-layer": every["one-layer"]}


def assert_parity(checkpoint, store, budgets_of, new_tokens: int, label: str, check=None) -> None:
    """check(runtime), if given, runs on each budget's runtime before it is closed."""
    reference = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    ids = prompt_ids()
    with torch.no_grad():
        expected_logits = reference(prompt_ids(batch=2)).logits
    expected = transformers_greedy(checkpoint, ids, new_tokens, reference)
    for name, budget in budgets_of(store).items():
        runtime = Runtime.from_store(store, RuntimeConfig(**budget))
        with torch.no_grad():
            logits = runtime.model(prompt_ids(batch=2)).logits
        tokens = runtime.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        assert torch.equal(tokens, expected), f"{label} @ {name}: tokens differ"
        torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=0, msg=f"{label} @ {name}")
        stats = runtime.cache.stats()
        assert stats.bytes <= stats.capacity_bytes
        if check is not None:
            check(runtime)
        runtime.close()
