"""End-of-run report: summary.json, a printed summary and the loss-curve PNG."""
from __future__ import annotations

import json
from pathlib import Path


def write_summary(run_dir: Path, summary: dict) -> Path:
    path = run_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path


def format_summary(summary: dict) -> str:
    lines = ["run summary"]
    for key, value in summary.items():
        shown = f"{value:.4g}" if isinstance(value, float) else value
        lines.append(f"  {key:<22} {shown}")
    return "\n".join(lines)


def plot_loss_curve(run_dir: Path, history: list[dict], evals: list[dict]) -> Path | None:
    """loss_curve.png: training loss per step, and the eval loss where it was measured."""
    if not history:
        return None
    # A bare Figure, not pyplot: pyplot would need a backend switch, which changes the caller's
    # global state (a notebook's inline plots stop showing).
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train loss", linewidth=1)
    if evals:
        ax.plot([e["step"] for e in evals], [e["eval_loss"] for e in evals], "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / supervised token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = run_dir / "loss_curve.png"
    fig.savefig(path, dpi=120)
    return path
