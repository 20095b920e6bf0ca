"""The decode path: static cache + host-side lengths give the full forward's logits and greedy tokens, per family."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from chatforge.generation import decode
from chatforge.model.gpt import KVCache
from conftest import FAMILIES, random_family_model

pytestmark = pytest.mark.usefixtures("one_thread")


def prompts(lengths, vocab=97, seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def decode_greedy(model, prompt_list, slots, n_new, chunk=512, cache_slots=4):
    """Greedy tokens and per-step logits through decode.prefill/step, every row in its own slot."""
    cache = KVCache(model.config, cache_slots, model.config.max_seq_len)
    seqs = [list(p) for p in prompt_list]
    logits = [[] for _ in prompt_list]
    with torch.inference_mode():
        for i, (p, slot) in enumerate(zip(prompt_list, slots)):
            row = decode.prefill(model, cache, slot, p, chunk=chunk)
            logits[i].append(row)
            seqs[i].append(int(row.argmax()))
        for _ in range(n_new - 1):
            rows = decode.step(model, cache, slots, [s[-1] for s in seqs], [len(s) - 1 for s in seqs])
            for i, row in enumerate(rows):
                logits[i].append(row)
                seqs[i].append(int(row.argmax()))
    return seqs, logits


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("slots,lengths,chunk", [([0], [13], 512), ([2, 0, 1], [5, 21, 11], 4)],
                         ids=["batch1", "batch3-ragged-chunked"])
def test_decode_path_matches_full_forward(family, slots, lengths, chunk):
    """Logits within 1e-5 (fp32) of the full forward over prompt + generated, and the same greedy tokens."""
    model = random_family_model(FAMILIES[family])
    seqs, logits = decode_greedy(model, prompts(lengths), slots, n_new=16, chunk=chunk)
    with torch.no_grad():
        for seq, n, rows in zip(seqs, lengths, logits):
            full = model(torch.tensor([seq[:-1]]))[0, n - 1:]  # the logits that chose each generated token
            assert (torch.stack(rows) - full).abs().max().item() <= 1e-5
            assert seq[n:] == full.argmax(-1).tolist()


def test_sliding_window_cache_keeps_only_its_window():
    config = random_family_model(FAMILIES["mistral-window"]).config
    cache = KVCache(config, batch_size=2, max_len=64)
    assert cache.k.shape == (config.n_layer, 2, config.n_kv_head, config.sliding_window, config.head_dim)
    full = KVCache(random_family_model(FAMILIES["llama-gqa"]).config, batch_size=2, max_len=64)
    assert full.k.shape[3] == 64


def test_a_sequence_past_the_cache_is_one_line_error():
    model = random_family_model(FAMILIES["llama-gqa"])
    cache = KVCache(model.config, 1, 8)
    with torch.inference_mode(), pytest.raises(Exception, match=r"^generation: sequence exceeds the KV cache "
                                                                r"length 8$"):
        decode.prefill(model, cache, 0, list(range(9)))


class _NoDeviceReads(TorchDispatchMode):
    """Fails on any op that copies a tensor value to the host (int(t), t.item(), bool(t))."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        assert func is not torch.ops.aten._local_scalar_dense.default, "a decode step read a value from the device"
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", ["llama-gqa", "mistral-window", "gpt2"])
def test_decode_step_never_reads_a_value_from_the_device(family):
    model = random_family_model(FAMILIES[family])
    cache = KVCache(model.config, 2, 64)
    with torch.inference_mode():
        for slot, p in enumerate(prompts([12, 20])):
            decode.prefill(model, cache, slot, p)
        with _NoDeviceReads():
            decode.step(model, cache, [1, 0], [3, 4], [20, 12])


@pytest.mark.slow
def test_compiled_decode_gives_the_eager_greedy_tokens(tmp_path, monkeypatch):
    """The compiled step (inductor, frozen, dynamic shapes) and the eager fallback agree token for token."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    model = random_family_model(FAMILIES["llama-gqa"])
    batch = prompts([7, 15])
    eager, eager_logits = decode_greedy(model, batch, [0, 1], n_new=10)
    decode.compile_decode(model)
    try:
        assert decode.is_compiled(model)
        compiled, compiled_logits = decode_greedy(model, batch, [0, 1], n_new=10)
    finally:
        decode.uncompile(model)
    assert compiled == eager
    assert max((torch.stack(a) - torch.stack(b)).abs().max().item()
               for a, b in zip(eager_logits, compiled_logits)) <= 1e-4
    assert any((tmp_path / "inductor").iterdir())  # artefacts cached on disk for the next start
