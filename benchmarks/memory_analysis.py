"""The memory benchmark's arithmetic: the search for the longest sequence that fits, and the
goals and table built from the measurements. Imported by memory.py; no torch, no processes."""
from __future__ import annotations

GIB, MIB = 2**30, 2**20
GOAL_MEMORY_RATIO, GOAL_CONTEXT, GOAL_THROUGHPUT_LOSS = 0.5, 342_000, 0.10


# ---- searching for the longest sequence ------------------------------------------------------

def search_longest(fits, guess: int, *, resolution: float = 0.05, granularity: int = 256, ceiling: int | None = None,
                   can_probe=lambda length: True) -> dict:
    """The longest length (a multiple of `granularity`) for which fits(length) holds, to `resolution`.

    Gallops from `guess` (up or down, the step doubling from `resolution` each time, so a guess just
    under the limit settles in two probes), then bisects. can_probe(length) False stops the search
    where it is: the result is then a bound (`complete` False, `stopped` says why).
    """
    snap = lambda x: max(granularity, int(round(x / granularity)) * granularity)  # noqa: E731
    clamp = lambda x: min(x, ceiling) if ceiling else x  # noqa: E731
    lo, hi, step, probes, length = 0, None, resolution, [], clamp(snap(guess))
    result = lambda complete, stopped: dict(longest=lo, shortest_failing=hi, complete=complete,  # noqa: E731
                                            stopped=stopped, probes=probes)
    while True:
        if hi is not None and (hi <= granularity or (lo and hi - lo <= max(granularity, resolution * lo))):
            return result(True, None)
        if ceiling and lo >= ceiling:
            return result(True, "length limit")
        if not can_probe(length):
            return result(False, "time budget")
        ok = fits(length)
        probes.append([length, ok])
        lo, hi = (length, hi) if ok else (lo, length)
        if hi is None:  # nothing has failed yet: gallop up
            length = clamp(max(snap(lo * (1 + step)), lo + granularity))
        elif not lo:  # nothing has fit yet: gallop down
            length = min(snap(hi / (1 + step)), hi - granularity)
        else:
            length = snap((lo + hi) / 2)
            length = length if lo < length < hi else lo + granularity
        step *= 2


def two_longest(points: list[tuple[int, float]]):
    """The two longest distinct lengths' points (a later measurement of a length replaces an earlier one)."""
    distinct = sorted(dict(points).items())
    return distinct[-2:] if len(distinct) >= 2 else None


def predict_longest(points: list[tuple[int, float]], cap: float) -> int | None:
    """Length at which a line through the two longest (length, peak bytes) points reaches `cap`."""
    pair = two_longest(points)
    if not pair or pair[1][1] <= pair[0][1]:
        return None
    (s1, p1), (s2, p2) = pair
    slope = (p2 - p1) / (s2 - s1)
    return max(0, int((cap - (p1 - slope * s1)) / slope))


def predict_seconds(points: list[tuple[int, float]], length: int) -> float:
    """Step time at `length` from t = a*s + b*s^2 (linear layers + attention) through the two longest points."""
    pair = two_longest(points)
    if not pair:
        return max((t * (length / s) ** 2 for s, t in points), default=0.0)
    (s1, t1), (s2, t2) = pair
    b = max(0.0, (t2 / s2 - t1 / s1) / (s2 - s1))
    a = max(0.0, t2 / s2 - b * s2)
    return a * length + b * length**2



# ---- goals and table ---------------------------------------------------------------------------

def describe_peak(record: dict) -> str:
    return (f"peak {record['peak_allocated'] / GIB:.2f} GiB allocated, {record['peak_reserved'] / GIB:.2f} GiB reserved"
            if "peak_allocated" in record else f"peak RSS {record['peak_rss'] / MIB:.0f} MiB")


def format_search(search: dict | None) -> str:
    if not search:
        return "-"
    longest, failing = search["longest"], search["shortest_failing"]
    if search["complete"]:
        return (f"{longest}" + (" (limit)" if search.get("stopped") else "")) if longest else "none"
    why = "budget" if search["stopped"] == "time budget" else "cut off"
    if failing:
        return f"{longest}-{failing} ({why})" if longest else f"<{failing} ({why})"
    return f">={longest} ({why})" if longest else f"not run ({why})"


def timed_seq(seqs: list[int]) -> int:
    """The length tokens/s is measured and the goals are judged at: 2048, or this run's first."""
    return 2048 if 2048 in seqs else seqs[0]


def seq_record(row: dict, length: int) -> dict:
    return next((r for r in row.get("seqs", []) if r["seq"] == length), {})


def peak_of(record: dict):  # the peak that is compared: the allocator's on a GPU, VmHWM on CPU
    return record.get("peak_allocated", record.get("peak_rss")) if record and not record.get("oom") else None


def goals(rows: list[dict], args) -> list[dict]:
    """The three goals, met / missed with the gap, or why they were not measured."""
    by_name = {r["config"]: r for r in rows}
    at = timed_seq(args.seqs)
    at_length = lambda name: seq_record(by_name.get(name, {}), at)  # noqa: E731

    peer, ours = peak_of(at_length("hf_bnb")), peak_of(at_length("all_on"))
    memory = dict(goal=f"peak memory at seq {at} <= 0.5x transformers+bitsandbytes (all_on vs hf_bnb)", met=None,
                  gap=f"not measured (needs hf_bnb and all_on at seq {at})")
    if peer and ours:
        over = (ours - GOAL_MEMORY_RATIO * peer) / GIB
        memory.update(ratio=ours / peer, met=ours / peer <= GOAL_MEMORY_RATIO,
                      gap=f"{ours / peer:.3f}x, {over:+.2f} GiB against the 0.5x line")

    search = by_name.get("all_on", {}).get("searches", {}).get("card") or {}
    longest, failing = search.get("longest") or 0, search.get("shortest_failing")
    context = dict(goal=f"longest trainable context (all_on, whole card) > {GOAL_CONTEXT} tokens", longest=longest,
                   met=None, gap="not measured: " + (format_search(search) if search else "no whole-card search"))
    if longest > GOAL_CONTEXT:
        context.update(met=True, gap=f"{longest} tokens fit ({longest / GOAL_CONTEXT:.2f}x the goal)")
    elif failing and failing <= GOAL_CONTEXT:
        # The error says which memory ran out: the device's, or the host's pinned memory for the offload.
        error = next((p.get("oom") for p in search.get("probe_details", []) if p["seq"] == failing), None)
        context.update(met=False, gap=f"{failing} tokens do not fit ({failing / GOAL_CONTEXT:.2f}x the goal)"
                                      + (f": {error}" if error else ""))
    if context["met"] is None and search.get("unfinished_probe"):  # e.g. host memory ran out for the offload
        context["gap"] += f"; the process ended during the probe at {search['unfinished_probe']} tokens"

    paged, unpaged = at_length("all_on").get("tokens_per_s"), at_length("all_on_unpaged").get("tokens_per_s")
    speed = dict(goal=f"<= 10% tokens/s lost to paging + offload at seq {at} (all_on vs all_on_unpaged)", met=None,
                 gap=f"not measured (needs all_on and all_on_unpaged at seq {at})")
    if paged and unpaged:
        speed.update(loss=1 - paged / unpaged, met=1 - paged / unpaged <= GOAL_THROUGHPUT_LOSS,
                     gap=f"{100 * (1 - paged / unpaged):.1f}% lost")

    full_size = args.device == "cuda" and args.size == "llama3-8b"
    for goal in (memory, context, speed):
        goal["scope"] = None if full_size else "indicative only: the goals are defined for the 8B shape on an 80 GB GPU"
        if not full_size:  # the numbers stay, for reference; a verdict on another shape or device would mislead
            goal["met"] = None
        goal["verdict"] = ("not evaluated" if not full_size else "not measured" if goal["met"] is None
                           else "met" if goal["met"] else "missed")
    return [memory, context, speed]


def table(rows: list[dict], seqs: list[int], caps: list, on_cuda: bool) -> list[dict]:
    unit, scale = ("GiB", GIB) if on_cuda else ("MiB RSS", MIB)
    at, lines = timed_seq(seqs), []
    for row in rows:
        line = {"config": row["config"], "optimizer": row.get("build", {}).get("optimizer", "-")}
        for length in seqs:
            record = seq_record(row, length)
            peak = peak_of(record)
            line[f"peak@{length} {unit}"] = f"{peak / scale:.2f}" if peak else ("OOM" if record.get("oom") else "-")
        for cap_name, _ in caps:
            line[f"longest {cap_name}"] = format_search(row.get("searches", {}).get(cap_name))
        tps = seq_record(row, at).get("tokens_per_s")
        line[f"tok/s@{at}"] = f"{tps:.0f}" if tps else "-"
        subs = row.get("build", {}).get("substitutions")
        line["notes"] = ("SUBSTITUTED: " + " | ".join(subs) if subs
                         else "SKIPPED: " + row["skipped"] if row.get("skipped")
                         else "ERROR: " + row["error"].splitlines()[0] if row.get("error") else "")
        lines.append(line)
    return lines
