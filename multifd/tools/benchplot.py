"""multifd-bench --plot: the results as a PNG (matplotlib, an optional extra: pip install
multifd[plot]; multifd-bench says so in one line when it is missing).

One panel per mode (file, discard): GB/s against the channel count, a line per image and TLS
setting, with the baselines of the same run drawn as dashed reference lines (the copier for
each image and TLS setting, iperf3). With --live-rates, a last panel: the measured downtime
against the dirty rate, a line per channel count (dashed: QEMU's own live migration at the same
rates, where --qemu ran it).
"""

from __future__ import annotations


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    points = result["points"]
    modes = list(dict.fromkeys(p["mode"] for p in points))
    panels = len(modes) + (1 if result.get("live") else 0)
    fig, axes = plt.subplots(1, max(panels, 1), figsize=(6 * max(panels, 1), 4.5),
                             squeeze=False)
    axes = axes[0]
    for ax, mode in zip(axes, modes):
        series = {}
        for p in points:
            if p["mode"] != mode:
                continue
            name = f"{p['image']}{' TLS' if p['tls'] else ''}"
            series.setdefault(name, []).append(p)
        for i, (name, ps) in enumerate(sorted(series.items())):
            ps.sort(key=lambda p: p["channels"])
            xs = [p["channels"] for p in ps]
            color = f"C{i}"
            ax.plot(xs, [p["multifd_gbps"] or float("nan") for p in ps], "o-", color=color,
                    label=f"multifd {name}")
            ax.plot(xs, [p["copier_gbps"] or float("nan") for p in ps], "--", color=color,
                    alpha=0.6, label=f"copier {name}")
        iperf = sorted({(p["channels"], p["iperf3_gbps"]) for p in points
                        if p["mode"] == mode and p["iperf3_gbps"]})
        if iperf:
            ax.plot([x for x, _ in iperf], [y for _, y in iperf], ":", color="black",
                    label="iperf3 (raw TCP)")
        ax.set_title(f"into {'a new file' if mode == 'file' else 'nothing (--discard)'}")
        ax.set_xlabel("channels")
        ax.set_ylabel("GB/s (1e9 image bytes/s, whole sender run)")
        ax.set_xscale("log", base=2)
        counts = sorted({p["channels"] for p in points})
        ax.set_xticks(counts, [str(n) for n in counts])
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    if result.get("live"):
        ax = axes[len(modes)]
        for i, live in enumerate(result["live"]):
            rows = [r for r in live["live"] if r.get("downtime") is not None]
            ax.plot([r["dirty_rate"] / 1e6 for r in rows], [r["downtime"] * 1e3 for r in rows],
                    "o-", color=f"C{i}", label=f"N={live['channels']} ({live['pattern']})")
            theirs = [r for r in live["live"] if r.get("qemu", {}).get("downtime") is not None]
            if theirs:
                ax.plot([r["dirty_rate"] / 1e6 for r in theirs],
                        [r["qemu"]["downtime"] * 1e3 for r in theirs], "s--", color=f"C{i}",
                        alpha=0.7, label=f"QEMU N={live['channels']}")
        ax.set_title("live precopy: downtime")
        ax.set_xlabel("dirty rate (MB/s)")
        ax.set_ylabel("downtime (ms; multifd: pause to DONE, QEMU: its own)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"multifd-bench, {result['size'] / (1 << 30):g} GiB, {result['cpu']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
