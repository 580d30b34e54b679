"""Plot of a CaliSr run's stable-rank log: SR(W_LFT) and SR(W_FFT) per group over the steps, switches marked."""

from __future__ import annotations

import json
import os


def plot_sr_trajectories(log_path: str | os.PathLike, png_path: str | os.PathLike, title: str | None = None) -> str:
    """Plot SR(W_LFT) and SR(W_FFT) per group over the steps (and their relative difference), switches marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = []
    with open(log_path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if line:
                events.append(json.loads(line))
    measures = [e for e in events if e.get("event") == "measure"]
    switches = [e for e in events if e.get("event") == "switch"]
    groups = list(dict.fromkeys(e["group"] for e in measures + switches))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, g in enumerate(groups):
        color = colors[i % len(colors)]
        rows = [e for e in measures if e["group"] == g]
        steps = [e["step"] for e in rows]
        if rows:
            top.plot(steps, [e["sr_fft"] for e in rows], "-", color=color, label=f"{g}: SR(W_FFT)")
            top.plot(steps, [e["sr_lft"] for e in rows], "--", color=color, label=f"{g}: SR(W_LFT)")
            rel = [(e["sr_fft"] - e["sr_lft"]) / abs(e["sr_fft"]) if e["sr_fft"] else 0.0 for e in rows]
            bottom.plot(steps, rel, "o-", color=color, markersize=3, label=g)
        for e in switches:
            if e["group"] == g:
                for ax in (top, bottom):
                    ax.axvline(e["step"], color=color, linestyle=":", linewidth=1.5)
                top.annotate(
                    f"{g} -> LFT",
                    (e["step"], 1.0),
                    xycoords=("data", "axes fraction"),
                    color=color,
                    rotation=90,
                    va="top",
                    ha="right",
                    fontsize=8,
                )
    bottom.axhline(0.0, color="black", linewidth=0.8)
    top.set_ylabel("aggregated stable rank")
    bottom.set_ylabel("(SR_FFT - SR_LFT) / SR_FFT")
    bottom.set_xlabel("optimizer step")
    if measures:
        top.legend(fontsize=7, ncol=2)
        bottom.legend(fontsize=7)
    top.set_title(title or "CaliSr: stable rank of W_LFT vs W_FFT (> 0 below: LFT has the lower stable rank)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return os.fspath(png_path)
