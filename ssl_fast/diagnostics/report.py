"""A small markdown report writer (text, tables, images relative to the report, a verdict line)."""

from __future__ import annotations

import os
from typing import Iterable, List, Optional, Sequence


def fmt(v, digits: int = 4) -> str:
    """Format a number for a table: floats with ``digits`` significant digits, the rest with ``str``."""
    try:
        import torch

        if isinstance(v, torch.Tensor):
            v = v.item() if v.numel() == 1 else v.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if v == 0:
            return "0"
        return f"{v:.{digits}g}"
    return str(v)


class MarkdownReport:
    """Collects sections and writes ``<out_dir>/<name>.md``; images are referenced relative to it.

    Example:
        >>> r = MarkdownReport("demo", "/tmp/out")
        >>> r.paragraph("hello"); r.table(["a", "b"], [[1, 2.0]]); path = r.write()
    """

    def __init__(self, title: str, out_dir: str, filename: str = "report.md"):
        self.title, self.out_dir, self.filename = title, out_dir, filename
        self.lines: List[str] = [f"# {title}", ""]
        os.makedirs(out_dir, exist_ok=True)

    def heading(self, text: str, level: int = 2) -> None:
        self.lines += ["#" * level + " " + text, ""]

    def paragraph(self, text: str) -> None:
        self.lines += [text.strip(), ""]

    def bullets(self, items: Iterable[str]) -> None:
        self.lines += [f"- {i}" for i in items] + [""]

    def table(self, headers: Sequence[str], rows: Iterable[Sequence], digits: int = 4) -> None:
        esc = lambda t: str(t).replace("|", "\\|")  # noqa: E731 - a literal pipe would split the cell
        self.lines.append("| " + " | ".join(esc(h) for h in headers) + " |")
        self.lines.append("|" + "|".join("---" for _ in headers) + "|")
        for row in rows:
            self.lines.append("| " + " | ".join(esc(fmt(v, digits)) for v in row) + " |")
        self.lines.append("")

    def image(self, path: str, caption: str = "") -> None:
        rel = os.path.relpath(path, self.out_dir)
        self.lines += [f"![{caption}]({rel})", ""]

    def verdict(self, text: str, passed: Optional[bool] = None) -> None:
        tag = "" if passed is None else ("PASS: " if passed else "FAIL: ")
        self.lines += [f"**Verdict: {tag}{text}**", ""]

    def text(self) -> str:
        return "\n".join(self.lines).rstrip() + "\n"

    def write(self) -> str:
        path = os.path.join(self.out_dir, self.filename)
        with open(path, "w") as fh:
            fh.write(self.text())
        return path


__all__ = ["MarkdownReport", "fmt"]
