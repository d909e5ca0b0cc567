"""The ``hetlora bench`` commands (``paper``, ``sweep``): options and help over bench_paper.py.

Also runnable without the rest of the CLI: ``python -m hetlora_core.bench_cli bench paper ...``
(what the GPU script uses on a machine that has only torch, transformers and peft).
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import click

from .bench_paper import METHODS, PROFILES, REMOVED_METHODS, run_paper, run_sweep, set_threads
from .quiet import quiet_libraries


def register(main: click.Group) -> None:
    """Add ``bench paper`` and ``bench sweep`` to the ``hetlora`` CLI group."""

    @main.group()
    def bench() -> None:
        """Benchmarks: the paper's method comparison and its hyper-parameter sweep."""

    threads_opt = click.option("--threads", type=int, default=0, show_default=True,
                               help="Torch threads per run (0: the CPUs split among the --workers). Use 1 on a machine other "
                                    "jobs keep busy.")
    profile_opt = click.option("--profile", type=click.Choice(list(PROFILES)), default="quick", show_default=True,
                               help="tiny: random tiny model (CI, seconds); quick: SmolLM2, 1 seed; full: SmolLM2, 3 seeds; "
                                    "gpu: the paper's scale on an accelerator; gpu-tiny: its shape on the tiny model.")
    out_opt = click.option("--out", "-o", type=click.Path(file_okay=False), default="runs/bench-paper", show_default=True,
                           help="Run folders (one per method and seed; rerun to resume) and sweep/.")

    @bench.command()
    @profile_opt
    @out_opt
    @click.option("--report", type=click.Path(dir_okay=False), default="docs/results.md", show_default=True,
                  help="Markdown report; PNG plots go to a folder next to it named after it (docs/results/).")
    @click.option("--methods", default="", help=f"Comma-separated subset of: {','.join(METHODS)} (default: all). With "
                  f"--no-run also the removed {','.join(REMOVED_METHODS)}: their recorded runs under --out are reported (without --methods too).")
    @click.option("--seeds", type=int, default=None, help="Number of seeds (default: the profile's).")
    @click.option("--sweep", is_flag=True, help="Run the sweep first (resumable). Without it, OUT/sweep/summary.json is used if present.")
    @click.option("--vocab", type=click.Choice(["full", "corpus"]), default="full", show_default=True,
                  help="corpus: cut SmolLM2's output layer to the tokens Shakespeare uses (faster; perplexity then "
                       "normalised over those tokens, so not comparable with full-vocabulary reports).")
    @click.option("--task", type=click.Choice(["lm", "next-speech"]), default="lm", show_default=True,
                  help="lm: each role's text, held-out perplexity. next-speech: prompt = the previous speaker's speech, "
                       "completion = the role's answer (instruction data): answer perplexity and ROUGE-L of greedy answers.")
    @click.option("--workers", type=int, default=1, show_default=True,
                  help="Processes running (method, seed) pairs at once, each with its own model copy. On a GPU "
                       "(launch-bound at these sizes) 8-9 keep it busy; on a CPU at most the idle cores.")
    @click.option("--deadline-min", type=float, default=None,
                  help="Start no run after this many minutes (runs go seed by seed; the report says what did not run).")
    @click.option("--stop-min", type=float, default=None,
                  help="The bench will be stopped after this many minutes (a device call's limit): a run is not started "
                       "when its method's finished runs under --out took longer than the time left.")
    @click.option("--no-run", is_flag=True, help="Only write the report from the runs already finished under --out.")
    @click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
                  help="Override the profile's model.device (default: the profile's; gpu: auto = CUDA when present).")
    @click.option("--note", default=None, help="A sentence for the report's machine section: what the run records cannot "
                  "tell (e.g. that the runs came from device calls on different cards).")
    @threads_opt
    @click.option("--verbose", "-v", is_flag=True, help="Keep the libraries' warnings and progress bars (workers too).")
    def paper(profile: str, out: str, report: str, methods: str, seeds: int | None, sweep: bool, vocab: str, task: str,
              workers: int, deadline_min: float | None, stop_min: float | None, no_run: bool, device: str | None,
              note: str | None, threads: int, verbose: bool) -> None:
        """Run HetLoRA, HomLoRA at r_min and r_max, zero-padding, the ablations, Recon+SVD and full
        fine-tuning on the same clients, seeds and local steps, and write the report with plots.

        Profiles: tiny (random model, seconds), quick (SmolLM2, 1 seed, CPU), full (SmolLM2, 3 seeds,
        CPU), gpu (the paper's ranks 5..50, 5 steps x 8, 20 rounds, 3 seeds: about three 9-minute
        device calls with --workers 10, each continuing the last), gpu-tiny (the gpu profile's shape on the tiny model, a CPU check)."""
        set_threads(threads)
        quiet_libraries(verbose)
        cmd = "hetlora " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else ""
        run_paper(profile, Path(out), Path(report), [m for m in methods.split(",") if m] or None, seeds, sweep, cmd,
                  log=lambda s: click.echo(f"[bench {time.strftime('%H:%M:%S')}] {s}", err=True), vocab=vocab,
                  workers=workers, deadline_s=deadline_min * 60 if deadline_min else None, run=not no_run, task=task,
                  device=device, stop_s=stop_min * 60 if stop_min else None, verbose=verbose, note=note)

    @bench.command("sweep")
    @profile_opt
    @out_opt
    @threads_opt
    @click.option("--verbose", "-v", is_flag=True, help="Keep the libraries' warnings and progress bars.")
    def sweep_cmd(profile: str, out: str, threads: int, verbose: bool) -> None:
        """Choose lr, lambda, gamma, local steps and full fine-tuning's lr on validation roles; writes
        OUT/sweep/summary.json, which `bench paper` then applies."""
        set_threads(threads)
        quiet_libraries(verbose)
        s = run_sweep(profile, Path(out), log=lambda s: click.echo(f"[sweep {time.strftime('%H:%M:%S')}] {s}", err=True))
        click.echo(json.dumps(s["choices"]))


if __name__ == "__main__":  # python -m hetlora_core.bench_cli bench ...
    @click.group()
    def _main() -> None:
        """hetlora (bench only)"""

    register(_main)
    _main()
