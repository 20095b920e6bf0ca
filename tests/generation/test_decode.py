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
    seqs = [list(p) for p in prompt_list]
    logits = [[] for _ in prompt_list]
    with torch.inference_mode():  # the cache too, as the engine makes it
        cache = KVCache(model.config, cache_slots, model.config.max_seq_len)
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


def test_kv_bucket_rounds_up_within_the_cache():
    """The compiled step's read span: a multiple of the bucket, capped by the cache and max_seq_len, never short."""
    llama = random_family_model(FAMILIES["llama-gqa"]).config  # max_seq_len 64
    cache = KVCache(llama, 1, 64)
    assert [decode.kv_bucket(n, cache, llama, 16) for n in (1, 16, 17, 40, 60, 64)] == [16, 16, 32, 48, 64, 64]
    assert decode.kv_bucket(65, cache, llama, 16) == 65  # past the cache: the forward raises, as eager does
    assert decode.kv_bucket(20, KVCache(llama, 1, 40), llama, 16) == 32
    assert decode.kv_bucket(33, KVCache(llama, 1, 40), llama, 16) == 40
    window = random_family_model(FAMILIES["mistral-window"]).config  # a ring of 8 slots
    ring = KVCache(window, 1, 64)
    assert [decode.kv_bucket(n, ring, window, 4) for n in (3, 5, 9, 50)] == [4, 8, 8, 8]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_step_reading_whole_buckets_gives_the_exact_tokens(family):
    """The bucketed read of a compiled step, run eagerly (the model stands in for its compiled forward): slots past
    each row's position are masked, so logits match the exact read and the greedy tokens are the same, across
    several bucket boundaries, a ring and rows other than 0..B-1."""
    model = random_family_model(FAMILIES[family])
    batch = prompts([5, 13, 9])
    exact, exact_logits = decode_greedy(model, batch, [2, 0, 1], n_new=20)
    setattr(model, decode.COMPILED, model)
    setattr(model, decode.BUCKET, 8)
    try:
        bucketed, bucketed_logits = decode_greedy(model, batch, [2, 0, 1], n_new=20)
    finally:
        decode.uncompile(model)
    assert not decode.is_compiled(model)
    assert bucketed == exact
    assert max((torch.stack(a) - torch.stack(b)).abs().max().item()
               for a, b in zip(exact_logits, bucketed_logits)) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("quantize", [None, "int4-wo"])
def test_compiled_decode_gives_the_eager_greedy_tokens(tmp_path, monkeypatch, quantize):
    """The compiled step (inductor, frozen, static shapes per kv bucket) and the eager fallback agree token for
    token across bucket boundaries, and after warmup() the run compiles nothing more; int4 weights too (CPU: torch's
    int4 kernel, which inductor calls as it is; widths in whole blocks of 64, so q, k, v and gate, up are joined)."""
    import torch._dynamo.config as dynamo_config

    from chatforge.model.quantize import quantize as quantize_weights

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    model = random_family_model(dict(FAMILIES["llama-gqa"], d_model=128, d_ff=384))
    if quantize:
        quantize_weights(model, quantize)
        assert model.model.layers[0].self_attn.qkv is not None and model.model.layers[0].mlp.gate_up is not None
    batch = prompts([7, 15])
    eager, eager_logits = decode_greedy(model, batch, [0, 1], n_new=12, cache_slots=2)  # kv_len 8..26
    decode.compile_decode(model, bucket=8)
    try:
        assert decode.is_compiled(model)
        decode.warmup(model, batch_sizes=(2,), rows=2, max_len=model.config.max_seq_len, reach=27)
        # config.patch, not monkeypatch: undoing a monkeypatch deletes the option from dynamo's config module
        with dynamo_config.patch(error_on_recompile=True):
            compiled, compiled_logits = decode_greedy(model, batch, [0, 1], n_new=12, cache_slots=2)
    finally:
        decode.uncompile(model)
    assert compiled == eager
    assert max((torch.stack(a) - torch.stack(b)).abs().max().item()
               for a, b in zip(eager_logits, compiled_logits)) <= 1e-4
    assert any((tmp_path / "inductor").iterdir())  # artefacts cached on disk for the next start


@pytest.mark.slow
def test_two_compiled_models_in_one_process_each_decode_their_own_weights(tmp_path, monkeypatch):
    """The compiled step checks few guards on the model's insides (decode._identity_guards), but which parameter
    objects it holds is one of them: a second model of the same shape, compiled after the first, must not run the
    first's frozen graph (it did, with nn-module guards skipped altogether)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    models = [random_family_model(FAMILIES["llama-gqa"], seed=s) for s in (0, 1)]
    batch = prompts([9])
    eager = [decode_greedy(m, batch, [0], n_new=6, cache_slots=1)[1] for m in models]
    try:
        for m in models:
            decode.compile_decode(m, bucket=8)
        compiled = [decode_greedy(m, batch, [0], n_new=6, cache_slots=1)[1] for m in models]
    finally:
        for m in models:
            decode.uncompile(m)
    assert (torch.stack(eager[0][0]) - torch.stack(eager[1][0])).abs().max().item() > 0.1  # they differ
    for want, got in zip(eager, compiled):
        assert (torch.stack(want[0]) - torch.stack(got[0])).abs().max().item() <= 1e-4


def test_compiling_int8_dyn_is_refused_where_int_mm_gets_one_row_wrong(monkeypatch):
    """Where torch._int_mm returns wrong sums for a one-token row with stride 0 (the layout inductor gives it:
    pytorch/pytorch#195066), a compiled int8-dyn step would decode garbage: compile_decode says so in one line and
    leaves the model eager; where the probe passes, it compiles."""
    pytest.importorskip("torchao")
    from chatforge.errors import ChatforgeError
    from chatforge.model.quantize import quantize

    model = quantize(random_family_model(dict(FAMILIES["llama-gqa"], d_model=128)), "int8-dyn")
    monkeypatch.setattr(decode, "int_mm_takes_one_row", lambda: False)
    with pytest.raises(ChatforgeError, match=r"int8-dyn decodes garbage .*pytorch/pytorch#195066\); use int4-wo"):
        decode.compile_decode(model)
    assert not decode.is_compiled(model)
    monkeypatch.setattr(decode, "int_mm_takes_one_row", lambda: True)
    decode.compile_decode(model)
    assert decode.is_compiled(model)
    decode.uncompile(model)
