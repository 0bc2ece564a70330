"""``python -m bench``: the benchmark suite of segnext-kernels.

    python -m bench                      # default suite on CUDA if present, else CPU
    python -m bench --quick              # CI-sized (about a minute on a 2-core CPU)
    python -m bench --levels msca,nmf --filter fused --out bench/results/new
    python -m bench --list               # what would run, without running it

Prints one table per level; ``--out DIR`` also writes a JSON file (environment, ceilings, every
result), the tables as text, and a PNG plot of the ratios when matplotlib is installed.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from .runner import (LEVELS, OPT_IN_LEVELS, Config, Progress, Runner, compile_filter, env_flag,
                     selected)

DTYPES = ("float32", "float16", "bfloat16")


class ArgumentParser(argparse.ArgumentParser):
    """Usage errors in one line (``bench: error: ...``), exit status 2."""

    def error(self, message: str):
        sys.stderr.write(f"bench: error: {message} (see --help)\n")
        sys.exit(2)


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = ArgumentParser(
        prog="python -m bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The benchmark suite of segnext-kernels: fused MSCA / NMF2D kernels against "
                    "PyTorch eager and torch.compile, with each variant's share of the device's "
                    "measured floor.",
        epilog="examples:\n" + "\n".join(line for line in __doc__.splitlines()
                                          if line.startswith("    python")))
    p.add_argument("--quick", action="store_true", help="CI-sized shapes and short time budgets")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tiny sizes, tests
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="storage dtype of the conv levels (default: float16 on CUDA, float32 on "
                        "CPU); half dtypes run the block and model levels under autocast")
    p.add_argument("--filter", default=None,
                   help="regex (or substring) matched against 'level/pass/variant/layout/shape', "
                        "e.g. 'strip', 'fused', 'msca/fwd\\+bwd', 'model/train/.*/cl/SegNeXt-T'")
    p.add_argument("--levels", default=None,
                   help=f"comma-separated subset of {','.join(LEVELS + OPT_IN_LEVELS)} "
                        f"(default: all but {','.join(OPT_IN_LEVELS)})")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="write <DIR>/bench_<device>_<time>.{json,txt,png}")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="run the torch.compile variants (default: on for CUDA, off for CPU and "
                        "--quick, where compiling takes minutes)")
    g.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--compile-budget", type=float, default=None, metavar="S",
                   help="skip further compile variants once compiling took S seconds in total "
                        "(default 120)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: torch's choice)")
    p.add_argument("--shapes", choices=("default", "segnext"), default="default",
                   help="op shapes of the msca, dwconv_gelu, mlp and block levels: the default "
                        "few, or 'segnext': every stage of SegNeXt-T, -S and -B at 512x512, "
                        "batch 1")
    p.add_argument("--list", action="store_true", help="list the cases and variants, run nothing")
    args = p.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.compile_budget is not None and not (math.isfinite(args.compile_budget)
                                                and args.compile_budget >= 0):
        p.error(f"--compile-budget must be a finite number of seconds >= 0, got "
                f"{args.compile_budget}")
    if args.levels is not None:
        levels = [s.strip() for s in args.levels.split(",") if s.strip()]
        unknown = [lv for lv in levels if lv not in LEVELS + OPT_IN_LEVELS]
        if unknown or not levels:
            p.error(f"--levels: unknown level(s) {unknown or [args.levels]}; choose from "
                    f"{', '.join(LEVELS + OPT_IN_LEVELS)}")
    if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out must be a folder, but {args.out} is a file")
    if args.device is not None:
        problem = device_problem(args.device)
        if problem:
            p.error(problem)
    return args


def device_problem(name: str) -> Optional[str]:
    """Why ``--device name`` cannot run here (None when it can)."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        return f"--device must be cpu, cuda or cuda:N, got {name!r}"
    if device.type not in ("cpu", "cuda"):
        return f"--device must be cpu, cuda or cuda:N, got {name!r}"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"--device {name}: no CUDA GPU is visible to torch"
    if device.type == "cuda" and device.index is not None and \
            device.index >= torch.cuda.device_count():
        return f"--device {name}: only {torch.cuda.device_count()} CUDA GPU(s) are visible"
    return None


def make_config(args: argparse.Namespace) -> Config:
    import torch

    if args.device:
        device = torch.device(args.device)  # checked by parse_args
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    dtype_name = args.dtype or ("float16" if device.type == "cuda" else "float32")
    size = "smoke" if args.smoke else ("quick" if args.quick else "full")
    compile_default = device.type == "cuda" and size == "full"
    levels = LEVELS
    if args.levels:
        levels = tuple(s.strip() for s in args.levels.split(",") if s.strip())
        unknown = [lv for lv in levels if lv not in LEVELS + OPT_IN_LEVELS]
        if unknown:
            raise SystemExit(f"--levels: unknown level(s) {unknown}; choose from "
                             f"{', '.join(LEVELS + OPT_IN_LEVELS)}")
    return Config(device=device, dtype=getattr(torch, dtype_name), size=size,
                  compile=compile_default if args.compile is None else args.compile,
                  compile_budget_s=120.0 if args.compile_budget is None else args.compile_budget,
                  levels=levels, filter=compile_filter(args.filter),
                  interpret=env_flag("TRITON_INTERPRET"), op_shapes=args.shapes)


def build_cases(cfg: Config):
    """{level: (cases, notes)}; a module that fails to build its cases leaves a note."""
    from . import (bench_block, bench_deploy, bench_dwconv_gelu, bench_mlp, bench_model, bench_msca,
                   bench_nmf2d, bench_patch, bench_strip_conv)

    builders = {
        "strip": [bench_strip_conv.cases],
        "msca": [bench_msca.cases],
        "dwconv_gelu": [bench_dwconv_gelu.cases],
        "mlp": [bench_mlp.cases],
        "nmf": [bench_nmf2d.cases],
        "block": [bench_block.cases],
        "model": [bench_model.cases],
        "patch": [bench_patch.cases],
        "memory": [bench_msca.memory_cases, bench_model.memory_cases],
        "deploy": [bench_deploy.cases],
    }
    out: Dict[str, tuple] = {}
    for level in cfg.levels:
        cases, notes = [], []
        for build in builders[level]:
            try:
                c, n = build(cfg)
                cases += c
                notes += n
            except Exception as exc:  # noqa: BLE001 - a level that cannot be built is reported
                notes.append(f"could not build {build.__module__}.{build.__name__}: "
                             f"{type(exc).__name__}: {exc}")
        if not cfg.compile and level in ("msca", "nmf", "block"):
            off_by_default = not cfg.cuda or cfg.size != "full"
            why = "off on CPU and with --quick" if off_by_default else "--no-compile"
            notes.append(f"torch.compile variants not run ({why}; --compile runs them)")
        out[level] = (cases, list(dict.fromkeys(notes)))
    return out


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    import torch

    threads_before = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return run(args, argv)
    finally:  # main() also runs in-process (tests): leave torch as it was
        torch.set_num_threads(threads_before)


def run(args: argparse.Namespace, argv: Optional[List[str]]) -> int:
    t_start = time.perf_counter()
    import torch

    from . import report, roofline

    cfg = make_config(args)
    torch.manual_seed(0)
    levels = build_cases(cfg)
    todo = sum(1 for cases, _ in levels.values() for c in cases for v in c.variants
               if selected(cfg, c, v))

    if args.list:
        for level, (cases, notes) in levels.items():
            print(f"== {level} ==")
            for c in cases:
                for v in c.variants:
                    if selected(cfg, c, v):
                        extra = f"  [{v.skip}]" if v.skip else ""
                        print(f"  {level}/{c.pass_}/{v.name}/{v.layout}  {c.shape}  {c.dtype}{extra}")
            for n in notes:
                print(f"  note: {n}")
        print(f"{todo} variants")
        return 0
    if todo == 0:
        print("nothing to run: no variant matches --filter/--levels", file=sys.stderr)
        return 1

    env = report.environment(cfg)
    header = [f"segnext-kernels benchmark suite ({cfg.size}) on {cfg.device.type}: {env['device_name']}",
              f"  torch {env['torch']}, triton {env['triton']}, CUDA {env['torch_cuda']}, "
              f"cuDNN {env['cudnn']}, {env['threads']} CPU threads, git {str(env['git_commit'])[:12]}",
              f"  dtype {cfg.dtype_name}, compile variants {'on' if cfg.compile else 'off'}"
              + (", TRITON_INTERPRET=1" if cfg.interpret else "")]
    load = env.get("load_average")
    if load and env["cpu_count"] and load[0] > 0.5 * env["cpu_count"]:
        header.append(f"  note: load average {load[0]:.1f} on {env['cpu_count']} CPUs: other work "
                      "is running, timings will be noisy")
    print("\n".join(header), flush=True)

    print("measuring ceilings ...", file=sys.stderr, flush=True)
    ceil = roofline.measure_ceilings(cfg.device, [cfg.dtype], cfg.size, cfg.interpret)
    ceil_text = report.format_ceilings(ceil)
    print(ceil_text + report.LEGEND + "\n", flush=True)

    progress = Progress(todo)
    runner = Runner(cfg, ceil, progress)
    results, tables, all_notes = [], [], {}
    interrupted = False
    try:
        for level, (cases, notes) in levels.items():
            level_results = []
            for case in cases:
                level_results += runner.run_case(case)
            all_notes[level] = notes
            results += level_results
            if level_results:  # levels the filter left empty print nothing
                try:
                    table = report.format_table(level, level_results, cfg.cuda, notes)
                except Exception as exc:  # noqa: BLE001 - the JSON still gets every result
                    table = f"== {level}: table failed ({type(exc).__name__}: {exc}) ==\n"
                tables.append(table)
                progress.write(table)
    except KeyboardInterrupt:  # keep what was measured
        interrupted = True
        progress.write("interrupted: writing what was measured")
    finally:
        progress.close()

    wall = time.perf_counter() - t_start
    summary = f"{len(results)} results ({sum(r.status == 'failed' for r in results)} failed, " \
              f"{sum(r.status == 'skipped' for r in results)} skipped) in {wall:.0f} s"
    print(summary, flush=True)

    if args.out:
        try:
            out_dir = Path(args.out)
            out_dir.mkdir(parents=True, exist_ok=True)
            stem = report.file_stem(env)
            payload = dict(
                schema=1, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                argv=list(sys.argv[1:] if argv is None else argv),
                config=dict(device=str(cfg.device), dtype=cfg.dtype_name, size=cfg.size,
                            compile=cfg.compile, compile_budget_s=cfg.compile_budget_s,
                            levels=list(cfg.levels),
                            filter=cfg.filter.pattern if cfg.filter else None),
                environment=env, ceilings=ceil.as_dict(), notes=all_notes,
                results=[r.as_dict() for r in results], wall_s=wall, interrupted=interrupted)
            json_path = out_dir / f"{stem}.json"
            report.write_json(json_path, payload)
            (out_dir / f"{stem}.txt").write_text("\n".join(header) + "\n" + ceil_text + report.LEGEND
                                                 + "\n\n" + "\n".join(tables) + summary + "\n")
            why_not = report.write_plot(out_dir / f"{stem}.png", results,
                                        f"{env['device_name']} ({cfg.dtype_name}, {cfg.size})")
            print(f"wrote {json_path} and {stem}.txt" + ("" if why_not else f" and {stem}.png")
                  + (f"; {why_not}" if why_not else ""), flush=True)
        except OSError as exc:  # an unwritable --out must not lose the printed tables
            print(f"could not write results to {args.out}: {exc}", file=sys.stderr)
            return 1
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
