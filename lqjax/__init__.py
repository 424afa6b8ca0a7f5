"""lqjax: learned quantization for JAX/Flax.

Public API (the most used names are re-exported here):

* quantizer (:mod:`lqjax.quant`): ``fake_quant``, ``quantize_codes``,
  ``dequantize``, ``init_scale``, ``scale_from_log``
* granularity and config (:mod:`lqjax.types`): ``QuantConfig``, ``scale_shape``,
  ``kept_axes``, ``GRANULARITIES``, ``RULES``
* layers (:mod:`lqjax.layers`): ``Quantizer``, ``quantized``, ``QuantDense``,
  ``QuantConv``, ``QuantEmbed``, ``iter_quantized``
* penalties (:mod:`lqjax.losses`): ``inverse_scale_penalty``,
  ``bin_count_penalty``, ``deviation_penalty``, ``quant_penalties``
"""

from lqjax.layers import (QuantConv, QuantDense, QuantEmbed, Quantizer, iter_quantized,
                          quantized)
from lqjax.losses import (bin_count_penalty, deviation_penalty, inverse_scale_penalty,
                          quant_penalties)
from lqjax.quant import dequantize, fake_quant, init_scale, quantize_codes, scale_from_log
from lqjax.types import GRANULARITIES, RULES, QuantConfig, kept_axes, scale_shape

__version__ = "0.1.0"
