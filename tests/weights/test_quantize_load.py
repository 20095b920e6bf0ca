"""--quantize through the one loader: the scheme is recorded, greedy tokens hold, an unknown scheme is one line."""

from __future__ import annotations

import pytest
import torch

from chatforge.cli import main
from chatforge.errors import ChatforgeError

PROMPT = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from chatforge.model.gpt import GPT, ModelConfig
    from chatforge.tokenizer import train_tokenizer
    from chatforge.weights.folder import save_model

    tok = train_tokenizer(["hello there, how are you today?", "the weather is nice"] * 5, vocab_size=300,
                          min_frequency=1)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, d_model=64, max_seq_len=128))
    path = tmp_path_factory.mktemp("q") / "m"
    save_model(model.eval(), tok, path, generation_config={"do_sample": False})
    return str(path)


def test_int8_weight_only_keeps_the_greedy_tokens(folder):
    import chatforge
    from chatforge.weights.loader import load

    assert load(folder, quantize="int8-wo").quantization == "int8-wo" and load(folder).quantization is None
    plain, quant = chatforge.load(folder), chatforge.load(folder, quantize="int8-wo")
    assert quant.quantization == "int8-wo" and plain.quantization is None
    ids, params = plain.request(PROMPT, max_new_tokens=16)
    want = plain.engine.generate_batch([ids], params)[0].token_ids
    got = quant.engine.generate_batch([ids], params)[0].token_ids
    assert len(want) == 16 and got == want  # int8 per-channel rounding stays far below this model's top-1 margins
    with torch.inference_mode():
        a, b = plain.model(torch.tensor([ids])), quant.model(torch.tensor([ids]))
    assert not torch.equal(a, b) and torch.allclose(a, b, atol=0.05)  # quantized for real, and close


def test_unknown_scheme_is_one_line_before_loading(folder, capsys):
    from chatforge.weights.loader import load

    with pytest.raises(ChatforgeError, match=r"^quantize: unknown scheme 'int3' \(use int8-dyn, int8-wo, int4-wo\)$"):
        load(folder + "-does-not-exist", quantize="int3")
    assert main(["generate", folder, "--prompt", "hi", "--quantize", "int3"]) == 2
    assert "quantize: unknown scheme 'int3'" in capsys.readouterr().err


def test_int8_dynamic_without_compile_says_it_is_slow(folder, capsys):
    from chatforge.cli import main

    assert main(["generate", folder, "--prompt", "hello", "--quantize", "int8-dyn", "--max-new-tokens", "2"]) == 0
    assert "note: int8-dyn pays only compiled" in capsys.readouterr().err
    assert main(["generate", folder, "--prompt", "hello", "--quantize", "int8-wo", "--max-new-tokens", "2"]) == 0
    assert "int8-dyn" not in capsys.readouterr().err


@pytest.mark.parametrize("method", ["int8-wo", "int4-wo"])
@pytest.mark.parametrize("family", ["gpt2", "llama-gqa", "qwen2-bias"])
def test_quantizing_while_loading_is_quantizing_after(tmp_path, family, method):
    """On CPU, load(quantize=) quantizes each Linear as its weights are read (the float model is never resident):
    it must give the very model quantize() makes of the loaded float one, for tied heads (gpt2, qwen2), an untied
    one (llama) and GPT-2's fused, transposed q/k/v."""
    from chatforge.model.cpu_linear import Int8Embedding
    from chatforge.model.quantize import quantize
    from chatforge.weights.folder import save_model
    from chatforge.weights.loader import load
    from conftest import FAMILIES, make_tokenizer, random_family_model

    tok = make_tokenizer()
    kw = dict(FAMILIES[family], vocab_size=tok.vocab_size)
    save_model(random_family_model(kw), tok, tmp_path / "m")
    streamed = load(str(tmp_path / "m"), quantize=method)
    after = quantize(load(str(tmp_path / "m")).model, method)
    assert streamed.quantization == method == streamed.model.quantization
    assert isinstance(streamed.model.model.embed_tokens, Int8Embedding) == kw.get("tie_embeddings", True)
    want, got = dict(after.named_buffers()) | dict(after.named_parameters()), \
        dict(streamed.model.named_buffers()) | dict(streamed.model.named_parameters())
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert not any(t.is_meta for t in got.values())
    ids = torch.tensor([tok.encode("hello there, how are you?")])
    with torch.inference_mode():
        assert torch.equal(streamed.model(ids), after(ids))


def test_quantizing_while_loading_never_holds_the_float_model(tmp_path, monkeypatch):
    """Each Linear is quantized before the next tensor is read once its weights are in: the tied head right after
    the embedding (read first), every other layer as its last weight arrives, so the float weights never pile up."""
    import chatforge.model.cpu_linear as cpu_linear
    import chatforge.weights.folder as folder
    from chatforge.weights.folder import save_model
    from chatforge.weights.loader import load
    from conftest import FAMILIES, make_tokenizer, random_family_model

    tok = make_tokenizer()
    save_model(random_family_model(dict(FAMILIES["qwen2-bias"], vocab_size=tok.vocab_size)), tok, tmp_path / "m")
    events, read, quantized = [], folder.iter_weights, cpu_linear.quantized

    def reading(*args, **kw):
        for name, tensor in read(*args, **kw):
            events.append(("read", name))
            yield name, tensor

    def quantizing(linear, *args):
        events.append(("quantized", tuple(linear.weight.shape)))
        return quantized(linear, *args)

    monkeypatch.setattr(folder, "iter_weights", reading)
    monkeypatch.setattr(cpu_linear, "quantized", quantizing)
    load(str(tmp_path / "m"), quantize="int8-wo")
    assert events[:2] == [("read", "model.embed_tokens.weight"), ("quantized", (tok.vocab_size, 64))]
    reads = [e[1] for e in events if e[0] == "read"]
    linears = {n.rsplit(".", 1)[0] for n in reads if n.endswith("_proj.weight")}
    assert sum(e[0] == "quantized" for e in events) == len(linears) + 1  # and the head
    for i, (kind, name) in enumerate(events):  # a Linear's last tensor is followed by its quantization
        owner = name.rsplit(".", 1)[0] if kind == "read" else None
        if owner in linears and not any(r.startswith(owner + ".") for r in reads[reads.index(name) + 1:]):
            assert events[i + 1][0] == "quantized", name


@pytest.mark.parametrize("quantize", [None, "int8-wo"])
def test_a_weight_of_another_shape_than_config_json_is_one_line(tmp_path, quantize):
    import json

    from chatforge.weights.folder import save_model
    from chatforge.weights.loader import load
    from conftest import FAMILIES, make_tokenizer, random_family_model

    tok = make_tokenizer()
    save_model(random_family_model(dict(FAMILIES["llama-gqa"], vocab_size=tok.vocab_size)), tok, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["intermediate_size"] = 100
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ChatforgeError, match=r"^.*/m: weight model\.layers\.0\.mlp\.\w+_proj\.weight has shape "
                                             r"\[(192, 64|64, 192)\] where config\.json gives \[(100, 64|64, 100)\]$"):
        load(str(tmp_path / "m"), quantize=quantize)
