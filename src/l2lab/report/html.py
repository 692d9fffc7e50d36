"""A sweep's report: ``summary.csv``, the figures, and a self-contained ``index.html``.

The HTML report holds what a reader needs to judge a λ sweep without the terminal that ran it:
the table with 95% t-intervals over seeds, the figures (embedded as PNG, so the one file can be
mailed or opened from MLflow's artifact viewer), each row's runs linked into the MLflow UI, the
verdict of the paired test, and the command that reproduces the sweep. The statistics live in
:mod:`l2lab.report.stats`, the figures in :mod:`l2lab.report.figures`; this module only writes
files.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

import pandas as pd

from l2lab.report import conditions as cd
from l2lab.report import figures
from l2lab.report import numeric as nm
from l2lab.report.stats import (  # noqa: F401  (re-exported: the report's public names)
    EPOCH_RANGE,
    FINISHED,
    LAM_KEY,
    STAT_COLUMNS,
    RunRecord,
    cell_columns,
    cells_of,
    rejected,
    select_metric,
    short_key,
    summarize,
    trained,
    verdict,
)
from l2lab.report.stats import fmt_value as _fmt_value
from l2lab.report.table import (  # noqa: F401 (re-exported)
    best_row,
    failure_groups,
    format_table,
    table_metrics,
)

FIGURES: tuple[tuple[str, str], ...] = (
    ("lambda_curve", "Final train and val cross-entropy against λ (symlog axis, so λ = 0 "
                     "shows): the U-curve. Bands: 95% t-interval of the mean over seeds."),
    ("learning_curves", "Train and val cross-entropy against epoch, mean over seeds, one colour "
                        "per λ. The y range ends at the upper fence (Q3 + 1.5·IQR, Tukey) of the "
                        "points from epoch 1 on: epoch 0 and a far-underfitting λ leave the "
                        "panel, which names them."),
    ("weight_norms", ""),  # what it sums depends on the runs: figures.norm_caption
    ("best_lambda", "Best λ (lowest mean final val/ce) of each condition; the bar spans the λ "
                    "not distinguishable from it (paired t-test over seeds, 5% level)."),
    ("eff_lr", "Effective learning rate, lr / ‖W‖², at the last epoch against λ, averaged over "
               "the layers a normalization follows (weights/eff_lr/*), one line per condition "
               "(mean; dots: seeds). With BatchNorm, L2 cannot shrink what such a layer "
               "computes; it raises this rate instead (van Laarhoven 2017)."),
    ("heatmap", "Mean final val/ce over λ × the condition's value; box: each row's best λ, "
                "star: the lowest cell. The colour scale spans the cells next to each row's best; "
                "worse cells take its top colour (▲)."),
    ("condition_curve", "The error (test error, else val error: 1 − accuracy; solid) with the "
                        "train error (dashed), and the final cross-entropy that chose the best "
                        "λ, against the numeric condition, one colour per λ (mean over seeds). "
                        "Black: the envelope of each value's own best λ, its band the 95% "
                        "interval over seeds. Dotted: the interpolation threshold (the smallest "
                        "value whose mean train error at λ = 0 is ≤ 0.01)."),
)
#: The captions of a sweep faceted by an arm (a preset, a mode) beside a numeric factor.
ARM_CAPTIONS = {
    "heatmap": "Mean final val/ce over λ × the numeric factor, one heatmap per arm on one colour "
               "scale (it spans the cells next to each row's best; worse cells take its top "
               "colour, ▲); box: each row's best λ, star: the arm's lowest cell.",
    "best_lambda": "Best λ against the numeric factor, one line per arm; the bar spans the λ "
                   "not distinguishable from it (paired t-test over seeds, 5% level).",
    "learning_curves": "Val (solid) and train (dashed) cross-entropy against epoch, mean over "
                       "seeds: a row of panels per arm, one colour per λ. The y range ends at "
                       "the upper fence (Q3 + 1.5·IQR, Tukey) of the points from epoch 1 on.",
}
#: The caption of the λ curve when the sweep has conditions (one panel each).
CONDITION_CURVE = ("Final train and val cross-entropy against λ, one panel per condition "
                   "(symlog axis, so λ = 0 shows). Bands: 95% interval over seeds; star: the "
                   "condition's best λ; violet band: the λ not distinguishable from it.")


class Links(Protocol):
    """Where the report links a run and an experiment's runs to (the MLflow UI's pages): given by
    the caller (``tracking.ui.UiLinks``), since the report knows no store."""

    def run(self, experiment_id: str, run_id: str) -> str: ...

    def runs(self, experiment_id: str, *, chart: bool = False) -> str: ...


@dataclass
class ReportContext:
    """What the report says beyond the runs themselves: its title, its links into the UI, the
    sweep's parent run, the commands that reproduce it, and any extra lines (an Optuna study's
    best)."""

    title: str = "l2lab runs"
    links: Links | None = None  # None: runs are named, not linked
    parent: tuple[str, str] | None = None  # (experiment id, run id) of the sweep's parent
    commands: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def write_report(runs: Sequence[RunRecord], out_dir: Path,
                 context: ReportContext | None = None) -> dict[str, Path]:
    """Write ``summary.csv``, ``figures/*.png`` and ``index.html`` into ``out_dir``; return
    their paths (keys ``summary``, the figure names, ``report``)."""
    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    names = ["lambda_curve", "learning_curves", "weight_norms"]
    summary = summarize(runs)
    keys, conds = cd.split(runs)
    fac = cd.factorial(keys, conds)
    view = nm.view(keys, conds) if keys else None
    if view is not None:
        names.append("condition_curve")
    if keys:
        names.append("best_lambda")
        if cd.numeric_key(keys, conds) or fac is not None:
            names.append("heatmap")
    if any(figures.eff_lr_of(r) is not None for r in trained(runs)):
        names.append("eff_lr")
    paths = {"summary": out_dir / "summary.csv",
             **{name: fig_dir / f"{name}.png" for name in names},
             "report": out_dir / "index.html"}
    summary.to_csv(paths["summary"], index=False)
    _, cells = cells_of(trained(runs))
    if fac is not None:  # an arm × a number: faceted by the arm
        figures.plot_condition_curves(fac.ordered, paths["lambda_curve"], cols=len(fac.levels))
        figures.plot_arm_best_lambda(fac, paths["best_lambda"])
        figures.plot_arm_heatmaps(fac, paths["heatmap"])
        figures.plot_arm_histories(fac, paths["learning_curves"], weights=False)
        figures.plot_arm_histories(fac, paths["weight_norms"], weights=True)
    else:
        if keys:
            figures.plot_condition_curves(conds, paths["lambda_curve"])
            figures.plot_best_lambda(keys, conds, paths["best_lambda"],
                                     numeric=cd.numeric_key(keys, conds))
            if "heatmap" in paths:
                figures.plot_heatmap(summary, keys[0], paths["heatmap"])
        else:
            figures.plot_lambda_curve(summary, paths["lambda_curve"])
        if keys and len(conds) <= figures.MAX_PANEL_ROWS:
            figures.plot_condition_histories(conds, paths["learning_curves"], weights=False)
            figures.plot_condition_histories(conds, paths["weight_norms"], weights=True)
        else:
            figures.plot_curves(cells, paths["learning_curves"], weights=False)
            figures.plot_curves(cells, paths["weight_norms"], weights=True)
    if view is not None:
        figures.plot_numeric(view, paths["condition_curve"])
    if "eff_lr" in paths:
        figures.plot_eff_lr(trained(runs), paths["eff_lr"])
    paths["report"].write_text(render_html(summary, runs, paths, context or ReportContext()),
                               encoding="utf-8")
    return paths


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5rem auto;
max-width:1200px;padding:0 1rem;color:#1a1a1a;line-height:1.45}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.15rem;margin-top:1.8rem}
.meta{color:#555;font-size:.9rem}
table{border-collapse:collapse;font-size:.85rem;font-variant-numeric:tabular-nums}
th,td{border-bottom:1px solid #ddd;padding:.3rem .55rem;text-align:right;vertical-align:top}
th{background:#f4f4f4;position:sticky;top:0}td.runs{text-align:left;font-size:.8rem}
tr.best td{background:#fff6e0;font-weight:600}.ci{display:block;color:#666;font-weight:400;
font-size:.75rem}.verdict{padding:.6rem .8rem;border-left:4px solid #e69500;background:#fff9ec}
.verdict.clear{border-color:#2a9d3c;background:#eefaf0}
figure{margin:1rem 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{color:#555;font-size:.85rem}pre{background:#f6f6f6;padding:.6rem;overflow-x:auto}
.failed{color:#a00}.warn{color:#8a4b00}section.condition{border-top:1px solid #eee}
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _link(url: str | None, text: str) -> str:
    if not url:
        return _e(text)
    return f'<a href="{_e(url)}" target="_blank" rel="noopener">{_e(text)}</a>'


def _cell(row: pd.Series, prefix: str, decimals: int) -> str:
    """Mean and, below it, its 95% interval; the best epoch as median and min-max range."""
    centre = "median" if prefix == "best_epoch" else "mean"
    mean, lo, hi = (float(row[f"{prefix}_{s}"]) for s in (centre, "lo", "hi"))
    if math.isnan(mean):
        return "n/a"
    if prefix == "best_epoch":
        text = f"{mean:g}"
        return text + ("" if math.isnan(lo) else f'<span class="ci">[{lo:g}–{hi:g}]</span>')
    text = f"{mean:.{decimals}f}"
    if not math.isnan(lo):
        text += f'<span class="ci">[{lo:.{decimals}f}, {hi:.{decimals}f}]</span>'
    return text


def _run_url(links: Links | None, run: RunRecord) -> str | None:
    return links.run(run.experiment_id, run.run_id) if links and run.experiment_id else None


def _run_links(group_runs_: Sequence[RunRecord], links: Links | None) -> str:
    parts = []
    for r in sorted(group_runs_, key=lambda r: r.seed):
        url = _run_url(links, r)
        text = f"seed {r.seed}" + ("" if r.status == FINISHED else f" ({r.status})")
        link = _link(url, text)
        parts.append(f'<span class="failed">{link}</span>' if r.status != FINISHED else link)
    return ", ".join(parts)


def _conditions_html(keys: Sequence[str], conds: Sequence[cd.Condition]) -> str:
    """A section per condition (best λ, its range, its verdict, its warnings, the layers its
    selection penalised), then the cross-condition table, its protocol and verdict
    (``id="verdict"``)."""
    acr = cd.across(conds)
    chosen = conds[0].metric if conds else "val/ce"
    parts = [f"<p class=\"meta\">Conditions: every swept key other than λ and seed "
             f"({_e(', '.join(keys))}). Within a condition, best λ = lowest mean final "
             f"{_e(chosen)}; its range = the λ not distinguishable from it (paired t-test over "
             "seeds, 5% level).</p>"]
    for i, c in enumerate(conds):
        ver = c.verdict
        body = ("no finished runs" if ver.best is None else
                f"best λ = <b>{_e(_fmt_value(c.best_lam))}</b> (mean final {_e(c.metric)} "
                f"{c.best_val:.4f}; {_e(cd.range_text(c))}): {_e(ver.text)}.")
        cls = "verdict clear" if ver.clear else "verdict"
        warn = "".join(f'<p class="warn">{_e(w)}</p>' for w in cd.warnings_of(c))
        layers = cd.layers_of(c.runs)
        sel = "" if layers is None else \
            f'<p class="meta">penalised layers (l2.layers): {_e(layers)}</p>'
        parts.append(f'<section class="condition" id="condition-{i}"><h3>{_e(c.label)}</h3>'
                     f'<p class="{cls}">{body}</p>{sel}{warn}</section>')
    rivals = {r.other: r for r in acr.rivals}
    shown = list(dict.fromkeys((acr.chosen_on, acr.judged_on)))
    layered = any(cd.layers_of(c.runs) is not None for c in conds)
    rows = []
    for i, c in enumerate(conds):
        ties = c.tie_lams
        span = (f"{_fmt_value(ties[0])} – {_fmt_value(ties[-1])}" if len(ties) > 1
                else _fmt_value(c.best_lam) if ties else "")
        if i == acr.lowest:
            against = "the lowest"
        elif i in rivals:
            against = cd.rivalry_text(conds, acr, rivals[i]).split("): ", 1)[1]
        else:
            against = ""
        values = "".join(f"<td>{_num(c.mean_at_best(m))}</td>" for m in shown)
        layers = f"<td>{_e(cd.layers_of(c.runs) or '')}</td>" if layered else ""
        within = "n/a" if not c.verdict.compared or c.verdict.best is None else \
            "clear" if c.verdict.clear else "not clear"
        rows.append(f"<tr><td>{_e(c.label)}</td>{layers}<td>{_e(_fmt_value(c.best_lam))}</td>"
                    f"<td>{_e(span)}</td>{values}<td>{within}</td>"
                    f"<td style=\"text-align:left\">{_e(against)}</td></tr>")
    notes = "".join(f'<p class="meta">{_e(a)} and {_e(b)} at λ = {_e(_fmt_value(lam))} are '
                    "the same training under two labels (no penalty under either): never compared "
                    "as rivals.</p>" for a, b, lam in acr.same_pairs)
    last = cd.across_verdict(conds, acr)
    cls = "verdict clear" if last.startswith("*") else "verdict"
    fac = cd.factorial(keys, conds)
    arms = "" if fac is None else _factorial_html(fac)
    view = nm.view(keys, conds)
    if view is not None:
        arms += _numeric_html(view)
    parts.append(
        '<h3>Across conditions</h3><table id="best-lambda"><thead><tr><th>condition</th>'
        f"{'<th>penalised layers</th>' if layered else ''}<th>best λ</th>"
        "<th>not distinguishable</th>"
        + "".join(f"<th>{_e(m)} at best λ</th>" for m in shown) +
        "<th>within</th><th>against the lowest, each at its own best λ</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>{notes}"
        f'<p class="meta" id="protocol">{_e(_sentence(cd.protocol_text(acr)))}.</p>'
        f'<p class="{cls}" id="verdict">{_e(last[2:])}.</p>{arms}')
    return "".join(parts)


def _sentence(text: str) -> str:
    """A console line as a sentence: its first letter upper case, the rest as written."""
    return text[:1].upper() + text[1:]


def _num(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.4f}"


def _factorial_html(fac: cd.Factorial) -> str:
    """The factorial answer (``id="factorial"``): a line per arm on how far its best λ moves
    across the numeric factor, then whether that shift differs between arms."""
    head, *arms, last = cd.factorial_lines(fac)
    cls = "verdict clear" if last.startswith("*") else "verdict"
    items = "".join(f"<li>{_e(line.strip())}</li>" for line in arms)
    return (f'<h3 id="factorial">{_e(head.rstrip(":"))}</h3><ul>{items}</ul>'
            f'<p class="{cls}" id="factorial-verdict">{_e(last[2:])}.</p>')


def _numeric_html(view: nm.NumericView) -> str:
    """The numeric condition's verdict (``id="numeric"``): the threshold, the peak at λ = 0 and
    under each value's best λ, and whether that envelope is monotone, per facet."""
    head, *lines = nm.verdict_lines(view)
    items = "".join(f"<li>{_e(line.strip())}</li>" for line in lines)
    return f'<h3 id="numeric">{_e(head.rstrip(":"))}</h3><ul id="numeric-verdict">{items}</ul>'


def _image(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def render_html(summary: pd.DataFrame, runs: Sequence[RunRecord], paths: dict[str, Path],
                context: ReportContext) -> str:
    keys = cell_columns(summary)
    metric = select_metric(trained(runs))
    metrics = table_metrics(summary, metric)
    ver = verdict(summary, runs)
    _, table_cells = cells_of(trained(runs))
    links = context.links
    exps = sorted({r.experiment_id for r in runs if r.experiment_id})

    head = "".join(f"<th>{_e('λ' if k == 'lam' else short_key(k))}</th>" for k in keys)
    head += "<th>runs</th>" + "".join(f"<th>{_e(m[0])}</th>" for m in metrics)
    head += "<th>MLflow runs</th>"
    cond_keys, conds = cd.split(runs)
    marked = {best_row(summary, c.values, c.best_lam) for c in conds} if cond_keys \
        else {ver.best}
    rows = []
    for pos, cell in enumerate(table_cells):
        row = summary.iloc[pos]
        cls = ' class="best"' if pos in marked else ""
        cells = "".join(f"<td>{_e(_fmt_value(row[k]))}</td>" for k in keys)
        cells += f"<td>{int(row['runs'])}</td>"
        cells += "".join(f"<td>{_cell(row, prefix, d)}</td>" for _, prefix, d in metrics)
        cells += f'<td class="runs">{_run_links(cell.runs, links)}</td>'
        rows.append(f"<tr{cls}>{cells}</tr>")
    if not rows:
        rows.append(f'<tr><td colspan="{len(keys) + len(metrics) + 2}">no runs</td></tr>')

    if cond_keys:
        verdict_html = _conditions_html(cond_keys, conds)
    elif ver.best is None:
        verdict_html = '<p class="verdict" id="verdict">No finished runs: no verdict.</p>'
    else:
        label = ", ".join(f"{'λ' if k == 'lam' else short_key(k)} = "
                          f"{_fmt_value(summary.iloc[ver.best][k])}" for k in keys)
        cls = "verdict clear" if ver.clear else "verdict"
        verdict_html = (f'<p class="{cls}" id="verdict">Lowest mean final {_e(metric)}: '
                        f"<b>{_e(label)}</b>: {_e(ver.text)}.</p>")
        verdict_html += "".join(f'<p class="warn">{_e(w)}</p>'
                                for c in conds for w in cd.warnings_of(c))
        if selected := cd.selection_line(conds):
            verdict_html += f'<p class="meta">{_e(_sentence(selected))}.</p>'
    if metric != "val/ce":
        verdict_html = (f'<p class="warn" id="no-validation">No validation split (no run '
                        f"logged val/ce; data.val_size=0?): best λ chosen and judged on "
                        f"{_e(metric)}.</p>") + verdict_html

    problems = [r for r in runs if r.status != FINISHED]
    failed_html = ""
    if problems:
        items = "".join(
            f"<li>{', '.join(_link(_run_url(links, r), r.name) for r in members)}"
            f"{f' ({len(members)} runs)' if len(members) > 1 else ''} {_e(status)}: "
            f"{_e(reason)}{' (never trained: no row)' if all(map(rejected, members)) else ''}"
            "</li>" for status, reason, members in failure_groups(problems))
        failed_html = f'<h2>Runs that did not finish</h2><ul class="failed">{items}</ul>'

    meta = [f"{len(runs)} runs"]
    if context.parent and links:
        exp, rid = context.parent
        meta.append("parent run " + _link(links.run(exp, rid), rid))
    if links and exps:
        for exp in exps:
            meta.append(_link(links.runs(exp), f"experiment {exp} in the MLflow UI") + " ("
                        + _link(links.runs(exp, chart=True), "chart view") + ")")
    meta.append("written " + datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))

    fac = cd.factorial(cond_keys, conds)
    captions = {**dict(FIGURES), "weight_norms": figures.norm_caption(trained(runs)),
                **({"lambda_curve": CONDITION_CURVE} if cond_keys else {}),
                **(ARM_CAPTIONS if fac is not None else {})}
    figs = "".join(
        f'<figure><img id="{name}" alt="{_e(name)}" src="{_image(paths[name])}">'
        f"<figcaption><b>{name}.png</b>: {_e(captions[name])}</figcaption></figure>"
        for name, _ in FIGURES if name in paths and paths[name].exists())
    commands = "\n".join(context.commands) or "(not recorded)"
    notes = "".join(f"<p>{_e(n)}</p>" for n in context.notes)

    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(context.title)}</title><style>{_CSS}</style></head>
<body>
<h1>{_e(context.title)}</h1>
<p class="meta">{" · ".join(meta)}</p>
<h2>Verdict</h2>
{verdict_html}
<p class="meta">Best = lowest mean final val/ce. The seeds are paired across λ (seed k has the same
initialisation and shuffling at every λ), so the verdict tests the per-seed differences to every
other row (paired t-test, two-sided, 5% level); the row hardest to tell apart decides, and where it
cannot, "about M seeds" is the number at which that difference would be found 80% of the
time.</p>
{notes}
<h2>Table</h2>
<table id="summary"><thead><tr>{head}</tr></thead><tbody>
{"".join(rows)}
</tbody></table>
<p class="meta">Final (last-epoch) metrics: mean over the seeds of each row and, below it, its 95%
interval, kept inside the metric's range: for cross-entropy a t-interval on the log (of the
geometric mean; never below 0), for accuracy the t-interval cut to [0, 1], for gap/ce the
t-interval. best val/ce: each run's lowest val/ce over its epochs; {_e(EPOCH_RANGE)}.</p>
{failed_html}
<h2>Figures</h2>
{figs}
<h2>Reproduce</h2>
<pre id="command">{_e(commands)}</pre>
</body></html>
"""
