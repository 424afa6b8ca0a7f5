"""lqjax: learned quantization for JAX/Flax, on any Linen or NNX model.

Public API:

* quantize an unchanged model by rules (:mod:`lqjax.interception`, :mod:`lqjax.rules`): ``quantize``,
  ``Rule``, ``QuantConfig``
* your own training loop (:mod:`lqjax.optim`, :mod:`lqjax.losses`):
  ``optim.split``, ``optim.Brake``, ``optim.brake_update``, ``optim.ratio_stats``,
  ``quant_penalties`` and the three penalties; amortised scale updates with
  ``optim.stop_scale_gradients`` / ``optim.is_scale_step`` (Linen) or a gradient
  filter that leaves out ``ScaleParam`` (NNX)
* mixed precision at a size (:mod:`lqjax.budget`, :mod:`lqjax.sensitivity`):
  ``budget.project`` (move scale groups' grids onto a size budget),
  ``sensitivity.hessian_traces`` and ``sensitivity.allocate`` (HAWQ-v2 per-layer widths)
* size and files: ``report`` (the per-layer bits table), ``average_bits``,
  ``save`` / ``load`` (the packed ``.lqz`` file), ``export_onnx`` (integer
  weights with ``DequantizeLinear``; needs ``lqjax[export]``)
* the quantizer (:mod:`lqjax.quant`): ``fake_quant``, ``quantize_codes``,
  ``dequantize``, ``init_scale``, ``scale_from_log``
* granularity and grids (:mod:`lqjax.types`): ``scale_shape``, ``kept_axes``,
  ``GRANULARITIES``, ``RULES``, ``GRIDS`` (``QuantConfig(bits=1, grid="midrise")``: binary)
* single layers by hand (:mod:`lqjax.linen_quant`): ``quantized``, ``Quantizer``
"""

from lqjax import budget, optim, sensitivity
from lqjax.accounting import average_bits, format_table, model_report, summarize
from lqjax.compress import CorruptFileError, load, save
from lqjax.linen_quant import Quantizer, quantized
from lqjax.nnx_quant import ScaleParam
from lqjax.losses import (bin_count_penalty, deviation_penalty, inverse_scale_penalty,
                          quant_penalties)
from lqjax.quant import dequantize, fake_quant, init_scale, quantize_codes, scale_from_log
from lqjax.interception import quantize
from lqjax.rules import QuantizeError, Rule, register_layer
from lqjax.tree import QuantScale, quantized_tensors
from lqjax.types import GRANULARITIES, GRIDS, RULES, QuantConfig, kept_axes, scale_shape

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
  return format_table(model_report(variables),
                      file_bytes=_compress.file_bytes(variables, meta))


def export_onnx(path, fn, variables, example_input, **kwargs) -> int:
  """Writes ``fn(variables, x)`` as ONNX with integer weights; see :mod:`lqjax.onnx_export`."""
  from lqjax import onnx_export
  return onnx_export.export_onnx(path, fn, variables, example_input, **kwargs)
