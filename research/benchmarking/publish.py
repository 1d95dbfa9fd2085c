"""What `python -m research.bench` leaves behind: results.json, results.md (tables), growth.png, an MLflow run.

results.md is written from results.json alone, so the committed tables can be rebuilt from the
committed numbers: `python -m research.benchmarking.publish reports/bench/results.json`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from research.atomic import write_json
from research.figures import point_and_interval
from research.tracking import Tracker

ARMS = ("ours", "reference")


def fmt(s: dict | None, scale: float = 1.0, digits: int = 2) -> str:
    """'mean [lo, hi] (n)' of a summary dict, scaled."""
    if not s:
        return "—"
    lo, hi = s["ci95"]
    return f"{s['mean'] * scale:.{digits}f} [{lo * scale:.{digits}f}, {hi * scale:.{digits}f}] (n={s['n']})"


def markdown(report: dict, before: dict | None = None) -> str:
    m, st, tr = report["machine"], report["setup"], report["train"]
    gpu = m["device"] == "cuda"
    lines = [
        "# `make bench` results", "",
        f"Written by `python -m research.bench` on {m['date']}. Each cell: mean [95% t-interval] (n).", "",
        f"- device: {m['device']} ({m['device_name']}), {m['threads']} thread(s) of {m['cpu_count']} cores; "
        f"torch {m['torch']}",
        f"- load average (1, 5, 15 min) before: {', '.join(f'{x:.2f}' for x in m['load_average'])}; after: "
        f"{', '.join(f'{x:.2f}' for x in m['load_average_after'])}"
        + (" — a loaded, shared machine: absolute numbers are low and noisy; the interleaved ratios are the "
           "robust part" if max(m["load_average"] + m["load_average_after"]) >= 1.0 else ""),
        f"- model {st['model']}, recipe {st['config']}: {st['resolution']} px, batch {st['batch_size']}, "
        f"LoRA rank {st['rank']} (alpha {st['lora_alpha']:g}) on {st['unet_target_modules']}, "
        f"{st['dataset_size']} images, precision {st['precision']}",
        f"- {st['rounds']} timed rounds of {st['steps_per_round']} steps per arm after one warm-up round, "
        "arms alternating which goes first",
    ]
    if not gpu:
        lines.append("- GPU: not measured this time (no GPU was available); the SD 1.5 path runs with "
                     "`python -m research.bench --model sd15 --device cuda --resolution 512`")
    lines += ["", "## Training: ours vs the reference loop", "",
              "| | ours | reference (diffusers-example style) |", "|---|---|---|"]
    rows = [("samples/s", "samples_per_second", 1, 2), ("time to first step, s", "time_to_first_step_s", 1, 2),
            ("peak memory, MB", "peak_memory_mb", 1, 0), ("MFU (own FLOPs), %", "mfu", 100, 3),
            ("MFU (training's FLOPs), %", "useful_mfu", 100, 3)]
    for label, key, scale, digits in rows:
        lines.append(f"| {label} | {fmt(tr['ours'].get(key), scale, digits)} | {fmt(tr['reference'].get(key), scale, digits)} |")
    lines.append(f"| GFLOP per sample (FlopCounterMode, one step) | {tr['ours']['flops_per_sample'] / 1e9:.3f} | "
                 f"{tr['reference']['flops_per_sample'] / 1e9:.3f} |")
    limit = report["limit"]["matmul_flops_per_second"]
    lines += ["", f"- speed-up ours / reference (paired by round): **{fmt(tr['speedup'])}**",
              _memory_line(tr),
              f"- machine limit: dense {limit['dtype']} {limit['size']}² matmul {fmt(limit, 1e-9, 1)} GFLOP/s",
              "- MFU (own FLOPs) counts each loop's own step, the reference's per-step VAE and text encoder "
              "included; MFU (training's FLOPs) counts only the work training needs (our step), for both."]
    if "sampling" in report or "evaluation" in report:
        lines += ["", "## Sampling and evaluation"]
    if "sampling" in report:
        s = report["sampling"]
        lines += ["", f"- sampling: {fmt(s)} images/s ({s['sampler']}, {s['num_inference_steps']} steps, CFG "
                      f"{s['guidance_scale']:g}, batch {s['batch_size']}, our adapter loaded)"]
    if "evaluation" in report:
        e = report["evaluation"]
        lines += ["", f"- evaluation: {fmt(e)} images/s ({e['images_per_arm']} images per arm, both arms scored; "
                      f"metrics {', '.join(e['metrics'])})"]
    if before:
        lines += _before_table(before, report)
    if "growth" in report:
        lines += _growth_table(report["growth"])
    return "\n".join(lines) + "\n"


def _memory_line(tr: dict) -> str:
    if "peak_memory_mb" not in tr["ours"]:
        return "- peak memory: not measured this run"
    ours, ref = tr["ours"]["peak_memory_mb"], tr["reference"]["peak_memory_mb"]
    return (f"- peak memory ours / reference: {ours['mean'] / ref['mean']:.2f} (each arm in a fresh process that "
            f"starts at {ours['process_start_mb']:.0f} MB with the libraries imported)")


def _before_table(before: dict, after: dict) -> list[str]:
    b, a = before["train"], after["train"]
    lines = ["", "## Before / after the hot-loop change", "",
             f"Before: {before['machine']['date']} (load {before['machine']['load_average'][0]:.2f}); "
             f"after: {after['machine']['date']} (load {after['machine']['load_average'][0]:.2f}). The "
             "reference loop did not change, so its column shows how the machine itself moved.", "",
             "| | before | after |", "|---|---|---|"]
    for label, get in [("ours samples/s", lambda t: t["ours"]["samples_per_second"]),
                       ("reference samples/s", lambda t: t["reference"]["samples_per_second"]),
                       ("speed-up ours / reference", lambda t: t["speedup"]),
                       ("ours time to first step, s", lambda t: t["ours"]["time_to_first_step_s"]),
                       ("ours peak memory, MB", lambda t: t["ours"].get("peak_memory_mb"))]:
        lines.append(f"| {label} | {fmt(get(b))} | {fmt(get(a))} |")
    return lines


def _growth_table(growth: dict) -> list[str]:
    lines = ["", "## Cost growth: seconds per step", "",
             "One knob moved at a time from the base point; each cell is the mean over the timed steps "
             "(the first step excluded) with its interval; first-step time (load, cache, first step) after it. "
             "Each point is one run per arm, back to back: compare the two arms within a row; rows ran minutes "
             "apart, so on a loaded machine the load moves between rows (the base point appears in every knob).",
             "", "| knob | value | ours s/step | reference s/step | ours first step, s | reference first step, s |",
             "|---|---|---|---|---|---|"]
    for axis, points in growth.items():
        for value, arms in _by_value(points):
            lines.append(f"| {axis} | {value} | {fmt(arms['ours']['seconds_per_step'], digits=3)} | "
                         f"{fmt(arms['reference']['seconds_per_step'], digits=3)} | "
                         f"{arms['ours']['time_to_first_step_s']:.2f} | {arms['reference']['time_to_first_step_s']:.2f} |")
    lines += ["", "![growth](growth.png)"]
    return lines


def _by_value(points: dict) -> list[tuple[str, dict]]:
    """Growth points in numeric order (results.json stores the values as sorted string keys)."""
    return sorted(points.items(), key=lambda kv: float(kv[0]))


def growth_figure(growth: dict, path: Path) -> None:
    """One panel per knob: seconds per step of each arm, points with their 95% intervals."""
    import matplotlib  # deferred: plotting libraries load slowly and results.md needs none of them

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: plotting libraries load only when a figure is drawn
    import seaborn as sns
    from matplotlib.ticker import FormatStrFormatter, NullLocator

    sns.set_theme(style="whitegrid", context="paper")
    colors = dict(zip(ARMS, sns.color_palette("colorblind", 2)))
    fig, axes = plt.subplots(1, len(growth), figsize=(3.2 * len(growth), 3), squeeze=False)
    for ax, (axis, points) in zip(axes[0], growth.items()):
        xs = [float(v) for v, _ in _by_value(points)]
        for arm in ARMS:
            sums = [arms[arm]["seconds_per_step"] for _, arms in _by_value(points)]
            means = [s["mean"] for s in sums]
            point_and_interval(ax, xs, means, [s["ci95"][0] for s in sums], [s["ci95"][1] for s in sums],
                               colors[arm], label=arm)
            ax.plot(xs, means, color=colors[arm], linewidth=1)
        ax.set(xscale="log", yscale="log", xlabel=axis.replace("_", " "), ylabel="seconds per step")
        ax.set_xticks(xs, [str(int(x)) for x in xs])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        lo, hi = ax.get_ylim()
        if hi / lo < 10:  # within one decade there is no major tick to read the scale by: label the minor ones
            ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def mlflow_metrics(report: dict, prefix: str = "") -> dict[str, float]:
    """Every number, with `<key>.ci95_lo` / `<key>.ci95_hi` beside each mean; per-round raw lists left out."""
    flat = {}
    for key, value in report.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and "mean" in value:
            flat[name] = float(value["mean"])
            flat[f"{name}.ci95_lo"], flat[f"{name}.ci95_hi"] = map(float, value["ci95"])
            flat[f"{name}.n"] = float(value["n"])
        elif isinstance(value, dict) and key != "rounds":
            flat.update(mlflow_metrics(value, name + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def publish(report: dict, out_dir: Path, before: str = "", track: bool = True) -> None:
    """results.json, results.md and growth.png in out_dir; the same numbers and files to MLflow (`bench`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "results.json", report)
    if "growth" in report:
        growth_figure(report["growth"], out_dir / "growth.png")
    previous = json.loads(Path(before).read_text()) if before else None
    (out_dir / "results.md").write_text(markdown(report, previous))
    print((out_dir / "results.md").read_text())
    if track:
        m = report["machine"]
        tracker = Tracker(out_dir, "bench", f"bench_{report['setup']['model']}_{m['device']}",
                          {"device": m["device_name"], "threads": str(m["threads"])})
        tracker.log_params({**report["setup"], "device": m["device"], "device_name": m["device_name"],
                            "threads": m["threads"], "load_average": m["load_average"][0]})
        tracker.log_metrics(mlflow_metrics(report))
        tracker.log_folder()
        tracker.finish()
        print(f"MLflow run {tracker.run_id} in experiment bench")


if __name__ == "__main__":  # rebuild results.md and growth.png from a results.json [and the --before one]
    path = Path(sys.argv[1])
    results = json.loads(path.read_text())
    before_path = sys.argv[2] if len(sys.argv) > 2 else ""
    (path.parent / "results.md").write_text(markdown(results, json.loads(Path(before_path).read_text()) if before_path else None))
    if "growth" in results:
        growth_figure(results["growth"], path.parent / "growth.png")
