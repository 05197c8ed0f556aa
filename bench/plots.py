"""PNG plots of the loop, preemption and resume benchmarks, written under docs/ by `python -m bench --write`."""

from __future__ import annotations

import os
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DOCS = os.path.join(os.path.dirname(__file__), "..", "docs")


def _save(figure, name: str, directory: str | None) -> str:
    os.makedirs(directory or DOCS, exist_ok=True)
    path = os.path.join(directory or DOCS, name)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def flush(trials, directory: str | None = None) -> str:
    """Notice-to-commit against the raw write, per store and checkpoint size (medians)."""
    groups = list(dict.fromkeys((t.store, round(t.megabytes)) for t in trials))
    series = [("raw fs.pipe", "raw_write", "#9e9e9e"), ("raw fs.pipe + fsync", "raw_write_fsync", "#616161"),
              ("flush: notice → committed (run's log)", "flush_logged", "#1f77b4"),
              ("signal sent → process exited", "signal_to_exit", "#aec7e8")]
    figure, axis = plt.subplots(figsize=(8, 1.6 + 0.9 * len(groups)))
    height = 0.8 / len(series)
    for i, (label, key, color) in enumerate(series):
        values = []
        for store, size in groups:
            group = [getattr(t, key) for t in trials if (t.store, round(t.megabytes)) == (store, size)]
            values.append(statistics.median(group) if None not in group else 0.0)
        positions = [g + (i - (len(series) - 1) / 2) * height for g in range(len(groups))]
        axis.barh(positions, values, height=height, label=label, color=color)
    axis.set_yticks(range(len(groups)), [f"{store}\n{size} MB" for store, size in groups])
    axis.invert_yaxis()
    axis.set_xlabel("seconds (median)")
    axis.set_title("Preemption: notice to committed checkpoint vs a raw write of the same bytes", fontsize=10)
    axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=8)
    return _save(figure, "bench_preemption_flush.png", directory)


def reruns(results, directory: str | None = None) -> str:
    """Steps re-run after each interruption of the shared schedule, per method, one panel per epoch length."""
    sizes = list(dict.fromkeys(r.steps_per_epoch for r in results))
    figure, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 4), squeeze=False)
    colors = ["#2ca02c", "#1f77b4", "#ff7f0e", "#d62728"]
    for axis, size in zip(axes[0], sizes):
        group = [r for r in results if r.steps_per_epoch == size]
        width = 0.8 / len(group)
        for i, (r, color) in enumerate(zip(group, colors)):
            xs = [k + (i - (len(group) - 1) / 2) * width for k in range(len(r.reruns))]
            axis.bar(xs, r.reruns, width=width, color=color, label=f"{r.method} (total {sum(r.reruns)})")
            if not any(r.reruns):
                axis.plot(xs, [0] * len(xs), "o", color=color, markersize=4)
        axis.set_xticks(range(len(group[0].reruns)), [f"#{k + 1}\nstep {s}" for k, s in enumerate(group[0].schedule)],
                        fontsize=8)
        axis.set_ylabel("steps trained again")
        axis.set_title(f"{size} steps/epoch, {len(group[0].schedule)} interruptions")
        axis.legend(fontsize=7, loc="upper left")
    figure.suptitle("Steps re-run per preemption, same seeded schedule for every method")
    return _save(figure, "bench_preemption_reruns.png", directory)


def restarts(trials, directory: str | None = None) -> str:
    """Process start to the run's first line, and to the first trained step: fresh start vs resume."""
    from matplotlib.patches import Patch

    keys = list(dict.fromkeys((t.store, t.megabytes, t.kind) for t in trials))
    figure, axis = plt.subplots(figsize=(8, 1.8 + 0.45 * len(keys)))
    colors = {"resume": "#1f77b4", "fresh": "#9e9e9e"}
    for row, (store, size, kind) in enumerate(keys):
        group = [t for t in trials if (t.store, t.megabytes, t.kind) == (store, size, kind)]
        to_line = statistics.median(t.to_line for t in group)
        to_step = statistics.median(t.to_first_step for t in group)
        axis.barh(row, to_line, color=colors[kind], alpha=0.45)
        axis.barh(row, to_step - to_line, left=to_line, color=colors[kind])
    axis.set_yticks(range(len(keys)), [f"{store}, {size:.0f} MB: {kind}" for store, size, kind in keys], fontsize=8)
    axis.invert_yaxis()
    axis.set_xlabel("seconds from process start (median)")
    axis.legend(handles=[Patch(color="#9e9e9e", alpha=0.45, label="start → \"starting run\" / \"resuming run\" line"),
                         Patch(color="#9e9e9e", label="→ end of the first trained step")], fontsize=8,
                loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    axis.set_title("Restart to first trained step: fresh start vs resume (blue)", fontsize=10)
    return _save(figure, "bench_resume_restart.png", directory)


def data(trials, directory: str | None = None) -> str:
    """Time to the first batch when an epoch starts at batch b, per source and epoch length."""
    figure, axis = plt.subplots(figsize=(7, 4.2))
    styles = {"arrays": ["-o", "-^"], "PyDataset": ["-.P", "-.*"], "tf.data": ["--s", "--v"], "skip": [":D", ":x"]}
    keys = list(dict.fromkeys((t.source, t.batches) for t in trials))
    used: dict[str, int] = {}
    for source, batches in keys:
        family = ("arrays" if source.startswith("numpy") else "PyDataset" if "PyDataset" in source
                  else "skip" if "`skip`" in source else "tf.data")
        style = styles[family][used.get(family, 0) % 2]
        used[family] = used.get(family, 0) + 1
        starts = sorted({t.start_batch for t in trials if (t.source, t.batches) == (source, batches)})
        values = [statistics.median(t.seconds for t in trials if (t.source, t.batches, t.start_batch)
                                    == (source, batches, s)) for s in starts]
        axis.plot(starts, values, style, label=f"{source.split(' (')[0]}, {batches:,} batches/epoch")
    axis.set_xlabel("start batch b (batches the resumed epoch skips)")
    axis.set_ylabel("seconds to the first batch (median)")
    axis.set_title("Starting an epoch at batch b: random access vs skip", fontsize=10)
    axis.legend(fontsize=8)
    axis.grid(True, alpha=0.3)
    return _save(figure, "bench_resume_data.png", directory)


def loop(results, directory: str | None = None) -> str:
    """Each repetition's steps/s ratio to `fit`, per variant, one panel per model width: the spread
    is the machine's noise, the diamond the ratio of the fastest epochs."""
    from bench.loop_overhead import BASELINE, paired_ratios

    figure, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False, sharey=True)
    for axis, result in zip(axes[0], results):
        names = [name for name in result["rates"] if name != BASELINE]
        for i, name in enumerate(names):
            ratios = paired_ratios(result, name, BASELINE)
            axis.plot([i] * len(ratios), ratios, "o", color="#1f77b4", alpha=0.5, markersize=5)
            axis.plot([i], [statistics.median(ratios)], "_", color="black", markersize=22, markeredgewidth=2)
            axis.plot([i], [result["best"][name] / result["best"][BASELINE]], "D", color="#d62728", markersize=6)
        axis.axhline(1.0, color="#9e9e9e", linewidth=1)
        axis.axhline(0.98, color="#9e9e9e", linewidth=1, linestyle="--")
        axis.set_xticks(range(len(names)), [n.replace("cluster-trainer loop, ", "loop,\n").replace(
            " (background writer)", "").replace("model.fit(x, y) on numpy arrays", "fit(x, y)\non arrays")
            for n in names], fontsize=8)
        axis.set_title(f"MLP width {result['width']}: steps/s ÷ fit's (dots: repetitions, bar: median, "
                       "diamond: fastest epochs)", fontsize=8)
    axes[0][0].set_ylabel("ratio to model.fit (dashed: 0.98 goal)")
    return _save(figure, "bench_loop.png", directory)
