"""lqjax: learned quantization for JAX/Flax, on any Linen or NNX model.

Public API (:data:`__all__`):

* quantize an unchanged model by rules (:mod:`lqjax.interception`, :mod:`lqjax.rules`):
  ``quantize``, ``Rule``, ``QuantConfig``, ``register_layer`` (your own layer type);
  ``quantized`` builds one quantized Linen layer class by hand; ``ScaleParam`` is the NNX
  type of the log scales (for ``nnx`` filters); ``Rule(inputs=QuantConfig(...))`` quantizes
  layers' inputs too (:mod:`lqjax.inputs`), and ``calibrate`` sets their ranges from data
* your own training loop (:mod:`lqjax.optim`, :mod:`lqjax.budget`, :mod:`lqjax.losses`):
  ``optim.split``, ``optim.apply_updates``, ``optim.Brake``/``optim.brake_update`` (the
  validation brake), ``optim.ratio_stats``, ``budget.Schedule`` (a size budget),
  ``quant_penalties`` and the three penalties; scale updates every k steps with
  ``optim.stop_scale_gradients`` / ``optim.is_scale_step``
* mixed precision at a size (:mod:`lqjax.budget`, :mod:`lqjax.sensitivity`):
  ``budget.project``, ``sensitivity.hessian_traces`` and ``sensitivity.allocate``
* size and files: ``report`` (the per-tensor table and the file's size), ``model_report`` and
  ``summarize`` (its numbers), ``average_bits``, ``quantized_tensors``, ``save`` / ``load``
  (the packed ``.lqz`` file; ``codec=CODEC_FIXED`` or ``CODEC_ZSTD``), ``export_onnx``
  (integer weights with ``DequantizeLinear``; needs ``lqjax[export]``), ``integer_inference``
  (a Linen model run from its integer codes, :mod:`lqjax.integer`)
* the quantizer as functions (:mod:`lqjax.quant`): ``fake_quant``, ``quantize_param`` (from a
  ``QuantConfig``), ``quantize_codes``, ``dequantize``; ``scale_shape``, ``GRANULARITIES``,
  ``RULES``, ``GRIDS`` (``QuantConfig(rule="lsq", bits=1, grid="midrise")``: binary)
"""

from lqjax import budget, optim, sensitivity
from lqjax import accounting as _accounting
from lqjax.accounting import average_bits, model_report, summarize
from lqjax.compress import CODEC_FIXED, CODEC_ZSTD, CorruptFileError, load, save
from lqjax.interception import calibrate, integer_inference, quantize
from lqjax.linen_quant import quantized
from lqjax.losses import (bin_count_penalty, deviation_penalty, inverse_scale_penalty,
                          quant_penalties)
from lqjax.nnx_quant import ScaleParam
from lqjax.quant import dequantize, fake_quant, quantize_codes, quantize_param
from lqjax.rules import QuantizeError, Rule, register_layer
from lqjax.tree import quantized_tensors
from lqjax.qconfig import GRANULARITIES, GRIDS, RULES, QuantConfig, scale_shape

# The public surface. Internals stay importable from their modules (lqjax.quant.init_scale,
# lqjax.quant.scale_from_log, lqjax.qconfig.kept_axes, lqjax.tree.QuantScale,
# lqjax.accounting.format_table, lqjax.linen_quant.Quantizer): a user's model and loop need
# none of them. model_report and summarize stay: the report's numbers as data.
__all__ = [
    # quantize an unchanged model
    "quantize", "Rule", "QuantConfig", "QuantizeError", "register_layer", "quantized",
    "ScaleParam", "calibrate",
    # your own loop
    "optim", "budget", "sensitivity", "quant_penalties", "inverse_scale_penalty",
    "bin_count_penalty", "deviation_penalty",
    # size and files
    "report", "model_report", "summarize", "average_bits", "quantized_tensors", "save", "load",
    "CorruptFileError", "CODEC_FIXED", "CODEC_ZSTD", "export_onnx", "integer_inference",
    # the quantizer as functions
    "fake_quant", "quantize_param", "quantize_codes", "dequantize", "scale_shape",
    "GRANULARITIES", "RULES", "GRIDS",
]

__version__ = "0.2.0"


def report(variables, meta=None) -> str:
  """The per-tensor table of a quantized tree: shape, the recipe asked (rule, width,
  granularity), the code bits learned, bytes and ratio; the averages over the quantized
  weights and over all weights; and the size of the file ``save(path, variables, meta)``
  writes (payload, header and checksum).

  `variables` is what the model needs to run (Linen variables, an ``nnx.State``
  or an ``nnx.Module``).
  """
  from lqjax import compress as _compress
  return _accounting.format_table(model_report(variables),
                      file_bytes=_compress.file_bytes(variables, meta))


def export_onnx(path, fn, variables, example_input, **kwargs) -> int:
  """Writes ``fn(variables, x)`` as ONNX with integer weights; see :mod:`lqjax.onnx_export`."""
  from lqjax import onnx_export
  return onnx_export.export_onnx(path, fn, variables, example_input, **kwargs)
