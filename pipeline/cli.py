"""`llava-batch run|status|tiny-model|quantize|bench|score`.

Exit codes: 0 done (row errors are counted, not fatal, unless run.max_error_rate is exceeded),
2 bad arguments or configuration (one line on stderr, nothing written), 130 / 143 stopped by SIGINT /
SIGTERM (one line; a rerun resumes), 1 anything else.
A `LlavaBatchError` is one line on stderr and its own exit_code; anything else is a bug and keeps
its traceback. Heavy imports (torch, transformers) happen inside the commands, and `run` checks the
config, manifest and model dir before them, so `--help` and a bad job stay instant.

SIGTERM is what Slurm, Kubernetes and `timeout` send first: it stops a run the way Ctrl-C does (an
interrupt on the main thread, so the shard stops at the next row, workers stop and the leases are
released), then exits 128 + 15 as schedulers expect.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading

from pipeline import logs
from pipeline.errors import LlavaBatchError
from pipeline.logs import PLAIN, log


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors are usage errors: one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def _cmd_run(args) -> int:
    from pipeline.config import load_job

    cfg = load_job(args.job, args.set or [])  # a bad job file is refused before the job's imports
    from pipeline.job import run_job

    summary = run_job(cfg)
    print(summary.line())
    return summary.exit_code


def _cmd_plan(args) -> int:
    from pipeline.config import load_job

    cfg = load_job(args.job, args.set or [])
    from pipeline.job_plan import describe, plan_job

    report = plan_job(cfg, args.calibrate)
    print(json.dumps(report) if args.json else describe(report))
    return 0


def _cmd_status(args) -> int:
    from pipeline.data.status import read_status

    status = read_status(args.out_dir)
    if args.json:
        print(json.dumps(status))
    else:
        print(f"{status['done']}/{status['rows']} rows done ({status['ok']} ok, {status['errors']} errors); "
              f"{status['shards_complete']}/{status['shards']} shards complete"
              + (f"; shards FAILED: {status['shards_failed']}" if status["shards_failed"] else "")
              + ("; flagged: " + ", ".join(f"{n} {f}" for f, n in sorted(status["flags"].items()))
                 if status["flags"] else ""))
    return 0


def _cmd_tiny_model(args) -> int:
    from pipeline.testing.tiny_model import build_tiny_model

    path = build_tiny_model(args.out_dir, args.family, preset=args.preset, seed=args.seed,
                            image_size=args.image_size, chat_template=not args.no_chat_template,
                            caption_median=args.caption_median)
    print(path)
    return 0


def _cmd_quantize(args) -> int:
    from quant import quantize

    print(quantize(args.src, args.dst, backend=args.backend, names=args.names, overwrite=args.overwrite))
    return 0


def _cmd_bench(args) -> int:
    from pipeline.bench.perf import cli

    return cli(args)


def _batch_size(text: str) -> int | str:
    return text if text == "auto" else int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="llava-batch", description="Caption images and videos with LLaVA-family models, "
                     "Parquet manifest in, Parquet captions out, exactly-once resume.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("run", help="run, or resume, a job")
    p.add_argument("job", help="job file (TOML)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a job setting")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("plan", help="rows, shards, rows done, the cache plan and (--calibrate N) a time estimate")
    p.add_argument("job")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a job setting")
    p.add_argument("--calibrate", type=int, default=0, metavar="N", help="caption the first N rows to estimate time")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("status", help="rows done / errors / shards complete of an output dir")
    p.add_argument("out_dir")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("tiny-model", help="write a random-weight model in llava-hf layout (tests, demos, benchmarks)")
    p.add_argument("out_dir")
    p.add_argument("--family", required=True, choices=["llava", "llava_next", "llava_next_video"])
    p.add_argument("--preset", default="test", choices=["test", "bench", "llava-1.5-7b"],
                   help="llava-1.5-7b: the real 7B shape (CLIP ViT-L/14-336 + a 32-layer 4096-wide Llama)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=None, help="vision tower input size (patch 14)")
    p.add_argument("--no-chat-template", action="store_true", help="write no chat template")
    p.add_argument("--caption-median", type=int, default=None,
                   help="calibrate EOS for captions of about this median length (default 12)")
    p.set_defaults(func=_cmd_tiny_model)

    p = sub.add_parser("quantize", help="convert a llava-hf model dir to W8A16 (msModelSlim ascendV1 layout)")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--backend", default="auto", choices=["auto", "msmodelslim", "builtin"])
    p.add_argument("--names", default="hf", choices=["hf", "legacy"])
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_quantize)

    p = sub.add_parser("bench", help="performance test: batch sizes x fixed output length, or a caption workload")
    p.add_argument("--model", required=True, help="model dir (llava-hf layout)")
    p.add_argument("--workload", default="perf", choices=["perf", "captions"])
    p.add_argument("--batch-sizes", default="1,2,3,4,5,6,7,8,9,10", help="perf: comma separated")
    p.add_argument("--output-length", type=int, default=256, help="perf: tokens per row, EOS ignored")
    p.add_argument("--compare", choices=["hf"], default=None, help="also time plain transformers generate")
    p.add_argument("--out", default="bench-out", help="folder for benchmark.csv / .png / .json")
    p.add_argument("--dtype", default="bfloat16", choices=["auto", "float16", "bfloat16", "float32"])
    p.add_argument("--device", default="auto")
    p.add_argument("--prompt", default="Describe this image in one sentence.")
    p.add_argument("--manifest", help="captions: Parquet manifest with a path column")
    p.add_argument("--max-batch-size", type=_batch_size, default=16,
                   help="captions: fast engine slots, or auto (the memory plan)")
    p.add_argument("--max-output-length", type=int, default=128, help="captions: EOS-driven, up to this")
    p.add_argument("--hf-batch-sizes", default="8,16", help="captions: static batch sizes for the hf loop")
    p.add_argument("--engines", default="fast", help="captions: comma separated, fast and/or hf")
    p.add_argument("--compile", action="store_true", help="fast engine: capture the decode step (generation.compile)")
    p.set_defaults(func=_cmd_bench)

    try:
        from pipeline.eval.clip_score import add_parser as add_score
    except ImportError:
        add_score = None
    if add_score:
        add_score(sub)
    return parser


def _report(args, error: LlavaBatchError) -> None:
    prog = getattr(args, "error_prog", None)  # a command that names itself in its error lines
    if prog:
        log.error(f"{prog}: error: {error}", extra=PLAIN)
    else:
        log.error(f"error: {error}")


_STOP_NAMES = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated (SIGTERM)"}


@contextlib.contextmanager
def _stop_signals():
    """SIGINT and SIGTERM raise KeyboardInterrupt on the main thread; yields the signal seen first.

    Only the first SIGTERM raises: a second one (or one after Ctrl-C) must not cut short the cleanup
    the first started (workers stopping, leases released). A second Ctrl-C still raises, a person's
    way to insist.
    """
    seen: list[int] = []

    def on_signal(signum, frame):
        if seen and signum != signal.SIGINT:
            return
        seen.append(signum)
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():  # signal.signal works on it alone
        yield seen
        return
    before = {sig: signal.signal(sig, on_signal) for sig in _STOP_NAMES}
    try:
        yield seen
    finally:
        for sig, handler in before.items():
            if handler is not None:  # None: installed outside Python, nothing to put back
                signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    logs.setup()
    args = build_parser().parse_args(argv)
    with _stop_signals() as seen:
        try:
            return args.func(args)
        except LlavaBatchError as e:
            _report(args, e)
            return e.exit_code
        except KeyboardInterrupt:
            signum = seen[0] if seen else signal.SIGINT
            log.warning(f"{_STOP_NAMES[signum]}; rerun the same command to resume")
            return 128 + signum
        except BaseException as e:
            if not _rank_lost(e):
                raise
            log.error(f"error: {e}; rerun the same command to resume")
            return 1


def _rank_lost(e: BaseException) -> bool:
    """A tensor parallel group that lost a rank in this process (the in-process executor): looked
    up where it is defined, as that module is only imported once torch is."""
    steps = sys.modules.get("pipeline.engine.tp_steps")
    return steps is not None and isinstance(e, steps.RankLost)


if __name__ == "__main__":
    sys.exit(main())
