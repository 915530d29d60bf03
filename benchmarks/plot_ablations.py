"""Plot the built-in ablation sweeps (benchmarks/results/ablations/*.csv) as PNGs for the README.

    .venv/bin/python benchmarks/plot_ablations.py
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "ablations"
OUT = Path(__file__).resolve().parents[1] / "docs" / "ablations"
META = {"seed", "task", "accuracy", "average", "l1", "l1_average", "key", "point"}


def swept(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c not in META and df[c].nunique() > 1]


def plot(name: str, df: pd.DataFrame) -> Path:
    axes = swept(df)
    x = axes[0]
    other = axes[1] if len(axes) > 1 else None
    has_l1 = "l1" in df and df["l1"].notna().any()
    fig, ax = plt.subplots(1, 2 if has_l1 else 1, figsize=(11 if has_l1 else 6, 4), squeeze=False)
    groups = df.groupby(other) if other else [(None, df)]
    for label, g in groups:
        per_point = g.groupby([x, "task"], sort=False)["accuracy"].mean().unstack()
        avg = per_point.mean(axis=1)
        xs = [str(v) for v in avg.index]
        ax[0, 0].plot(xs, avg.values, marker="o", linewidth=2.5, label=f"average{'' if label is None else f' ({other}={label})'}")
        if other is None:
            for task in per_point.columns:
                ax[0, 0].plot(xs, per_point[task].values, linewidth=0.8, alpha=0.5, label=task)
        if has_l1:
            l1 = g.groupby(x, sort=False)["l1"].mean()
            ax[0, 1].plot([str(v) for v in l1.index], l1.values, marker="o", label="" if label is None else f"{other}={label}")
    ax[0, 0].set(xlabel=x, ylabel="accuracy (%)", title=f"{name}: accuracy")
    ax[0, 0].legend(fontsize=7, ncol=2)
    if has_l1:
        ax[0, 1].set(xlabel=x, ylabel="mean L1 to individual", title=f"{name}: representation bias")
        if other:
            ax[0, 1].legend(fontsize=7)
    fig.tight_layout()
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main() -> None:
    for csv in sorted(RESULTS.glob("*.csv")):
        print(plot(csv.stem, pd.read_csv(csv)))


if __name__ == "__main__":
    main()
