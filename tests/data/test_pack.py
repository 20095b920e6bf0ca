"""Packing: records share a row without seeing each other, positions restart, nothing is cut silently."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from chatforge.data.pack import (BatchStream, encode_record, encode_records, iter_batches, make_batch, pack,
                                 token_byte_lengths)
from chatforge.model.gpt import GPT, ModelConfig
from chatforge.tokenizer import IM_END, train_tokenizer

TEXTS = [
    "Hello there! How are you today?", "I am fine, thank you for asking.", "What is your favourite colour?",
    "Blue, like the sky on a clear day.", "Can you count to five?", "One, two, three, four, five.",
    "你好，今天天气怎么样？", "天气很好，我们去公园吧。", "Tell me a joke.", "Why did the chicken cross the road?",
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS * 3, vocab_size=320)


def conv(*turns: str) -> dict:
    return {"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]}


def trained_spans(ids, mask) -> list[list[int]]:
    """Runs of consecutive trained tokens."""
    spans, cur = [], []
    for tid, on in zip(ids, mask):
        if on:
            cur.append(int(tid))
        elif cur:
            spans.append(cur)
            cur = []
    return spans + ([cur] if cur else [])


CONVS = [conv(TEXTS[i], TEXTS[i + 1]) for i in range(0, 10, 2)]


def tiny_model(vocab: int, positions: str = "rope") -> GPT:
    torch.manual_seed(0)
    extra = dict(family="gpt2", norm="layernorm", mlp="gelu", activation="gelu_tanh", attn_bias=True,
                 attn_out_bias=True, mlp_bias=True) if positions == "learned" else {}
    return GPT(ModelConfig(vocab_size=vocab, n_layer=2, n_head=2, d_model=32, max_seq_len=256,
                           positions=positions, **extra)).eval()


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_packed_conversations_train_exactly_as_alone(tok, positions):
    """The loss of each conversation inside a packed row equals its loss when run alone."""
    model = tiny_model(tok.vocab_size, positions)
    total = sum(len(tok.render(c["messages"])[0]) for c in CONVS)
    enc = encode_records(CONVS, tok, "assistant", row_len=total + 3, split_long=False)
    rows = pack(enc, seq_len=total + 2, pad_id=tok.pad_id)
    assert len(rows) == 1 and rows.doc.max() == len(CONVS) - 1  # all five share one row
    batch = make_batch(rows, np.arange(1))
    with torch.no_grad():
        logits = model(batch.input_ids, position_ids=batch.position_ids, doc_ids=batch.doc_ids)
        per_token = F.cross_entropy(logits[0], batch.targets[0], reduction="none")
        doc_of_target = torch.from_numpy(rows.doc[0, 1:].astype(np.int64))
        for d, c in enumerate(CONVS):
            ids, mask = tok.render(c["messages"])
            alone = model(torch.tensor([ids]))
            ce_alone = F.cross_entropy(alone[0, :-1], torch.tensor(ids[1:]), reduction="none")
            want = ce_alone[torch.tensor(mask[1:], dtype=torch.bool)].sum()
            got = per_token[batch.loss_mask[0] & (doc_of_target == d)].sum()
            assert abs(float(got) - float(want)) < 1e-4, (d, float(got), float(want))
            # and the logits themselves, position by position
            sel = batch.doc_ids[0] == d
            torch.testing.assert_close(logits[0][sel], alone[0][: int(sel.sum())], atol=1e-5, rtol=1e-5)


def test_rows_of_one_record_train_causally_with_the_same_loss(tok):
    """A batch whose rows each hold one record (padding after it) is marked unpacked, and its training loss through
    plain causal attention (token_loss passes no doc ids) equals the doc-masked loss."""
    from chatforge.train.loss import token_loss

    model = tiny_model(tok.vocab_size)
    longest = max(len(tok.render(c["messages"])[0]) for c in CONVS)
    enc = encode_records(CONVS, tok, "assistant", row_len=longest + 1, split_long=False)
    rows = pack(enc, seq_len=longest, pad_id=tok.pad_id)
    assert len(rows) == len(CONVS) and (rows.doc < 0).any()  # one record a row, most rows padded
    batch = make_batch(rows, np.arange(len(rows)))
    assert not batch.packed and make_batch(pack(enc, seq_len=4 * longest, pad_id=tok.pad_id), np.arange(1)).packed
    off = torch.autocast("cpu", enabled=False)
    causal, _, _ = token_loss(model, batch, off)
    masked = F.cross_entropy(model(batch.input_ids, position_ids=batch.position_ids, doc_ids=batch.doc_ids)
                             [batch.loss_mask], batch.targets[batch.loss_mask], reduction="sum")
    assert abs(float(causal.detach()) - float(masked.detach())) <= 1e-4 * float(masked.detach())


def test_positions_restart_and_boundaries_are_not_targets(tok):
    total = sum(len(tok.render(c["messages"])[0]) for c in CONVS)
    enc = encode_records(CONVS, tok, "all", row_len=total + 5, split_long=True)
    rows = pack(enc, seq_len=total + 4, pad_id=tok.pad_id)
    assert len(rows) == 1
    batch = make_batch(rows, np.arange(len(rows)))
    lengths = [len(tok.render(c["messages"])[0]) for c in CONVS]
    pos, doc = rows.pos[0], rows.doc[0]
    starts = np.flatnonzero(np.diff(doc, prepend=-2) != 0)
    real = [s for s in starts if doc[s] >= 0]
    assert [int(pos[s]) for s in real] == [0] * len(CONVS)
    assert np.all(pos[real[1]: real[1] + lengths[1]] == np.arange(lengths[1]))
    # pretraining trains every token except each conversation's first, which has no context
    assert int(batch.loss_mask.sum()) == sum(lengths) - len(CONVS)
    for s in real[1:]:
        assert not batch.loss_mask[0, s - 1]  # the target at s is the first token of a new conversation
    pad = doc[1:] < 0
    assert not batch.loss_mask[0][torch.from_numpy(pad)].any()
    assert np.all(rows.tokens[0][doc < 0] == tok.pad_id)


def test_truncation_is_counted_and_splitting_keeps_every_target(tok):
    long = conv("Hi", " ".join(TEXTS * 2))
    ids, _ = tok.render(long["messages"])
    row_len = len(tok.render(CONVS[0]["messages"])[0]) + 2
    assert len(ids) > 2 * row_len
    enc = encode_records([long, CONVS[0]], tok, "assistant", row_len=row_len, split_long=False)
    assert enc.stats["truncated"] == 1 and enc.stats["truncated_tokens"] == len(ids) - row_len
    assert enc.stats["records"] == 2 and len(enc.ids) == 2 and len(enc.ids[0]) == row_len
    # a user turn that fills the row leaves no assistant token: dropped, and counted
    only_user = encode_records([conv(" ".join(TEXTS * 3), "ok")], tok, "assistant", row_len=row_len,
                               split_long=False)
    assert only_user.stats["dropped_no_trained_tokens"] == 1 and not only_user.ids
    # pretraining splits instead: pieces overlap by one token so each token after the first is a target once
    enc = encode_records([long], tok, "all", row_len=row_len, split_long=True)
    assert enc.stats["split"] == 1 and enc.stats["truncated"] == 0
    targets = [t for piece, m in zip(enc.ids, enc.masks) for t, on in zip(piece, m) if on]
    assert targets == ids[1:]
    assert sum(len(p) for p in enc.ids) == len(ids) + len(enc.ids) - 1


def test_sft_mask_on_a_multi_turn_conversation(tok):
    """After packing, exactly each assistant reply and its closing <|im_end|> carry the loss."""
    c = conv("Hello there!", "Hi! How can I help?", "Tell me a joke.", "Why did the chicken cross the road?",
             "你好", "你好，今天天气很好。")
    c["messages"].insert(0, {"role": "system", "content": "You are kind."})
    enc = encode_records([CONVS[0], c], tok, "assistant", row_len=200, split_long=False)
    rows = pack(enc, seq_len=199, pad_id=tok.pad_id)
    batch = make_batch(rows, np.arange(1))
    got = [tok.decode(s) for s in trained_spans(batch.targets[0].tolist(), batch.loss_mask[0].tolist())]
    replies = [x["content"] for r in (CONVS[0], c) for x in r["messages"] if x["role"] == "assistant"]
    assert got == [r + IM_END for r in replies]
    # exact positions: the first trained target is the first token after "<|im_start|>assistant\n"
    ids, mask = tok.render(c["messages"])
    head, _ = tok.render(c["messages"][:2], add_generation_prompt=True)
    assert mask.index(1) == len(head)


def test_content_target_covers_every_turn(tok):
    c = conv("Hello there!", "Hi! How can I help?", "你好", "你好，今天天气很好。")
    ids, mask = encode_record(c, tok, "content")
    assert [tok.decode(s) for s in trained_spans(ids, mask)] == [m["content"] + IM_END for m in c["messages"]]


def test_content_mask_in_one_render_equals_probing_every_prefix(tok):
    """Tokenizer.render_content (one render) gives the mask the per-message probes give, with a system prompt, tool
    turns, Chinese and a long dialog; a trimming template falls back to the probes."""
    from chatforge.data.pack import _content_mask
    from chatforge.tokenizer import Tokenizer

    long = conv(*[f"turn {i} 你好" for i in range(80)])
    system = conv("Hello there!", "Hi! How can I help?")
    system["messages"].insert(0, {"role": "system", "content": "You are kind."})
    tools = {"messages": [{"role": "user", "content": "time?"},
                          {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "now", "arguments": "{}"}}]},
                          {"role": "tool", "content": "12:00"}, {"role": "assistant", "content": "Noon."}]}
    for c in (long, system, conv("  spaced  ", " x ")):
        ids, _ = tok.render(c["messages"])
        assert tok.render_content(c["messages"]) == (ids, _content_mask(tok, c["messages"], ids))
    # tool turns: every rendered message's text (the probes, which render without the tool rewrite, got this wrong)
    ids, _ = tok.render(tools["messages"])
    content_ids, mask = tok.render_content(tools["messages"])
    assert content_ids == ids and [tok.decode(s) for s in trained_spans(ids, mask)] == [
        "time?" + IM_END, '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>' + IM_END,
        "<tool_response>\n12:00\n</tool_response>" + IM_END, "Noon." + IM_END]
    trimming = Tokenizer(tok.hf, tok.chat_template.replace("message['content']", "message['content'] | trim"))
    assert trimming.chat_template != tok.chat_template
    assert trimming.render_content(conv("  spaced  ", " x ")["messages"]) is None  # the probes decide


def test_bytes_per_token_add_up(tok):
    table = token_byte_lengths(tok)
    for text in TEXTS + ["emoji 🎉 and 中文 mixed", "unseen 字符 ÿ"]:
        ids = tok.encode(text)
        assert int(table[ids].sum()) == len(text.encode("utf-8"))
    assert table[tok.eos_id] == 0 and table[tok.pad_id] == 0


def test_stream_position_is_a_complete_resume_point(tok):
    enc = encode_records(CONVS * 4, tok, "assistant", row_len=41, split_long=False)
    a = BatchStream(enc, seq_len=40, batch_size=3, pad_id=tok.pad_id, seed=7)
    for _ in range(a.rows_per_epoch() // 3 + 1):  # crosses an epoch boundary inside a batch
        a.next()
    assert a.epoch == 1
    b = BatchStream(enc, seq_len=40, batch_size=3, pad_id=tok.pad_id, seed=7)
    b.load_state(a.state())
    for _ in range(4):
        x, y = a.next(), b.next()
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.loss_mask, y.loss_mask)
    # every row of an epoch is used once before the next epoch starts
    c = BatchStream(enc, seq_len=40, batch_size=1, pad_id=tok.pad_id, seed=7)
    n = c.rows_per_epoch()
    seen = [c.next().input_ids for _ in range(n)]
    assert c.epoch == 1 and c.row == 0
    rows = pack(enc, 40, tok.pad_id, np.random.default_rng([7, 0]).permutation(len(enc.ids)))
    assert all(torch.equal(s[0], torch.from_numpy(rows.tokens[i, :-1].astype(np.int64))) for i, s in enumerate(seen))


def test_evaluation_batches_cover_every_row_once(tok):
    enc = encode_records(CONVS * 3, tok, "assistant", row_len=41, split_long=False)
    rows = pack(enc, 40, tok.pad_id)
    batches = list(iter_batches(rows, 4))
    assert sum(b.input_ids.shape[0] for b in batches) == len(rows)
    assert sum(b.n_trained for b in batches) == sum(int(m[1:].sum()) for m in enc.masks)
