"""The ratio table (printed) and the plot (PNG) of a results dict from bench/run.py."""

from __future__ import annotations

from pathlib import Path

KINDS = (("murderd", "T_murderd"), ("client", "T_client"), ("http", "T_http"))


def _fmt(value, spec: str = ".2f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def table(results: dict) -> str:
    lines = []
    m = results.get("machine", {})
    lines.append(
        f"machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, "
        f"{m.get('memory_gib', '?')} GiB, {m.get('os', '')}, kernel {m.get('kernel', '')}, "
        f"libtorrent {m.get('libtorrent', '')}"
    )
    swarm = results.get("swarm") or {}
    if swarm:
        first = next(iter(swarm.values()))
        lines.append(
            f"\nswarm: {first['size'] / (1 << 20):.0f} MiB to {first['peers']} peers, "
            f"B = {first['rate_bit'] / 1e6:g} Mbit/s, T_limit = {first['limit']:.2f} s"
        )
        lines.append(f"  {'':10} {'T (s)':>8} {'T/T_limit':>10} {'source upload':>14}")
        for kind, label in KINDS:
            run = swarm.get(kind)
            if run is None:
                continue
            if not run["ok"]:
                lines.append(f"  {label:10} FAILED: {run['error']}")
                continue
            lines.append(
                f"  {label:10} {run['seconds']:8.2f} {run['ratio']:10.2f} "
                f"{run['detail'].get('source_upload_x', 0):13.2f}x"
            )
        murderd, client = swarm.get("murderd"), swarm.get("client")
        if murderd and client and murderd["ok"] and client["ok"]:
            lines.append(f"  T_murderd / T_client = {murderd['seconds'] / client['seconds']:.2f}")
    sweep = results.get("sweep") or []
    if sweep:
        lines.append("\nsweep (murderd):")
        lines.append(
            f"  {'N':>3} {'B (Mbit/s)':>10} {'T (s)':>8} {'T_limit':>8} {'T/T_limit':>10} "
            f"{'cores busy':>10}"
        )
        for run in sweep:
            busy = run.get("detail", {}).get("cores_busy")
            lines.append(
                f"  {run['peers']:3d} {run['rate_bit'] / 1e6:10g} {_fmt(run['seconds']):>8} "
                f"{run['limit']:8.2f} {_fmt(run['ratio']):>10} {_fmt(busy, '.0%'):>10}"
                + ("" if run["ok"] else f"  FAILED: {run['error']}")
            )
        growth = sweep_growth(sweep)
        if growth is not None:
            first, last = sweep[0]["peers"], sweep[-1]["peers"]
            lines.append(f"  (T/T_limit at N={last}) / (at N={first}) = {growth:.2f}")
    seed = results.get("drop_to_seeding")
    if seed:
        lines.append(
            f"\ndrop -> seeding ({seed['size'] / (1 << 30):.2f} GiB): "
            f"{_fmt(seed.get('seconds'))} s, "
            f"sha256sum {_fmt(seed.get('sha256sum_seconds'))} s, ratio {_fmt(seed.get('ratio'))}"
            + (f"  FAILED: {seed['error']}" if seed.get("error") else "")
        )
    tracker = results.get("tracker")
    if tracker:
        lines.append(
            f"\ntracker ({tracker.get('peers', 0):,} peers in {tracker.get('deploys')} deploys):"
        )
        lines.append(
            f"  {'':18} {'burst/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'µs CPU':>7} {'steady/s':>9} "
            f"{'p50 ms':>8} {'p99 ms':>8} {'RSS MiB':>8}"
        )
        for name in ("murder-tracker", "opentracker", "murder-tracker-udp", "opentracker-udp"):
            t = tracker.get(name)
            if not t:
                continue
            if t.get("error"):
                lines.append(f"  {name:18} FAILED: {t['error']}")
                continue
            b, s = t["burst"], t["steady"]
            lines.append(
                f"  {name:18} {b['rate']:9.0f} {b['p50_ms']:8.2f} {b['p99_ms']:8.2f} "
                f"{_fmt(b.get('tracker_cpu_us_per_announce'), '.0f'):>7} "
                f"{s['rate']:9.0f} {s['p50_ms']:8.2f} {s['p99_ms']:8.2f} "
                f"{t['rss'] / (1 << 20):8.1f}"
            )
        for prefix, what in (("", "HTTP"), ("udp_", "UDP")):
            if tracker.get(prefix + "throughput_ratio") is not None:
                lines.append(
                    f"  {what}: murder-tracker / opentracker throughput = "
                    f"{tracker[prefix + 'throughput_ratio']:.2f}, CPU per announce "
                    f"(opentracker's / ours) = {_fmt(tracker.get(prefix + 'cpu_efficiency_ratio'))}"
                )
    mem = results.get("peer_memory")
    if mem:
        lines.append(
            f"\nmurder-peer RSS fetching {mem['size'] / (1 << 30):.2f} GiB: peak "
            f"{_fmt(mem.get('peak_rss', 0) / (1 << 20), '.1f')} MiB (anon "
            f"{_fmt(mem.get('peak_anon', 0) / (1 << 20), '.1f')} MiB, file-backed "
            f"{_fmt(mem.get('peak_file', 0) / (1 << 20), '.1f')} MiB)"
            + (f"  FAILED: {mem['error']}" if mem.get("error") else "")
        )
    lines.append(f"\n{results.get('seconds', 0):.0f} s in all")
    return "\n".join(lines)


def sweep_growth(sweep: list):
    good = [r for r in sweep if r["ok"]]
    if len(good) < 2:
        return None
    return good[-1]["ratio"] / good[0]["ratio"]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    swarm = results.get("swarm") or {}
    colors = {"murderd": "tab:blue", "client": "tab:orange", "http": "tab:red"}
    limit = None
    for kind, label in KINDS:
        run = swarm.get(kind)
        if not run:
            continue
        limit = run["limit"]
        times = sorted(t for t in run["per_host"] if t is not None)
        left.step(
            [0] + times, [0] + list(range(1, len(times) + 1)), where="post",
            color=colors[kind], label=f"{label} ({_fmt(run['ratio'])} x limit)",
        )  # fmt: skip
    if limit:
        left.axvline(limit, color="black", linestyle="--", label=f"T_limit ({limit:.1f} s)")
        first = next(iter(swarm.values()))
        left.set_title(
            f"{first['size'] / (1 << 20):.0f} MiB to {first['peers']} hosts, "
            f"{first['rate_bit'] / 1e6:g} Mbit/s links"
        )
    left.set_xlabel("seconds since the deploy started")
    left.set_ylabel("hosts with the file")
    left.grid(alpha=0.3)
    left.legend(loc="lower right", fontsize=8)
    sweep = [r for r in results.get("sweep") or [] if r["ok"]]
    if sweep:
        ns = [r["peers"] for r in sweep]
        right.plot(ns, [r["ratio"] for r in sweep], "o-", color=colors["murderd"], label="murderd")
        for r in sweep:
            right.annotate(
                f"{r['seconds']:.1f}s\n@{r['rate_bit'] / 1e6:g}M", (r["peers"], r["ratio"]),
                textcoords="offset points", xytext=(0, 8), ha="center", fontsize=7,
            )  # fmt: skip
        right.axhline(1.0, color="black", linestyle="--", label="limit")
        right.axhline(1.15, color="gray", linestyle=":", label="target at N=8: 1.15")
        if len(sweep) > 1:
            # The growth target: the largest N within 1.15 x the smallest N's ratio.
            right.axhline(
                1.15 * sweep[0]["ratio"], color="tab:green", linestyle=":",
                label=f"target at N={ns[-1]}: 1.15 x (N={ns[0]})",
            )  # fmt: skip
        right.set_xscale("log", base=2)
        right.set_xticks(ns)
        right.set_xticklabels([str(n) for n in ns])
        right.set_ylim(0, max(2.0, max(r["ratio"] for r in sweep) * 1.2))
    right.set_title("T / T_limit vs hosts")
    right.set_xlabel("peers (N)")
    right.set_ylabel("T / T_limit")
    right.grid(alpha=0.3)
    right.legend(loc="lower right", fontsize=8)
    m = results.get("machine", {})
    fig.suptitle(
        f"murderd bench, {results.get('started', '')[:10]}: {m.get('cpu', '')}, "
        f"{m.get('cores', '')} cores, libtorrent {m.get('libtorrent', '')}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
