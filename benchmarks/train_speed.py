"""Training speed: the eager train step against the fast one, for one run and for several at once.

    python -m effiseg.benchmarks.train_speed                       # CPU-sized defaults (~1-2 min)
    python -m effiseg.benchmarks.train_speed --device cuda:0 --variant effisegnet-lite2 \\
        --input-size 352 --steps 50 --rounds 3 --runs 1,3,6 --output train_speed

Every configuration times the trainer's own steps (``Trainer.for_timing``: the eager loop or
``fast_step.FastStep``, augmentation included) over synthetic images at the recipe's batch size:
speed does not depend on the pixels. One "round" is one pass over ``--steps`` batches; a round's
images/s is read after the device has finished it. Several runs at once, two ways:

* ``in-process``: N runs in one process, each with its own CUDA stream (``trainer.fit_together``'s
  way): every run's round is enqueued before any is waited for;
* ``processes``: N processes of one run each (the protocol's default), started together after a
  barrier; their images/s add up.

Steps, modes and concurrencies run one after the other in this one process, so ratios between them
are side by side. Results: ``train_speed.json`` (every round) and ``train_speed.md`` (the table).
On a CPU there are no CUDA graphs: the fast mode is the same code uncaptured, and concurrent runs
share the same cores, so the CPU figures say what the code costs there, not what a GPU gains.
"""
from __future__ import annotations

import json
import multiprocessing
import queue
import statistics
import time
from pathlib import Path

import click

from effiseg.runtime.console import Command
from effiseg.runtime.images import atomic_write_text

_POLL_S = 0.5  # the parent's waits, in steps (see time_processes)


def _config(variant, size, batch, device, mode, amp, seed):
    from effiseg.training.trainer import TrainConfig
    return TrainConfig(variant=variant, input_size=size, batch_size=batch, device=device, step=mode, amp=amp,
                       seed=seed, pretrained=False, epochs=1000)


def _trainers(settings: dict, n_runs: int):
    import torch
    from effiseg.training.trainer import Trainer
    n_images = settings["steps"] * settings["batch"]
    gen = torch.Generator().manual_seed(0)
    size = settings["size"]
    images = torch.randint(0, 256, (n_images, 3, size, size), dtype=torch.uint8, generator=gen)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2).to(torch.uint8)
    masks = disc.expand(n_images, 1, size, size).contiguous()
    return [Trainer.for_timing(_config(settings["variant"], size, settings["batch"], settings["device"],
                                       settings["mode"], settings["amp"], seed), images, masks)
            for seed in range(n_runs)]


def _round(trainers) -> float:
    """Seconds for one round of every run, enqueued together, until the last has finished."""
    t0 = time.perf_counter()
    pending = [(t, t.enqueue_epoch()) for t in trainers]
    for t, p in pending:
        t._collect_epoch(p)  # the round's one read from the device
    return time.perf_counter() - t0


def time_in_process(settings: dict, n_runs: int, warmup: int, rounds: int) -> dict:
    trainers = _trainers(settings, n_runs)
    for _ in range(warmup):
        _round(trainers)
    seconds = [_round(trainers) for _ in range(rounds)]
    images = n_runs * settings["steps"] * settings["batch"]
    return {"seconds": seconds, "aggregate_images_per_s": images / statistics.median(seconds),
            "step": trainers[0].step_choice.line()}


def _process_worker(settings: dict, warmup: int, rounds: int, threads: int, barrier, queue) -> None:
    import torch
    torch.set_num_threads(threads)
    try:
        (trainer,) = _trainers(settings, 1)
        for _ in range(warmup):
            _round([trainer])
        barrier.wait()
        queue.put({"seconds": [_round([trainer]) for _ in range(rounds)]})
    except Exception as e:  # noqa: BLE001 -- reported by the parent with the configuration
        barrier.abort()
        queue.put({"error": f"{type(e).__name__}: {e}"})


def time_processes(settings: dict, n_runs: int, warmup: int, rounds: int, threads: int, worker=None) -> dict:
    """N spawned processes (never fork: CUDA and Windows) that start their timed rounds together.
    ``worker``: the processes' function (default ``_process_worker``; tests give others)."""
    ctx = multiprocessing.get_context("spawn")
    barrier, answers = ctx.Barrier(n_runs), ctx.Queue()
    procs = [ctx.Process(target=worker or _process_worker, args=(settings, warmup, rounds, threads, barrier, answers))
             for _ in range(n_runs)]
    for p in procs:
        p.start()
    try:
        got = _answers(procs, answers, barrier)
    finally:
        for p in procs:
            while p.is_alive():  # in steps: on Windows an untimed wait cannot be interrupted by Ctrl-C
                p.join(_POLL_S)
    errors = [a["error"] for a in got if "error" in a]
    if errors:
        raise RuntimeError(f"a timing process failed: {errors[0]}")
    per_run = [settings["steps"] * settings["batch"] / statistics.median(a["seconds"]) for a in got]
    return {"seconds": [a["seconds"] for a in got], "aggregate_images_per_s": sum(per_run)}


def _answers(procs, answers, barrier) -> list[dict]:
    """One answer per process, waited for in short steps. A process that ends without one (killed by
    the system, a crash in a CUDA library: nothing of it runs to say so) fails the configuration
    instead of leaving the parent waiting for good; the others are released from the barrier."""
    got: list[dict] = []
    while len(got) < len(procs):
        try:
            got.append(answers.get(timeout=_POLL_S))
            continue
        except queue.Empty:
            pass
        died = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
        if died:
            barrier.abort()
            for p in procs:
                if p.is_alive():
                    p.terminate()
            raise RuntimeError(f"a timing process ended without an answer (exit status {died[0]})")
    return got


def default_modes(device: str) -> list[str]:
    return ["eager", "graph"] if device.startswith("cuda") else ["eager", "fast"]


def table(rows: list[dict]) -> str:
    lines = ["| step | runs at once | how | images/s per run | images/s in all | vs eager, same runs and way |",
             "|---|---|---|---|---|---|"]
    eager = {(r["runs"], r["concurrency"]): r["aggregate_images_per_s"] for r in rows if r["mode"] == "eager"}
    for r in rows:
        base = eager.get((r["runs"], r["concurrency"]))
        ratio = f"{r['aggregate_images_per_s'] / base:.2f}x" if base and r["mode"] != "eager" else ""
        lines.append(f"| {r['mode']} | {r['runs']} | {r['concurrency']} | {r['images_per_s_per_run']:.1f} | "
                     f"{r['aggregate_images_per_s']:.1f} | {ratio} |")
    return "\n".join(lines)


@click.command(cls=Command, context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--variant", default="effisegnet-lite0", help="GPU: effisegnet-lite2 (the recipe's).")
@click.option("--input-size", "size", type=click.IntRange(32), default=64, help="GPU: 352.")
@click.option("--batch-size", "batch", type=click.IntRange(2), default=8)
@click.option("--device", default="cpu", help="cpu, cuda or cuda:N.")
@click.option("--amp", type=click.Choice(["auto", "bf16", "fp16", "off"]), default="auto")
@click.option("--modes", default=None, help="Train steps to time [default: eager,graph on CUDA; eager,fast on the CPU].")
@click.option("--runs", default="1,3,6", help="Runs at once, comma-separated.")
@click.option("--concurrency", type=click.Choice(["both", "in-process", "processes"]), default="both",
              help="How several runs share the machine (one run is always in-process).")
@click.option("--eager-in-process/--no-eager-in-process", default=True,
              help="Also time several eager runs in one process (they take turns: the 1-run speed shared).")
@click.option("--steps", type=click.IntRange(4), default=6, help="Batches per round (the graph is captured at step 4).")
@click.option("--warmup", type=click.IntRange(1), default=1, help="Untimed rounds first (capture, autotuning).")
@click.option("--rounds", type=click.IntRange(1), default=2, help="Timed rounds; the median counts.")
@click.option("--threads", type=click.IntRange(1), default=1,
              help="CPU threads of this process; each of N timing processes gets max(1, threads // N). One by "
                   "default: on a shared CPU, torch's threads waiting for each other cost more than they give.")
@click.option("--output", type=click.Path(path_type=Path, file_okay=False), default=Path("train_speed"))
def main(variant, size, batch, device, amp, modes, runs, concurrency, eager_in_process, steps, warmup, rounds, threads,
         output):
    """Time the eager train step against the fast one: one run, and several at once."""
    from effiseg.benchmarks.machine import machine_info
    mode_list = [m for m in (modes.split(",") if modes else default_modes(device)) if m]
    try:
        run_counts = sorted({int(r) for r in runs.split(",") if r.strip()})
    except ValueError:
        raise click.BadParameter(f"expected whole numbers separated by commas, got {runs!r}", param_hint="--runs") from None
    if not run_counts or min(run_counts) < 1:
        raise click.BadParameter("give run counts of at least 1", param_hint="--runs")
    import torch
    torch.set_num_threads(threads)
    rows: list[dict] = []
    failures: list[dict] = []
    doc = {"settings": {"variant": variant, "input_size": size, "batch_size": batch, "device": device, "amp": amp,
                        "steps_per_round": steps, "warmup_rounds": warmup, "rounds": rounds, "threads": threads,
                        "images": "synthetic uint8 (speed does not depend on the pixels); augmentation on"},
           "machine": machine_info(), "results": rows, "failures": failures}
    output.mkdir(parents=True, exist_ok=True)
    for n in run_counts:
        ways = ["in-process"] if n == 1 else (["in-process", "processes"] if concurrency == "both" else [concurrency])
        for way in ways:
            for mode in mode_list:
                if mode == "eager" and way == "in-process" and n > 1 and not eager_in_process:
                    continue
                timing = {"variant": variant, "size": size, "batch": batch, "device": device, "mode": mode,
                          "amp": amp, "steps": steps}
                click.echo(f"{mode}, {n} run(s), {way} ...", err=True)
                t0 = time.perf_counter()
                try:
                    if way == "in-process":
                        measured = time_in_process(timing, n, warmup, rounds)
                    else:
                        measured = time_processes(timing, n, warmup, rounds, max(1, threads // n))
                except Exception as e:  # noqa: BLE001 -- one failing configuration must not lose the others
                    failures.append({"mode": mode, "runs": n, "concurrency": way, "error": f"{type(e).__name__}: {e}"})
                    click.echo(f"  failed: {failures[-1]['error']}", err=True)
                else:
                    row = {"mode": mode, "runs": n, "concurrency": way, **measured,
                           "images_per_s_per_run": measured["aggregate_images_per_s"] / n,
                           "wall_s": time.perf_counter() - t0}
                    rows.append(row)
                    click.echo(f"  {row['images_per_s_per_run']:.1f} images/s per run, "
                               f"{row['aggregate_images_per_s']:.1f} in all ({row['wall_s']:.0f} s)", err=True)
                # After every configuration: a run cut short by its time limit keeps what it measured.
                atomic_write_text(output / "train_speed.json", json.dumps(doc, indent=2) + "\n")
    md = table(rows)
    atomic_write_text(output / "train_speed.md", f"Train speed, {variant} at {size}, batch {batch}, on {device}\n\n{md}\n")
    click.echo(md)
    click.echo(f"wrote {output / 'train_speed.json'} and {output / 'train_speed.md'}")
    if failures:
        click.echo(f"error: {len(failures)} configuration(s) failed: "
                   + "; ".join(f"{f['mode']} x{f['runs']} {f['concurrency']}: {f['error']}" for f in failures), err=True)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
