"""The one owner of metric tables: the per-task metrics table and plain-text table layout.

``mtrec train`` and ``mtrec evaluate`` print :func:`format_metrics`; ``mtrec compare`` lays
out its rows with :func:`text_table`; the HTML report formats its cells with :func:`cell`;
the task x task matrices (label correlations, task affinity) are laid out by :func:`format_matrix`,
and a run's ``affinity.json`` as text (``train``, ``compare --affinity``) by :func:`format_affinity`.
A leaf module: it knows metric key names, not models, files or tasks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

__all__ = ["cell", "format_affinity", "format_matrix", "format_metrics", "text_table"]


def cell(value: Any, missing: str = "n/a", digits: int = 4) -> str:
    """One metric value as shown: integers with thousands separators, floats to ``digits``."""
    if value is None:
        return missing
    return f"{value:,}" if isinstance(value, int) else f"{value:.{digits}f}"


def text_table(rows: Sequence[Sequence[str]], align: Literal["numbers_right", "left"] = "numbers_right") -> str:
    """Columns padded to their widest cell, with a rule under the header row.

    ``numbers_right`` left-aligns the first column and right-aligns the others (a table of
    figures); ``left`` left-aligns every column and strips trailing blanks (a table of words).
    """
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    if align == "left":
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    else:
        lines = [
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
            for r in rows
        ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_matrix(title: str, names: Sequence[str], rows: Sequence[Sequence[float | None]], fmt: str = "8.3f") -> str:
    """A square task x task matrix under ``title``: one row and one column per name, each
    value formatted with ``fmt`` (``n/a`` where it is ``None`` or NaN).

    Example:
        >>> print(format_matrix("m:", ["a", "b"], [[1.0, None], [0.25, 1.0]]))
        m:
                  a         b
          a   1.000       n/a
          b   0.250     1.000
    """
    cells = [[format(v, fmt) if v is not None and v == v else "n/a" for v in row] for row in rows]
    size = max([8, *(len(c) for row in cells for c in row)])
    width = max(len(n) for n in names)
    lines = [title, " " * (width + 2) + "  ".join(f"{n:>{size}s}" for n in names)]
    for name, row in zip(names, cells, strict=True):
        lines.append(f"  {name:<{width}s}" + "  ".join(f"{c:>{size}s}" for c in row))
    return "\n".join(lines)


# (column, metric key, the key whose presence says the task kind reports it)
_METRIC_COLUMNS = (
    ("rows", "count", None),
    ("positives", "positives", "positives"),
    ("auc", "auc", "positives"),
    ("logloss", "logloss", "logloss"),
    ("ne", "normalized_entropy", "positives"),
    ("pr_auc", "pr_auc", "positives"),
    ("calib", "calibration", "positives"),
    ("rmse", "rmse", "rmse"),
    ("accuracy", "accuracy", "accuracy"),
    ("mean_pred", "mean_pred", "mean_pred"),
    ("mean_label", "mean_label", "mean_label"),
)


def format_metrics(tasks: Mapping[str, Mapping[str, Any]]) -> str:
    """A per-task metrics table (``-`` where a task's kind has no such metric, ``n/a`` where
    it is undefined on these rows), with each task's notes and GAUC group counts below."""
    rows = [["task", *(c for c, _, _ in _METRIC_COLUMNS)]]
    for name, m in tasks.items():
        rows.append(
            [name, *(cell(m.get(key)) if when is None or when in m else "-" for _, key, when in _METRIC_COLUMNS)]
        )
    if any("gauc" in m for m in tasks.values()):
        rows[0].insert(4, "gauc")
        for row, m in zip(rows[1:], tasks.values(), strict=True):
            row.insert(4, cell(m["gauc"]["gauc"]) if "gauc" in m and m["gauc"]["gauc"] == m["gauc"]["gauc"] else "-")
    notes = [f"{name}: {m['note']}" for name, m in tasks.items() if m.get("note")]
    notes += [
        f"{name}: gauc over {m['gauc']['groups_used']:,} groups ({m['gauc']['groups_skipped_one_class']:,} "
        "with one class skipped)"
        for name, m in tasks.items()
        if "gauc" in m
    ]
    return text_table(rows) + ("\n" + "\n".join(notes) if notes else "")


_SHARED_WHAT = {
    "dense": "the shared dense parameters",
    "input": "the shared input layer (the embedding rows a batch reads)",
}


def format_affinity(doc: dict[str, Any]) -> str:
    """The run's two matrices as text tables (``n/a`` where undefined), or why there are none."""
    if doc.get("shared") == "none":
        return "task affinity: this model shares no parameters between tasks (nothing to measure)"
    names = list(doc["tasks"])
    what = _SHARED_WHAT.get(str(doc.get("shared")), "the shared parameters")
    head = f"task affinity over {doc['measurements']} measurement(s), every {doc['every']} steps, on {what}:"
    cosine = format_matrix("gradient cosine (row task i, column task j):", names, doc["gradient_cosine"])
    lookahead = format_matrix(
        "lookahead affinity 1 - L_j(after a step on task i) / L_j (row i, column j):",
        names,
        doc["lookahead_affinity"],
        fmt="+10.2e",
    )
    return "\n".join([head, cosine, lookahead])
