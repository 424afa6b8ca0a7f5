"""One entry point for the benchmarks, one subcommand each.

  python benchmarks/run.py step    [args]   quantized/float step time, every model and rule (bench.py)
  python benchmarks/run.py cost    [args]   what each piece of the quantizer costs (bench_cost.py)
  python benchmarks/run.py ordering [args]  the weight-after-scale ordering, side by side
  python benchmarks/run.py prefetch [args]  the one-step-ahead batch gather, side by side
  python benchmarks/run.py reduce  [args]   the LSQ sum as a product with a ones matrix
  python benchmarks/run.py transformers [args]  the GPT and ViT steps (bench_transformers.py)
  python benchmarks/run.py fsdp    [args]   FSDP's bytes per device and loss (bench_fsdp.py)
  python benchmarks/run.py intdot  [args]   int8 against float32 dots and 3x3 convs (bench_intdot.py)
  python benchmarks/run.py onnx    [args]   onnxruntime: integer-weight graphs against float (bench_onnx.py)
  python benchmarks/run.py integer [args]   lqjax.integer_inference against float32 models (bench_integer.py)
  python benchmarks/run.py ortint  [args]   onnxruntime's integer kernels against float (bench_ortint.py)

Each subcommand passes its arguments to that script's ``main`` (``--help`` there).
"""

import importlib
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

COMMANDS = {"step": "bench", "cost": "bench_cost", "ordering": "bench_ordering",
            "prefetch": "bench_prefetch", "reduce": "bench_reduce",
            "transformers": "bench_transformers", "fsdp": "bench_fsdp",
            "intdot": "bench_intdot", "onnx": "bench_onnx", "integer": "bench_integer",
            "ortint": "bench_ortint"}


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  if not argv or argv[0] not in COMMANDS:
    got = repr(argv[0]) if argv else "nothing"
    print(f"error: expected a subcommand, one of {', '.join(COMMANDS)}; got {got}",
          file=sys.stderr)
    return 2
  return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
  sys.exit(main())
