"""`chatforge report`: the Markdown and self-contained HTML pages of a (synthetic) run folder."""

import base64
import json
import re

import torch

from chatforge.cli import main
from chatforge.config import TrainConfig

EVIL = "<script>alert('x')</script> & \"quotes\""


def make_run(folder, name="run", bpb=1.2345):
    folder.mkdir(parents=True)
    TrainConfig(data="builtin", out_dir=str(folder)).save(folder / "config.yaml")
    rows = [{"step": s, "loss": 5.0 - s / 10, "tokens": 4096 * s, "lr": 1e-3} for s in range(1, 11)]
    rows[4] |= {"val_loss": 4.6, "val_bpb": 1.5, "val_acc": 0.2}
    rows[9] |= {"val_loss": 4.1, "val_bpb": bpb, "val_acc": 0.3}
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "summary.json").write_text(json.dumps({"stage": "sft", "steps": 10, "tokens": 40960, "params": 12345,
                                                     "val_loss": 4.1, "val_bpb": bpb, "stop_reason": "budget"}))
    (folder / "data_report.json").write_text(json.dumps({
        "read": 100, "kept": 90, "dropped": {"duplicate": 9, "invalid": 1},
        "sources": {"chats.jsonl": {"format": "jsonl", "read": 100, "kept": 90, "dropped": {"duplicate": 9}}},
        "invalid_examples": [f"chats.jsonl:7: {EVIL}"]}))
    return folder


def eval_result(model="final"):
    return {"model": model, "data": "builtin", "split": "val", "seed": 0, "params": 12345, "records": 20,
            "loss": {"loss": 2.0, "ppl": 7.389, "bpb": 1.2345, "acc": 0.4, "tokens": 500, "bytes": 1800},
            "generation": {"bleu": 12.5, "chrf": 30.25, "rouge_l": 20.0, "distinct_1": 0.5, "distinct_2": 0.75,
                           "mean_reply_tokens": 9.5, "mean_reference_tokens": 10.0, "eot_rate": 0.9, "replies": 20},
            "examples": [{"messages": [{"role": "user", "content": "hi"}], "reference": "hello", "reply": "hey"}]}


def test_report_writes_markdown_and_self_contained_html(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    (run / "eval.json").write_text(json.dumps(eval_result()))
    (run / "samples.json").write_text(json.dumps([{"prompt": "Who are you?", "reply": EVIL},
                                                  {"messages": [{"role": "user", "content": "2+2?"}], "reply": "4"}]))
    assert main(["report", str(run)]) == 0
    assert "report.html" in capsys.readouterr().out
    md = (run / "report.md").read_text()
    page = (run / "report.html").read_text()
    # config, data report, loss curve, evaluation table, dialogs, hardware and versions
    assert "stage: sft" in md and "| dropped.duplicate | 9 |" in md
    assert "| chats.jsonl | jsonl | 100 | 90 | duplicate: 9 |" in md
    assert "![training and validation loss of run](loss.png)" in md and (run / "loss.png").exists()
    assert "| 10 | 40,960 | 4.0000 | 4.1000 | 1.2345 | 0.300 |" in md  # the validation table
    assert "| bits per byte | 1.2345 |" in md and "| BLEU | 12.50 |" in md and "| end-of-turn rate | 0.900 |" in md
    assert "> **user**: Who are you?" in md and "> **user**: 2+2?" in md
    assert f"| torch | {torch.__version__} |" in md
    # the page is self-contained and every piece of text is escaped
    assert "<script>alert" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp;" in page
    assert not re.search(r"src=['\"](?!data:)", page)
    png = re.search(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page).group(1)
    assert base64.b64decode(png)[:4] == b"\x89PNG"
    assert "<td>bits per byte</td><td>1.2345</td>" in page


def test_report_of_a_quickstart_folder_has_one_section_per_stage(tmp_path):
    root = tmp_path / "quickstart"
    make_run(root / "pretrain", bpb=2.0)
    make_run(root / "sft", bpb=1.5)
    (root / "quickstart.json").write_text(json.dumps({"test_bpb_replies_final": 1.61, "params": 12345,
                                                      "samples": {"Hello": "Hi there!"}}))
    (root / "final").mkdir()
    (root / "final" / "eval.json").write_text(json.dumps({"results": [eval_result("final"), eval_result("other")]}))
    assert main(["report", str(root)]) == 0
    md = (root / "report.md").read_text()
    assert md.index("## Stage: pretrain") < md.index("## Stage: sft") < md.index("## Evaluation")
    assert "| test_bpb_replies_final | 1.61 |" in md
    assert "| metric | final | other |" in md
    assert "> **user**: Hello" in md and "Hi there!" in md


def test_report_errors(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_report_run_eval_evaluates_the_final_model(tmp_path):
    from chatforge.weights.folder import save_model
    from chatforge.model.gpt import GPT, ModelConfig
    from chatforge.tokenizer import train_tokenizer

    data = tmp_path / "chats.jsonl"
    pairs = [("hi", "hello there"), ("how are you", "fine thanks"), ("bye", "see you"), ("name?", "chatforge")]
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n" for q, a in pairs))
    run = make_run(tmp_path / "run")
    TrainConfig(data=str(data), val_fraction=0.5, out_dir=str(run)).save(run / "config.yaml")
    tok = train_tokenizer([t for p in pairs for t in p], vocab_size=280, min_frequency=1)
    save_model(GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=16, max_seq_len=64)), tok,
               run / "final")
    assert main(["report", str(run), "--run-eval", "--max-samples", "2"]) == 0
    result = json.loads((run / "eval.json").read_text())
    assert result["data"] == str(data) and result["records"] == 2 and result["split"] == "val"
    assert f"| bits per byte | {result['loss']['bpb']:.4f} |" in (run / "report.md").read_text()
