"""Reports: a loss-curve plot from a run's log.jsonl and a self-contained Markdown + HTML page."""
from __future__ import annotations

import html
import os
from pathlib import Path

from ..errors import atomic_write


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Lay out, write (creating the folder) and close a matplotlib figure; -> the path."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_write(path, "the figure") as tmp:
            fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return path


def plot_loss(log: list[dict], path: str | os.PathLike, title: str = "training loss") -> Path | None:
    """loss (and its MSE / VLB parts) against images seen, as a PNG."""
    if not log:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    x = [r["images"] / 1000 for r in log]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
    for key, style in (("loss", "-"), ("mse", "--"), ("vb", ":")):
        if key in log[0]:
            ax.plot(x, [r[key] for r in log], style, label=key)
    ax.set_xlabel("thousand images seen")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def write_report(out_dir: str | os.PathLike, title: str, blocks: list[tuple[str, object]]) -> tuple[Path, Path]:
    """blocks: ("text", str) | ("image", relative path) | ("table", (header list, rows list)) | ("code", str)."""
    out_dir = Path(out_dir)
    md = [f"# {title}", ""]
    body = [f"<h1>{html.escape(title)}</h1>"]
    for kind, value in blocks:
        if kind == "text":
            md += [str(value), ""]
            body.append(f"<p>{html.escape(str(value))}</p>")
        elif kind == "heading":
            md += [f"## {value}", ""]
            body.append(f"<h2>{html.escape(str(value))}</h2>")
        elif kind == "code":
            md += ["```", str(value), "```", ""]
            body.append(f"<pre>{html.escape(str(value))}</pre>")
        elif kind == "image":
            md += [f"![{value}]({value})", ""]
            body.append(f'<p><img src="{html.escape(str(value))}" alt="{html.escape(str(value))}"></p>')
        elif kind == "table":
            header, rows = value
            md.append("| " + " | ".join(header) + " |")
            md.append("|" + "---|" * len(header))
            md += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
            md.append("")
            body.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>"
                                  for r in rows) + "</table>")
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.4}"
             "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:.25em .6em;text-align:right}"
             "pre{background:#f4f4f4;padding:.6em;overflow-x:auto}img{max-width:100%}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>")
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    for p, text in ((md_path, "\n".join(md)), (html_path, page)):
        with atomic_write(p, "the report") as tmp:
            tmp.write_text(text)
    return md_path, html_path
