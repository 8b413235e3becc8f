"""The formats of `rsslctl compare` (``rsslctl.eval.compare``): a rich table, Markdown, CSV, JSON, LaTeX (booktabs)
and one self-contained HTML page (sortable table, ε-curves and training curves as inline SVG, nothing fetched)."""
from __future__ import annotations

import csv
import html
import io
import json
from typing import Any, Callable

FORMATS = ("table", "markdown", "csv", "json", "latex", "html")


def _text(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, tuple):
        return ",".join(map(_text, v))
    return str(v)


def _stat(s: dict[str, Any] | None, ci: bool = True) -> str:
    """``mean ± std [low, high]`` in percent with two decimals; a single seed shows its value alone."""
    if not s:
        return "–"
    if s["std"] is None:
        return f"{s['mean']:.2f}"
    text = f"{s['mean']:.2f} ± {s['std']:.2f}"
    return text + (f" [{s['ci'][0]:.2f}, {s['ci'][1]:.2f}]" if ci else "")


def _header(cmp: dict[str, Any]) -> list[str]:
    return [*(["name"] if cmp.get("name_column") else []), *cmp["recipe_columns"], "evaluation",
            *cmp["setting_columns"], "seeds"]


def _lead(cmp: dict[str, Any], row: dict[str, Any]) -> list[str]:
    return [*([row["name"]] if cmp.get("name_column") else []),
            *(_text(row["recipe"].get(c)) for c in cmp["recipe_columns"]), row["evaluation"],
            *(_text(row["settings"].get(c)) if c in row["settings"] else "" for c in cmp["setting_columns"]),
            str(len(row["seeds"]))]


def _caption(cmp: dict[str, Any]) -> str:
    return (f"accuracy in %: mean ± sample standard deviation over seeds [{100 * cmp['level']:.0f} % Student-t "
            "interval of the mean]")


def table(cmp: dict[str, Any]) -> Any:
    """A rich table for the terminal."""
    from rich.table import Table

    t = Table(title="rsslctl compare", caption=" · ".join([_caption(cmp), *cmp["notes"]]))
    for name in _header(cmp):
        t.add_column(name, style="bold" if name == "evaluation" else None)
    for f in cmp["figures"]:
        t.add_column(f, justify="right", no_wrap=True)
    for row in cmp["rows"]:
        t.add_row(*_lead(cmp, row), *(_stat(row["figures"].get(f)).replace(" [", "\n[") for f in cmp["figures"]))
    return t


def markdown(cmp: dict[str, Any]) -> str:
    head = [*_header(cmp), *cmp["figures"]]
    cell = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(cell, head)) + " |",
             "|" + "|".join("---" if i < len(head) - len(cmp["figures"]) else "---:" for i in range(len(head))) + "|"]
    for row in cmp["rows"]:
        cells = [*_lead(cmp, row), *(_stat(row["figures"].get(f)) for f in cmp["figures"])]
        lines.append("| " + " | ".join(map(cell, cells)) + " |")
    return "\n".join(lines + ["", f"*{_caption(cmp)}*", *[f"- {n}" for n in cmp["notes"]]]) + "\n"


def csv_text(cmp: dict[str, Any]) -> str:
    """One line per row; per figure its n, mean, std and interval (empty where undefined), in percent."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    stats = ("n", "mean", "std", "ci_low", "ci_high")
    w.writerow([*_header(cmp), "seed_values", *(f"{f} {s}" for f in cmp["figures"] for s in stats)])
    for row in cmp["rows"]:
        cells = []
        for f in cmp["figures"]:
            s = row["figures"].get(f)
            ci = (s or {}).get("ci") or ["", ""]
            cells += ["", "", "", "", ""] if not s else [s["n"], repr(s["mean"]), "" if s["std"] is None else
                                                         repr(s["std"]), repr(ci[0]) if ci[0] != "" else "",
                                                         repr(ci[1]) if ci[1] != "" else ""]
        w.writerow([*_lead(cmp, row), " ".join(map(str, row["seeds"])), *cells])
    return buf.getvalue()


def json_text(cmp: dict[str, Any]) -> str:
    return json.dumps(cmp, indent=2, default=str) + "\n"


_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
          "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "–": "--", "ε": r"$\varepsilon$"}


def _tex(text: str) -> str:
    return "".join(_LATEX.get(c, c) for c in text)


def latex(cmp: dict[str, Any]) -> str:
    """A booktabs table (needs ``\\usepackage{booktabs}``): mean ± std per figure, the seed count as a column."""
    head = [*_header(cmp), *cmp["figures"]]
    lead = len(head) - len(cmp["figures"])
    lines = [f"% rsslctl compare: {_caption(cmp)}", r"\begin{tabular}{" + "l" * lead + "r" * len(cmp["figures"]) + "}",
             r"\toprule", " & ".join(_tex(h) for h in head) + r" \\", r"\midrule"]
    for row in cmp["rows"]:
        cells = [_tex(c) for c in _lead(cmp, row)]
        for f in cmp["figures"]:
            s = row["figures"].get(f)
            cells.append("--" if not s else f"${s['mean']:.2f}$" if s["std"] is None
                         else f"${s['mean']:.2f} \\pm {s['std']:.2f}$")
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", *[f"% {n}" for n in cmp["notes"]]]
    return "\n".join(lines) + "\n"


# -- HTML ----------------------------------------------------------------------------------------------------------
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222}
table{border-collapse:collapse;margin:12px 0}
th,td{border-bottom:1px solid #ddd;padding:4px 10px;text-align:left;white-space:nowrap}
td.num{text-align:right;font-variant-numeric:tabular-nums}
th{cursor:pointer;background:#f4f4f4;user-select:none}
th[data-dir=asc]::after{content:" \\25B2"} th[data-dir=desc]::after{content:" \\25BC"}
.ci{color:#777;font-size:12px}
.swatch{display:inline-block;width:10px;height:10px;margin-right:6px;border-radius:2px}
.charts{display:flex;flex-wrap:wrap;gap:24px}
figure{margin:0} figcaption{font-weight:600;margin-bottom:4px}
ul.notes{color:#555}
"""

# sorts by the clicked column (numbers by data-sort, else text); window.rsslctlSort is also the hook a
# "#sort=COLUMN-asc|desc" address uses, and "#click=3,3" clicks headers in turn (how the tests drive it headless)
_JS = """
(function(){
  var table=document.getElementById('compare'), body=table.tBodies[0];
  function key(row,i){var c=row.cells[i], v=c.getAttribute('data-sort');
    return v===null||v===''?[1,c.textContent]:[0,parseFloat(v)];}
  function sort(i,dir){
    var rows=Array.prototype.slice.call(body.rows);
    rows.sort(function(a,b){var x=key(a,i),y=key(b,i);
      if(x[0]!==y[0])return x[0]-y[0];
      var r=x[0]===0?x[1]-y[1]:String(x[1]).localeCompare(String(y[1]));
      return dir==='desc'?-r:r;});
    rows.forEach(function(r){body.appendChild(r);});
    Array.prototype.forEach.call(table.tHead.rows[0].cells,function(h,j){
      if(j===i)h.setAttribute('data-dir',dir);else h.removeAttribute('data-dir');});
    table.setAttribute('data-sorted',i+'-'+dir);
  }
  Array.prototype.forEach.call(table.tHead.rows[0].cells,function(h,i){
    h.addEventListener('click',function(){sort(i,h.getAttribute('data-dir')==='asc'?'desc':'asc');});});
  window.rsslctlSort=sort;
  var m=/sort=(\\d+)-(asc|desc)/.exec(location.hash), c=/click=([\\d,]+)/.exec(location.hash);
  if(m)sort(parseInt(m[1],10),m[2]);
  if(c)c[1].split(',').forEach(function(i){table.tHead.rows[0].cells[parseInt(i,10)].click();});
})();
"""


def _label(cmp: dict[str, Any], row: dict[str, Any]) -> str:
    parts = [f"{k}={_text(v)}" for k, v in row["recipe"].items()]
    parts += [row["evaluation"], *(f"{k}={_text(v)}" for k, v in row["settings"].items())]
    return " · ".join(parts)


def svg_chart(series: list[tuple[str, str, list[dict[str, Any]]]], x_label: str, y_label: str,
              y_range: tuple[float, float] | None = None, width: int = 520, height: int = 320) -> str:
    """An inline SVG line chart: one polyline (with a ±std band) per (label, colour, points of x/mean/std)."""
    pts = [p for _, _, s in series for p in s]
    if not pts:
        return ""
    left, right, top, bottom = 56, 12, 12, 44
    xs = [p["x"] for p in pts]
    lo_y = min(p["mean"] - (p["std"] or 0) for p in pts)
    hi_y = max(p["mean"] + (p["std"] or 0) for p in pts)
    y0, y1 = y_range or (lo_y, hi_y)
    if y1 <= y0:
        y0, y1 = y0 - 1, y1 + 1
    x0, x1 = min(xs), max(xs)
    if x1 <= x0:
        x0, x1 = x0 - 1, x1 + 1
    sx = lambda x: left + (x - x0) / (x1 - x0) * (width - left - right)  # noqa: E731
    sy = lambda y: top + (1 - (y - y0) / (y1 - y0)) * (height - top - bottom)  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}"'
           ' role="img" font-size="11">',
           f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" fill="none" '
           'stroke="#999"/>']
    whole = all(float(x).is_integer() for x in xs)  # epochs: ticks on whole numbers
    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        x = x0 + (x1 - x0) * i / 4
        if whole:
            x = round(x)
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{left - 4}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.3g}</text>')
        out.append(f'<text x="{sx(x):.1f}" y="{height - bottom + 14}" text-anchor="middle">{x:.3g}</text>')
    out.append(f'<text x="{(left + width - right) / 2:.0f}" y="{height - 8}" text-anchor="middle">'
               f'{html.escape(x_label)}</text>')
    out.append(f'<text transform="translate(14 {(top + height - bottom) / 2:.0f}) rotate(-90)" text-anchor="middle">'
               f'{html.escape(y_label)}</text>')
    for label, color, s in series:
        if any(p["std"] for p in s):
            band = [(sx(p["x"]), sy(p["mean"] + (p["std"] or 0))) for p in s]
            band += [(sx(p["x"]), sy(p["mean"] - (p["std"] or 0))) for p in reversed(s)]
            out.append(f'<polygon points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in band)}" fill="{color}" '
                       'fill-opacity="0.15" stroke="none"/>')
        line = " ".join(f"{sx(p['x']):.1f},{sy(p['mean']):.1f}" for p in s)
        out.append(f'<polyline points="{line}" fill="none" stroke="{color}" stroke-width="2">'
                   f'<title>{html.escape(label)}</title></polyline>')
        out += [f'<circle cx="{sx(p["x"]):.1f}" cy="{sy(p["mean"]):.1f}" r="3" fill="{color}"/>' for p in s]
    return "\n".join(out + ["</svg>"])


def _legend(items: list[tuple[str, str]]) -> str:
    return "<div>" + "<br>".join(f'<span class="swatch" style="background:{c}"></span>{html.escape(t)}'
                                 for t, c in items) + "</div>"


def html_page(cmp: dict[str, Any]) -> str:
    """One offline HTML file: the sortable table, then the ε-curves and training curves (mean ± std over seeds)."""
    head = [*_header(cmp), *cmp["figures"]]
    lead = len(head) - len(cmp["figures"])
    color = {id(r): COLORS[i % len(COLORS)] for i, r in enumerate(cmp["rows"])}
    rows = []
    for row in cmp["rows"]:
        cells = [f'<td><span class="swatch" style="background:{color[id(row)]}"></span>{html.escape(c)}</td>'
                 if i == 0 else f"<td>{html.escape(c)}</td>" for i, c in enumerate(_lead(cmp, row))]
        cells[lead - 1] = f'<td class="num" data-sort="{len(row["seeds"])}">{len(row["seeds"])}</td>'
        for f in cmp["figures"]:
            s = row["figures"].get(f)
            if not s:
                cells.append('<td class="num" data-sort="">–</td>')
                continue
            ci = f'<br><span class="ci">[{s["ci"][0]:.2f}, {s["ci"][1]:.2f}]</span>' if s["ci"] else ""
            main = f"{s['mean']:.2f}" + (f" ± {s['std']:.2f}" if s["std"] is not None else "")
            cells.append(f'<td class="num" data-sort="{s["mean"]!r}">{main}{ci}</td>')
        rows.append(f'<tr data-label="{html.escape(_label(cmp, row))}" title="{html.escape(", ".join(row["runs"]))}">'
                    + "".join(cells) + "</tr>")
    charts = []
    eps = [(_label(cmp, r), color[id(r)], r["eps_curve"]) for r in cmp["rows"] if r["eps_curve"]]
    if eps:
        unit = next(r["eps_unit"] for r in cmp["rows"] if r["eps_curve"])
        charts.append(("accuracy vs ε (PGD, mean ± std over seeds)",
                       svg_chart(eps, unit, "accuracy (%)", (0, 100)), eps))
    seen: dict[str, Any] = {}
    for r in cmp["rows"]:  # one training curve per group of runs, not per evaluation of it
        if r["training"]:
            seen.setdefault(json.dumps(r["recipe"], default=str) + str(r["runs"]), (r, color[id(r)]))
    train = [(" · ".join(f"{k}={_text(v)}" for k, v in r["recipe"].items()) or "runs", c, r["training"])
             for r, c in seen.values()]
    if train:
        charts.append(("pretraining loss per epoch (mean ± std over seeds)", svg_chart(train, "epoch", "loss"), train))
    figures = "".join(f'<figure class="chart"><figcaption>{html.escape(t)}</figcaption>{svg}'
                      f'{_legend([(s[0], s[1]) for s in series])}</figure>' for t, svg, series in charts)
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in cmp["notes"])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>rsslctl compare</title>
<style>{_CSS}</style></head><body>
<h1>rsslctl compare</h1>
<p>{html.escape(_caption(cmp))}. Click a column to sort.</p>
<table id="compare"><thead><tr>{"".join(f"<th>{html.escape(h)}</th>" for h in head)}</tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table>
{f'<ul class="notes">{notes}</ul>' if notes else ''}
<div class="charts">{figures}</div>
<script>{_JS}</script>
</body></html>
"""


WRITERS: dict[str, Callable[[dict[str, Any]], str]] = {"markdown": markdown, "csv": csv_text, "json": json_text,
                                                       "latex": latex, "html": html_page}
