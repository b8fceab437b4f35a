"""Training on a shared machine: crops/s with the machine idle and with a busy process on one core.

For the 2014 convnet tagger and the latent-factor CNN, training steps (forward, loss,
backward, Adam) on in-memory batches of 3 s log-mel crops (``bench_training.py``'s data)
run in a fresh process per measurement, under four thread set-ups:

``torch default``   torch's own: one intra-op thread per core, OpenMP's default wait policy;
``passive wait``    the same threads, ``OMP_WAIT_POLICY=PASSIVE`` (waiting threads sleep);
``one thread``      ``torch.set_num_threads(1)``, default wait policy;
``mirflow policy``  ``infra.threads.apply_thread_policy`` (the CPU budget from affinity and
                    cgroup quota, less the cores other processes keep busy; OpenMP's default
                    wait) and its training callback's re-measuring as it goes.

each with the machine idle and with a competing process started before the measurement
(``--competitor``): ``spin``, a Python busy loop that holds one core; ``inference``,
another framework's inference as the issue saw it (here torch with its own default
thread pool, one small matrix product after another, napping 5 ms in 50: about one core,
at times more). Prints the median crops/s of ``--repeats`` and the ratio busy / idle
(target >= 0.4 for the policy). The first three set-ups tell the causes apart: spinning
waits, or threads that wait at every operator for the one sharing the busy core.

    python benchmarks/bench_threads.py [--competitor spin|inference] [--steps 40] [--repeats 3]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SETUPS = ("torch default", "passive wait", "one thread", "mirflow policy")
COMPETITORS = {
    "spin": "while True: pass",
    "inference": (
        "import time, torch\n"
        "a = torch.randn(256, 256)\n"
        "while True:\n"
        "    start = time.perf_counter()\n"
        "    while time.perf_counter() - start < 0.045:\n"
        "        a = torch.tanh(a @ a)\n"
        "    time.sleep(0.005)\n"
    ),
}


def _child(family: str, setup: str, steps: int, batch_size: int, result) -> None:
    if setup == "passive wait":
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    elif setup == "one thread":
        import torch

        torch.set_num_threads(1)
    elif setup == "mirflow policy":
        from infra.threads import apply_thread_policy

        apply_thread_policy(quiet=True)
    import torch
    from bench_training import epochs, families, in_memory

    from infra.threads import ThreadAdjuster

    torch.manual_seed(0)
    module, loader = families(batch_size)[family]()
    module = module.train()
    batches = in_memory(epochs(loader(None)), 8, torch.device("cpu"))
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-4)
    adjuster = ThreadAdjuster() if setup == "mirflow policy" else None
    scale = getattr(module.hparams, "target_scale", None)

    def step(x, y):
        out = module(x)
        loss = module.loss(out, y / scale if scale else y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step(*batches[0])  # warm-up
    crops, start = 0, time.perf_counter()
    for i in range(steps):
        x, y = batches[i % len(batches)]
        step(x, y)
        crops += len(x)
        if adjuster is not None:
            adjuster.maybe_adjust()
    result.put((crops / (time.perf_counter() - start), torch.get_num_threads()))


def measure(family: str, setup: str, steps: int, batch_size: int) -> tuple[float, int]:
    context = multiprocessing.get_context("spawn")
    result = context.Queue()
    env_before = os.environ.get("OMP_WAIT_POLICY")
    child = context.Process(target=_child, args=(family, setup, steps, batch_size, result))
    child.start()
    child.join()
    if env_before is None:
        os.environ.pop("OMP_WAIT_POLICY", None)
    if child.exitcode != 0:
        raise SystemExit(f"{family} / {setup}: the child failed (exit code {child.exitcode})")
    return result.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=["convnet2014", "latent-factor-cnn"])
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=SETUPS)
    parser.add_argument("--competitor", default="spin", choices=sorted(COMPETITORS))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for family in args.families:
        for setup in args.setups:
            rates: dict[str, list[float]] = {"idle": [], "busy": []}
            threads: dict[str, int] = {}
            for _ in range(args.repeats):
                for condition in ("idle", "busy"):  # alternating, so that drift hits both alike
                    competitor = None
                    if condition == "busy":
                        competitor = subprocess.Popen([sys.executable, "-c", COMPETITORS[args.competitor]])
                        time.sleep(3.0 if args.competitor == "inference" else 0.5)  # torch's import first
                    try:
                        rate, n = measure(family, setup, args.steps, args.batch_size)
                    finally:
                        if competitor is not None:
                            competitor.kill()
                            competitor.wait()
                    rates[condition].append(rate)
                    threads[condition] = n
                    print(
                        f"[{time.strftime('%H:%M:%S')}] {family:18s} {setup:15s} {condition}: {rate:8.0f} crops/s, "
                        f"{n} threads",
                        file=sys.stderr,
                        flush=True,
                    )
            idle, busy = statistics.median(rates["idle"]), statistics.median(rates["busy"])
            rows.append((family, setup, idle, busy, threads))
    print(
        f"\ntraining crops/s, {os.cpu_count()} cores, batch {args.batch_size}, {args.steps} steps, "
        f"median of {args.repeats}; busy = a competing process ({args.competitor})"
    )
    print(f"{'family':20s} {'setup':16s} {'idle':>9s} {'busy':>9s} {'busy/idle':>10s}  threads idle/busy")
    for family, setup, idle, busy, threads in rows:
        print(
            f"{family:20s} {setup:16s} {idle:9.0f} {busy:9.0f} {busy / idle:10.2f}  "
            f"{threads.get('idle')}/{threads.get('busy')}"
        )
    print("target: busy/idle >= 0.4 with the mirflow policy")


if __name__ == "__main__":
    main()
