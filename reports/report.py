"""The study report: one self-contained HTML page for Experiments I–IV, built from MLflow only.

    python reports/report.py                      # -> reports/out/index.html (+ reports/out/figures/)
    make report

Runs are found by MLflow queries (reports/study_runs.py says which tags), artifacts are downloaded
by run id; nothing reads run folders. Every figure names the runs behind it and their config; each
experiment gets a findings paragraph generated from the logged numbers. An experiment without
runs gets a one-line notice with the command that fills it. Images are embedded in the page (it
opens offline and inside MLflow's artifact viewer) and also written beside it in figures/; the page
and figures are logged as the artifacts of a `report` run in MLflow experiment `report`.
"""

from __future__ import annotations

import argparse
import base64
import html
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

import mlflow  # noqa: E402
import sections  # noqa: E402
import study_runs  # noqa: E402

from research.atomic import write_text  # noqa: E402
from research.tracking import Tracker, tracking_uri  # noqa: E402
from research.figures import style_colors  # noqa: E402

REPORT_EXPERIMENT = "report"
CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
figure{margin:1.2em 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.9em;color:#444}.notice{background:#fff6d5;border-left:4px solid #e0b000;padding:.4em .8em}
.findings{background:#f3f7fb;border-left:4px solid #0173b2;padding:.4em .8em}
table{border-collapse:collapse;font-size:.8em}td,th{border:1px solid #ddd;padding:2px 6px;text-align:left}
code{font-size:.9em}details{margin:.3em 0 1em}"""


def collect(args, out: Path) -> list[sections.Section]:
    """The four sections, each from its experiment's newest runs."""
    styles = study_runs.find_styles(args.styles_experiment)
    blend = study_runs.find_blend(args.blend_experiment)
    names = [r.tags["style"] for r in styles.runs]
    for run in blend.runs:  # blend styles join the palette so a style keeps its colour in Exp IV
        names += [run.tags.get("style_a", "A"), run.tags.get("style_b", "B")]
    colors = style_colors(names)
    found = [styles, study_runs.find_search(args.search_experiment, args.study_name),
             study_runs.find_compare(args.compare_experiment), blend]
    built = [sections.styles_section(styles, colors, out), sections.search_section(found[1], out),
             sections.compare_section(found[2], out), sections.blend_section(blend, colors, out)]
    for section, experiment in zip(built, found):
        section.table_link = study_runs.key_columns_link(experiment)
    return built


# ─── HTML ───────────────────────────────────────────────────────────────────────────────────
def esc(value) -> str:
    return html.escape(str(value))


def config_html(runs: list) -> str:
    shared, varying = sections.config_of(runs)
    ids = "".join(f"<li><code>{esc(r.run_id)}</code> {esc(r.name)} ({esc(r.status.lower())})</li>" for r in runs)
    text = f"<details><summary>MLflow runs ({len(runs)}) and config</summary><ul>{ids}</ul>"
    if shared:
        text += "<p>Shared: " + ", ".join(f"<code>{esc(k)}={esc(v)}</code>" for k, v in shared.items()) + "</p>"
    keys = sorted({k for v in varying.values() for k in v})
    if keys:
        head = "".join(f"<th>{esc(k)}</th>" for k in ["run"] + keys)
        body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in [name] + [v.get(k, '-') for k in keys]) + "</tr>"
                       for name, v in varying.items())
        text += f"<table><tr>{head}</tr>{body}</table>"
    return text + "<p>Full config: the <code>config.json</code> artifact of each run.</p></details>"


def figure_html(fig: sections.Figure, page_dir: Path) -> str:
    data = base64.b64encode(fig.path.read_bytes()).decode()
    rel = fig.path.relative_to(page_dir).as_posix()
    return (f'<figure><a href="{esc(rel)}"><img src="data:image/png;base64,{data}" alt="{esc(fig.caption)}"></a>'
            f"<figcaption>{esc(fig.caption)} <a href=\"{esc(rel)}\">{esc(rel)}</a></figcaption>"
            f"{config_html(fig.runs)}</figure>")


def section_html(section: sections.Section, page_dir: Path) -> str:
    table = (f' Its runs table with the key columns (after <code>make ui</code>): <a href="{esc(section.table_link)}">'
             f"{esc(section.table_link)}</a>." if section.table_link else "")
    parts = [f'<section id="{section.key}"><h2>{esc(section.title)}</h2>',
             f"<p>MLflow experiment <code>{esc(section.experiment)}</code>.{table}</p>"]
    parts += [f'<p class="notice">{esc(n)}</p>' for n in section.notices]
    parts += [figure_html(f, page_dir) for f in section.figures]
    if section.findings:
        parts.append('<div class="findings"><h3>Findings</h3><p>' + " ".join(esc(s) for s in section.findings)
                     + "</p></div>")
    return "\n".join(parts) + "</section>"


def page(all_sections: list[sections.Section], page_dir: Path, uri: str) -> str:
    toc = "".join(f'<li><a href="#{s.key}">{esc(s.title)}</a></li>' for s in all_sections)
    body = "\n".join(section_html(s, page_dir) for s in all_sections)
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>LoRA style study report</title>"
            f"<style>{CSS}</style></head><body><h1>LoRA style study: Experiments I–IV</h1>"
            f"<p>Generated {esc(time.strftime('%Y-%m-%d %H:%M:%S %Z'))} from MLflow <code>{esc(uri)}</code>. "
            f"Every number carries its 95% interval and n; findings are generated from the logged numbers.</p>"
            f"<ul>{toc}</ul>{body}</body></html>")


# ─── MLflow record of the report ────────────────────────────────────────────────────────────
def log_report(index: Path, figures: Path, all_sections: list[sections.Section]) -> str:
    sources = {s.key: ",".join(r.run_id for f in s.figures for r in f.runs) for s in all_sections}
    tracker = Tracker(index.parent, REPORT_EXPERIMENT, "report", {"experiment_kind": "report"})
    tracker.log_params({f"source_runs.{k}": (v[:480] + "…") if len(v) > 480 else v for k, v in sources.items()})
    tracker.mlflow.log_artifact(str(index))
    tracker.mlflow.log_artifacts(str(figures), artifact_path="figures")
    tracker.finish()
    return tracker.run_id


def build(args) -> Path:
    mlflow.set_tracking_uri(tracking_uri())
    out = Path(args.out_dir)
    figures = out / "figures"
    shutil.rmtree(figures, ignore_errors=True)  # a figure from an earlier render must not outlive its data
    figures.mkdir(parents=True)
    all_sections = collect(args, figures)
    index = out / "index.html"
    write_text(index, page(all_sections, out, study_runs.safe_uri(tracking_uri())))
    if not args.no_tracking:
        run_id = log_report(index, figures, all_sections)
        print(f"logged to MLflow run {run_id} (experiment {REPORT_EXPERIMENT})")
    for s in all_sections:
        print(f"{s.title}: {len(s.figures)} figure(s)" + "".join(f"\n  {n}" for n in s.notices))
    return index


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python reports/report.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for kind, name in study_runs.DEFAULT_EXPERIMENTS.items():
        parser.add_argument(f"--{kind}-experiment", f"--{kind}_experiment", dest=f"{kind}_experiment", default=name,
                            help=f"MLflow experiment of the {kind} runs (default {name})")
    parser.add_argument("--study-name", "--study_name", dest="study_name", default="",
                        help="Exp II study (default: the newest)")
    parser.add_argument("--out-dir", "--out_dir", dest="out_dir", default="reports/out",
                        help="folder for index.html and figures/")
    parser.add_argument("--no-tracking", action="store_true", help="write the page only, no `report` MLflow run")
    return parser


def main(argv: list[str] | None = None) -> int:
    index = build(build_parser().parse_args(argv))
    print(f"wrote {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
