"""`chatforge report RUN_DIR`: one page that says what was trained, on what, how it went and how good it is.

The page is built once as a list of blocks (headings, paragraphs, tables, code, images, dialogs) and rendered twice:
report.md (images referenced next to it) and report.html (self-contained: CSS inline, images as base64 data URIs,
every piece of text HTML-escaped, so a dataset's "<script>" shows as text).

It reads what a run leaves behind: config.yaml, data_report.json, metrics.jsonl, summary.json, eval.json (written by
`chatforge eval`, looked for in the run and in its final/ and best/ folders) and sample dialogs (samples.json: a list
of {"messages" or "prompt", "reply"}; or the "samples" of a quickstart.json). A quickstart folder, whose stages are
sub-runs (pretrain/, sft/), gets one section per stage.
"""

from __future__ import annotations

import base64
import html
import json
import os
import platform
import sys
import time
from pathlib import Path

from chatforge.errors import ChatforgeError
from chatforge.io import read_json

RUN_FILES = ("metrics.jsonl", "config.yaml", "summary.json")


# ---------------------------------------------------------------- blocks

def heading(text: str, level: int = 2) -> tuple:
    return ("h", level, text)


def para(text: str) -> tuple:
    return ("p", text)


def table(header: list[str], rows: list[list]) -> tuple:
    return ("table", header, [[str(c) for c in r] for r in rows])


def code(text: str, lang: str = "") -> tuple:
    return ("code", text, lang)


def image(path: Path, alt: str) -> tuple:
    return ("img", path, alt)


def dialog(messages: list[dict], reply: str, reference: str | None = None) -> tuple:
    return ("dialog", messages, reply, reference)


# ---------------------------------------------------------------- rendering

def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _fence(text: str) -> str:
    longest = max((len(run) for run in text.split("\n") if set(run) == {"`"}), default=0)
    return "`" * max(3, longest + 1)


def render_markdown(blocks: list[tuple], base: Path) -> str:
    out = []
    for b in blocks:
        kind = b[0]
        if kind == "h":
            out.append("#" * b[1] + " " + b[2].replace("\n", " "))
        elif kind == "p":
            out.append(b[1])
        elif kind == "table":
            out.append("| " + " | ".join(_md_cell(h) for h in b[1]) + " |")
            out.append("|" + "---|" * len(b[1]))
            out.extend("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b[2])
        elif kind == "code":
            fence = _fence(b[1])
            out.append(f"{fence}{b[2]}\n{b[1].rstrip()}\n{fence}")
        elif kind == "img":
            out.append(f"![{b[2]}]({os.path.relpath(b[1], base)})")
        elif kind == "dialog":
            lines = [f"> **{m['role']}**: {_quote(m['content'])}" for m in b[1]]
            lines.append(f"> **assistant (model)**: {_quote(b[2])}")
            if b[3] is not None:
                lines.append(f"> *reference*: {_quote(b[3])}")
            out.append("\n>\n".join(lines))
        out.append("")
    return "\n".join(out)


def _quote(text: str) -> str:
    return text.strip().replace("\n", "\n> ") or "*(empty)*"


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:960px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}table{border-collapse:collapse;margin:.5em 0 1.2em}td,th{border:1px solid #ccc;
padding:.25em .6em;text-align:left;vertical-align:top}th{background:#f3f3f3}pre{background:#f6f8fa;padding:.8em;
overflow:auto;font-size:.85em}img{max-width:100%}.dialog{border-left:3px solid #4c72b0;margin:.6em 0 1em;
padding:.2em .8em}.role{font-weight:600}.ref{color:#666;font-style:italic}.msg{white-space:pre-wrap}"""


def render_html(blocks: list[tuple], title: str) -> str:
    e = html.escape
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{CSS}</style>"
           "</head><body>"]
    for b in blocks:
        kind = b[0]
        if kind == "h":
            out.append(f"<h{b[1]}>{e(b[2])}</h{b[1]}>")
        elif kind == "p":
            out.append(f"<p>{e(b[1])}</p>")
        elif kind == "table":
            out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in b[1]) + "</tr>")
            out.extend("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in b[2])
            out.append("</table>")
        elif kind == "code":
            out.append(f"<pre><code>{e(b[1])}</code></pre>")
        elif kind == "img":
            data = base64.b64encode(Path(b[1]).read_bytes()).decode("ascii")
            out.append(f"<img alt='{e(b[2], quote=True)}' src='data:image/png;base64,{data}'>")
        elif kind == "dialog":
            parts = [f"<div class='msg'><span class='role'>{e(m['role'])}:</span> {e(m['content'])}</div>"
                     for m in b[1]]
            parts.append(f"<div class='msg'><span class='role'>assistant (model):</span> {e(b[2])}</div>")
            if b[3] is not None:
                parts.append(f"<div class='msg ref'>reference: {e(b[3])}</div>")
            out.append("<div class='dialog'>" + "".join(parts) + "</div>")
    out.append("</body></html>")
    return "\n".join(out)


# ---------------------------------------------------------------- reading a run

def is_run(folder: Path) -> bool:
    return any((folder / f).exists() for f in RUN_FILES)


def stages(run_dir: Path) -> list[Path]:
    """The run itself, or its sub-runs (a quickstart's pretrain/ and sft/), in a stable order."""
    if is_run(run_dir):
        return [run_dir]
    subs = sorted((p for p in run_dir.iterdir() if p.is_dir() and is_run(p)),
                  key=lambda p: ({"pretrain": 0, "sft": 1}.get(p.name, 2), p.name))
    return subs


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def _flat(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    rows = []
    for k, v in d.items():
        if isinstance(v, dict) and v and all(not isinstance(x, (dict, list)) for x in v.values()):
            rows.extend(_flat(v, f"{prefix}{k}."))
        elif not isinstance(v, (dict, list)):
            rows.append((f"{prefix}{k}", v))
    return rows


def run_blocks(run: Path, title: str) -> list[tuple]:
    """Summary, config, data report, loss curves and validation table of one training run."""
    from chatforge.train.run import plot_losses, read_metrics

    blocks = [heading(title)]
    if (run / "summary.json").exists():
        s = read_json(run / "summary.json")
        keys = ("stage", "steps", "tokens", "epochs", "params", "val_loss", "val_bpb", "val_acc", "best_step",
                "tokens_per_s", "wall_s", "stop_reason")
        blocks.append(table(["summary", "value"], [[k, _fmt(s[k])] for k in keys if s.get(k) is not None]))
    metrics = read_metrics(run / "metrics.jsonl")
    if metrics:
        png = run / "loss.png"
        if not png.exists() or png.stat().st_mtime < (run / "metrics.jsonl").stat().st_mtime:
            plot_losses(metrics, png, title=run.name)
        blocks += [heading("Loss curves", 3), image(png, f"training and validation loss of {run.name}")]
        val = [m for m in metrics if "val_loss" in m]
        if val:
            rows = [[m["step"], f"{m['tokens']:,}", f"{m['loss']:.4f}", f"{m['val_loss']:.4f}",
                     f"{m.get('val_bpb', float('nan')):.4f}", f"{m.get('val_acc', float('nan')):.3f}"]
                    for m in (val if len(val) <= 12 else val[:: max(1, len(val) // 12)] + [val[-1]])]
            blocks.append(table(["step", "tokens", "train loss", "val loss", "val bpb", "val acc"], rows))
    if (run / "config.yaml").exists():
        blocks += [heading("Config", 3), code((run / "config.yaml").read_text(encoding="utf-8"), "yaml")]
    if (run / "data_report.json").exists():
        blocks += [heading("Data report", 3)] + data_blocks(read_json(run / "data_report.json"))
    return blocks


def data_blocks(d: dict) -> list[tuple]:
    """Scalars as one table, each mapping of mappings (sources, encoding) as a table, the rest as JSON."""
    blocks = [table(["field", "value"], [[k, _fmt(v)] for k, v in _flat(d)])]
    leftover = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and all(isinstance(x, dict) for x in v.values()):
            cols = list(dict.fromkeys(c for x in v.values() for c in x))
            cell = lambda x: _fmt(x) if not isinstance(x, (dict, list)) else (  # noqa: E731
                ", ".join(f"{a}: {_fmt(b)}" for a, b in x.items()) if isinstance(x, dict) else json.dumps(x))
            blocks.append(table([k] + cols, [[name] + [cell(x.get(c, "")) for c in cols] for name, x in v.items()]))
        elif isinstance(v, list) or (isinstance(v, dict) and any(isinstance(x, (dict, list)) for x in v.values())):
            leftover[k] = v
    if leftover:
        text = json.dumps(leftover, indent=1, ensure_ascii=False)
        blocks.append(code(text if len(text) <= 4000 else text[:4000] + "\n... (truncated; see data_report.json)",
                           "json"))
    return blocks


def find_eval(run_dir: Path, runs: list[Path]) -> Path | None:
    for folder in [run_dir, run_dir / "final", run_dir / "best"] + [r / sub for r in reversed(runs)
                                                                      for sub in ("", "final", "best")]:
        if (folder / "eval.json").exists():
            return folder / "eval.json"
    return None


def audit_blocks(run_dir: Path) -> list[tuple]:
    """The memorisation audit (audit.json, written by `chatforge audit`): exposure per canary and per repetition
    count, extraction, and the privacy guarantee the model was trained under."""
    path = next((f / "audit.json" for f in (run_dir, run_dir / "final", run_dir / "best")
                 if (f / "audit.json").exists()), None)
    if path is None:
        return []
    a = read_json(path)
    blocks = [heading("Memorisation audit"),
              para(f"From {path}: exposure (log2|R| - log2 rank of the true secret; Carlini et al. 2019) of the "
                   f"canaries of {a.get('canaries_file')} in {a.get('model')}.")]
    if a.get("privacy"):
        blocks.append(para(f"Trained with differential privacy: epsilon {_fmt(a['privacy']['epsilon'])}, "
                           f"delta {_fmt(a['privacy']['delta'])}."))
    blocks.append(table(["repeats", "canaries", "mean exposure (bits)", "max exposure (bits)", "extracted"],
                        [[r, g["canaries"], f"{g['mean_exposure']:.2f}", f"{g['max_exposure']:.2f}", g["extracted"]]
                         for r, g in a.get("by_repeats", {}).items()]))
    blocks.append(table(["canary", "language", "repeats", "exposure", "of", "method", "rank", "extracted"],
                        [[c["id"], c["language"], c["repeats"], f"{c['exposure']:.2f}", f"{c['max_exposure']:.2f}",
                          c["method"], "-" if c.get("rank") is None else c["rank"], "yes" if c["extracted"] else "no"]
                         for c in a.get("canaries", [])]))
    v = a.get("verbatim")
    if v:
        rate = "n/a" if v["rate"] is None else f"{v['rate']:.1%}"
        blocks.append(para(f"Verbatim extraction ({v['prefix']} tokens given, the next {v['suffix']} greedy): "
                           f"{v['extracted']} of {v['sequences']} training sequences ({rate})."))
    return blocks


def find_samples(run_dir: Path) -> list[tuple]:
    """Sample dialogs as blocks, from samples.json, a quickstart.json next to or above the run, or eval.json."""
    for path in (run_dir / "samples.json", run_dir / "quickstart.json", run_dir.parent / "quickstart.json"):
        if not path.exists():
            continue
        data = read_json(path, (dict, list))
        data = data.get("samples", data) if isinstance(data, dict) and path.name == "quickstart.json" else data
        if isinstance(data, dict):  # {prompt: reply}
            return [dialog([{"role": "user", "content": str(p)}], str(r)) for p, r in data.items()]
        if isinstance(data, list):
            out = []
            for item in data:
                if not isinstance(item, dict) or "reply" not in item:
                    raise ChatforgeError(f"{path}: each sample needs a reply and messages or prompt")
                messages = item.get("messages") or [{"role": "user", "content": str(item.get("prompt", ""))}]
                out.append(dialog(messages, str(item["reply"]), item.get("reference")))
            return out
    return []


def hardware() -> list[list[str]]:
    """CPU, cores, memory, GPU and the versions that decide speed and numerics."""
    from importlib import metadata

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
        ram_text = f"{ram:.1f} GiB"
    except (ValueError, OSError, AttributeError):
        ram_text = "unknown"
    rows = [["CPU", cpu], ["cores", str(os.cpu_count())], ["memory", ram_text], ["OS", platform.platform()]]
    try:
        import torch

        gpu = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "none"
        rows += [["GPU", gpu], ["torch CPU capability", torch.backends.cpu.get_cpu_capability()],
                 ["torch threads (report process)", str(torch.get_num_threads())]]
    except ImportError:
        rows.append(["GPU", "unknown (torch not importable)"])
    rows.append(["python", sys.version.split()[0]])
    rows.append(["chatforge", metadata.version("chatforge")])
    for pkg in ("torch", "transformers", "tokenizers", "safetensors", "numpy", "optuna", "sacrebleu"):
        try:
            rows.append([pkg, metadata.version(pkg)])
        except metadata.PackageNotFoundError:
            rows.append([pkg, "not installed"])
    return rows


def build_report(run_dir: Path) -> list[tuple]:
    from chatforge.eval.evaluate import markdown_table

    runs = stages(run_dir)
    if not runs:
        raise ChatforgeError(f"{run_dir}: not a run folder (no {', '.join(RUN_FILES)}, and no sub-runs holding them)")
    blocks = [heading(f"chatforge report: {run_dir.resolve().name}", 1),
              para(f"Run folder {run_dir}; written {time.strftime('%Y-%m-%d %H:%M:%S')}.")]
    qs = next((p for p in (run_dir / "quickstart.json", run_dir.parent / "quickstart.json") if p.exists()), None)
    if qs is not None:
        q = read_json(qs)
        blocks += [heading("Quickstart results (held-out test set)"),
                   table(["quantity", "value"], [[k, _fmt(v)] for k, v in q.items() if not isinstance(v, (dict, list))])]
    for run in runs:
        name = "Training" if run == run_dir else f"Stage: {run.name}"
        blocks += run_blocks(run, name)
    ev = find_eval(run_dir, runs)
    first = None  # the first evaluation result: its figures, and its examples when no samples were saved
    blocks.append(heading("Evaluation"))
    if ev is not None:
        data = read_json(ev)
        results = data["results"] if "results" in data else [data]
        first = results[0]
        blocks.append(para(f"From {ev}: {first.get('records', '?')} conversations of the {first.get('split')} split "
                           f"of {first.get('data')} (seed {first.get('seed')}), greedy replies."))
        blocks.append(("raw_md_table", markdown_table(results)))
    else:
        blocks.append(para(f"No eval.json yet: run `chatforge eval {runs[-1] / 'final'}` (or `chatforge report "
                           f"{run_dir} --run-eval`)."))
    blocks += audit_blocks(run_dir)
    samples = find_samples(run_dir)
    if not samples and first is not None:
        samples = [dialog(x["messages"], x["reply"], x.get("reference")) for x in first.get("examples", [])]
    if samples:
        blocks += [heading("Sample dialogs")] + samples
    blocks += [heading("Hardware and versions"), table(["item", "value"], hardware())]
    return blocks


def _expand(blocks: list[tuple]) -> list[tuple]:
    """Markdown tables made by other modules -> table blocks, so both renderers treat them alike."""
    out = []
    for b in blocks:
        if b[0] == "raw_md_table":
            lines = [line.strip().strip("|").split(" | ") for line in b[1].splitlines()]
            out.append(table([c.strip() for c in lines[0]], [[c.strip() for c in row] for row in lines[2:]]))
        else:
            out.append(b)
    return out


def write_report(run_dir: str | os.PathLike) -> tuple[Path, Path]:
    from chatforge.io import atomic_write_text

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ChatforgeError(f"{run_dir}: no such folder")
    blocks = _expand(build_report(run_dir))
    md, page = run_dir / "report.md", run_dir / "report.html"
    atomic_write_text(md, render_markdown(blocks, run_dir))
    atomic_write_text(page, render_html(blocks, f"chatforge report: {run_dir.resolve().name}"))
    return md, page


def report(run_dir: str | os.PathLike, run_eval: bool = False, max_samples: int = 100) -> tuple[Path, Path]:
    """(report.md, report.html) for a run; run_eval first evaluates the run's final model on its config's data
    (held-out split) into RUN_DIR/eval.json."""
    folder = Path(run_dir)
    if run_eval:
        runs = stages(folder) if folder.is_dir() else []
        if not runs:
            raise ChatforgeError(f"{run_dir}: not a run folder")
        model = folder / "final" if (folder / "final" / "config.json").exists() else runs[-1] / "final"
        if not (model / "config.json").exists():
            raise ChatforgeError(f"{model}: no model to evaluate")
        from chatforge.config import load_config
        from chatforge.eval.evaluate import evaluate
        from chatforge.weights.folder import write_json

        cfg = load_config(str(runs[-1] / "config.yaml"))
        result = evaluate(str(model), cfg.data, max_samples=max_samples, seed=cfg.seed, val_fraction=cfg.val_fraction)
        write_json(folder / "eval.json", result)
    return write_report(folder)
