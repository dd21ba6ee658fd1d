"""Where a run's time went: seconds and bytes per stage of the update, from ``log.jsonl``.

Each record holds the mean seconds per update of every stage over its interval
(``seconds/<stage>``, rank 0's wall time) and rank 0's bytes sent and received in the
interval's collectives (``bytes_sent``, ``bytes_received``, counted by the communicators'
traffic model).  :func:`stage_rows` weights each interval by its updates, so the table is the
whole run's mean per update; :func:`format_table` prints it at the end of a run and
:func:`plot_stages` draws it (``stages.png``).
"""
import os

STAGE_PREFIX = "seconds/"


def stage_rows(records):
    """``(rows, totals)``: per stage ``{stage, seconds, share}`` (mean seconds per update and
    its share of the summed stages), and ``{updates, seconds, bytes_sent, bytes_received}``
    (means per update)."""
    previous, updates = 0, 0
    seconds, sent, received = {}, 0, 0
    for record in records:
        count = record["iteration"] - previous
        previous = record["iteration"]
        if count <= 0 or not any(key.startswith(STAGE_PREFIX) for key in record):
            continue
        updates += count
        for key, value in record.items():
            if key.startswith(STAGE_PREFIX):
                stage = key[len(STAGE_PREFIX):]
                seconds[stage] = seconds.get(stage, 0.0) + value * count
        sent += record.get("bytes_sent", 0)
        received += record.get("bytes_received", 0)
    if not updates:
        return [], {"updates": 0, "seconds": 0.0, "bytes_sent": 0.0, "bytes_received": 0.0}
    step = sum(seconds.values()) / updates
    rows = [{"stage": stage, "seconds": total / updates,
             "share": total / updates / step if step else 0.0}
            for stage, total in sorted(seconds.items())]
    return rows, {"updates": updates, "seconds": step, "bytes_sent": sent / updates,
                  "bytes_received": received / updates}


def format_table(records):
    """The table printed at the end of a run (empty string without stage timings)."""
    rows, totals = stage_rows(records)
    if not rows:
        return ""
    lines = [f"where an update's time went (rank 0, mean of {totals['updates']} updates):",
             f"  {'stage':<40} {'ms':>9} {'share':>7}"]
    lines += [f"  {row['stage']:<40} {row['seconds'] * 1e3:9.2f} {row['share']:7.1%}"
              for row in rows]
    lines.append(f"  {'update':<40} {totals['seconds'] * 1e3:9.2f} {1:7.1%}")
    lines.append(f"  bytes per update (rank 0, collectives): sent {totals['bytes_sent']:,.0f}, "
                 f"received {totals['bytes_received']:,.0f}")
    return "\n".join(lines)


def plot_stages(runs, out_dir, title=None):
    """A bar per run of its mean seconds per update, stacked by stage; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = [(label, stage_rows(records)[0]) for label, records in runs]
    stages = sorted({row["stage"] for _, rows in tables for row in rows})
    figure, axis = plt.subplots(figsize=(7, 1.2 + 0.6 * len(tables)))
    for index, stage in enumerate(stages):
        left = [sum(row["seconds"] * 1e3 for row in rows if row["stage"] < stage)
                for _, rows in tables]
        width = [next((row["seconds"] * 1e3 for row in rows if row["stage"] == stage), 0.0)
                 for _, rows in tables]
        axis.barh([label for label, _ in tables], width, left=left, color=f"C{index}",
                  label=stage)
    axis.set_xlabel("ms per update (rank 0)")
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    axis.set_title(title or "where an update's time went")
    figure.tight_layout()
    path = os.path.join(out_dir, "stages.png")
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path
