"""ONNX export of a trained (quantized) lqjax model, with integer initializers.

Each quantized weight is stored as an integer initializer (int8 where its codes
fit, else int16, else int32) followed by ``DequantizeLinear`` (opset 21):

* one scale per tensor: scalar scale;
* one scale per slice of a single axis (``row``/``channel``/``column``): a 1-D
  per-axis scale with ``axis`` set (conv kernels are stored OIHW, so a
  per-output-channel scale is axis 0);
* anything else (``element``, ``spatial``, several kept axes): **fallback**,
  ``DequantizeLinear`` with scale 1 followed by a ``Mul`` with the full float
  scale tensor (broadcast). The codes stay integers; the scale tensor costs as
  much as the accounting says.

The graph takes uint8 NHWC images (as the datasets store them) and includes the
input normalisation, so its logits compare directly with the JAX model's.
Supported models: lenet300, lenet5, resnet20, resnet_small (needs the optional
extra ``lqjax[export]``: onnx, onnxruntime).
"""

from __future__ import annotations

import numpy as np

from lqjax import accounting, layers


class _Graph:
  """A small builder for an ONNX graph in NCHW layout."""

  def __init__(self, params, batch_stats, rounding, bits):
    import onnx
    from onnx import helper
    self.onnx, self.h = onnx, helper
    self.params, self.stats = params, batch_stats or {}
    self.rounding, self.bits = rounding, bits
    self.nodes, self.inits, self.n = [], [], 0

  def name(self, base):
    self.n += 1
    return f"{base}_{self.n}"

  def const(self, arr, base="c"):
    from onnx import numpy_helper
    nm = self.name(base)
    self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), nm))
    return nm

  def op(self, op_type, inputs, **attrs):
    out = self.name(op_type.lower())
    self.nodes.append(self.h.make_node(op_type, inputs, [out], **attrs))
    return out

  def weight(self, tree, pname, oihw=False):
    """The float weight `pname` of `tree`, dequantized in-graph when quantized."""
    qkey = pname + layers.QUANT_SUFFIX
    p = np.asarray(tree[pname], np.float32)
    perm = (3, 2, 0, 1) if oihw else None
    if qkey not in tree:
      return self.const(p.transpose(perm) if perm else p, pname)
    ls = np.asarray(tree[qkey]["log_scale"], np.float32)
    codes, scale = accounting.tensor_codes(p, ls, self.rounding, self.bits)
    if perm:
      codes, scale = codes.transpose(perm), scale.transpose(perm)
    lo, hi = int(codes.min()), int(codes.max())
    dt = np.int8 if -128 <= lo and hi <= 127 else (np.int16 if -32768 <= lo and hi <= 32767
                                                   else np.int32)
    q = self.const(codes.astype(dt), pname + "_codes")
    kept = [i for i, d in enumerate(scale.shape) if d != 1]
    if not kept:
      return self.op("DequantizeLinear", [q, self.const(np.float32(scale.reshape(())), "scale")])
    if len(kept) == 1:
      return self.op("DequantizeLinear", [q, self.const(scale.reshape(-1), "scale")], axis=kept[0])
    deq = self.op("DequantizeLinear", [q, self.const(np.float32(1.0), "one")])
    return self.op("Mul", [deq, self.const(scale, "scale")])

  def dense(self, x, tree):
    y = self.op("MatMul", [x, self.weight(tree, "kernel")])
    return self.op("Add", [y, self.weight(tree, "bias")]) if "bias" in tree else y

  def conv(self, x, tree, in_hw, strides=1, padding="SAME"):
    k = np.asarray(tree["kernel"]).shape
    pads = [0, 0, 0, 0]
    if padding == "SAME":
      for i, (n, kk) in enumerate(zip(in_hw, k[:2])):
        out = -(-n // strides)
        total = max((out - 1) * strides + kk - n, 0)
        pads[i], pads[i + 2] = total // 2, total - total // 2
    inputs = [x, self.weight(tree, "kernel", oihw=True)]
    if "bias" in tree:
      inputs.append(self.weight(tree, "bias"))
    y = self.op("Conv", inputs, kernel_shape=list(k[:2]), strides=[strides, strides], pads=pads)
    if padding == "SAME":
      hw = tuple(-(-n // strides) for n in in_hw)
    else:
      hw = tuple((n - kk) // strides + 1 for n, kk in zip(in_hw, k[:2]))
    return y, hw

  def bn(self, x, tree, stats):
    return self.op("BatchNormalization", [
        x, self.const(np.asarray(tree["scale"], np.float32)),
        self.const(np.asarray(tree["bias"], np.float32)),
        self.const(np.asarray(stats["mean"], np.float32)),
        self.const(np.asarray(stats["var"], np.float32))], epsilon=1e-5)


def _resnet(g, x, hw, model_name):
  p, st = g.params, g.stats
  stride = 2 if model_name == "resnet_small" else 1
  x, hw = g.conv(x, p["stem"], hw, stride)
  x = g.op("Relu", [g.bn(x, p["stem_bn"], st["stem_bn"])])
  blocks = sorted((k for k in p if k.startswith("stage")),
                  key=lambda k: tuple(int(t) for t in k.replace("stage", "").split("_block")))
  for b in blocks:
    tp, ts = p[b], st[b]
    s = 2 if (b.endswith("_block1") and not b.startswith("stage1_")) else 1
    y, hw2 = g.conv(x, tp["conv1"], hw, s)
    y = g.op("Relu", [g.bn(y, tp["bn1"], ts["bn1"])])
    y, hw2 = g.conv(y, tp["conv2"], hw2, 1)
    y = g.bn(y, tp["bn2"], ts["bn2"])
    if "proj" in tp:
      x, _ = g.conv(x, tp["proj"], hw, s)
      x = g.bn(x, tp["proj_bn"], ts["proj_bn"])
    x, hw = g.op("Relu", [g.op("Add", [x, y])]), hw2
  x = g.op("ReduceMean", [x, g.const(np.array([2, 3], np.int64))], keepdims=0)
  return g.dense(x, p["head"])


def build(cfg, num_classes, ds_stats, params, batch_stats, image_shape):
  """Returns an ``onnx.ModelProto`` for the model of `cfg` with `params`."""
  g = _Graph(params, batch_stats, cfg.rounding, cfg.bits)
  h, w, c = image_shape
  x = g.op("Cast", ["image"], to=g.onnx.TensorProto.FLOAT)
  x = g.op("Div", [x, g.const(np.float32(255.0))])
  x = g.op("Sub", [x, g.const(np.asarray(ds_stats[0], np.float32))])
  x = g.op("Div", [x, g.const(np.asarray(ds_stats[1], np.float32))])
  flat = g.const(np.array([0, -1], np.int64), "shape")
  p = params
  if cfg.model == "lenet300":
    x = g.op("Reshape", [x, flat])
    x = g.op("Relu", [g.dense(x, p["fc1"])])
    x = g.op("Relu", [g.dense(x, p["fc2"])])
    y = g.dense(x, p["fc3"])
  elif cfg.model == "lenet5":
    x = g.op("Transpose", [x], perm=[0, 3, 1, 2])
    x, hw = g.conv(x, p["conv1"], (h, w), 1, "VALID")
    x = g.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x, hw = g.conv(x, p["conv2"], (hw[0] // 2, hw[1] // 2), 1, "VALID")
    x = g.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = g.op("Transpose", [x], perm=[0, 2, 3, 1])  # back to NHWC: flax's flatten order
    x = g.op("Reshape", [x, flat])
    x = g.op("Relu", [g.dense(x, p["fc1"])])
    y = g.dense(x, p["fc2"])
  elif cfg.model in ("resnet20", "resnet_small"):
    x = g.op("Transpose", [x], perm=[0, 3, 1, 2])
    y = _resnet(g, x, (h, w), cfg.model)
  else:
    raise ValueError(f"ONNX export does not support model {cfg.model!r}")
  g.nodes.append(g.h.make_node("Identity", [y], ["logits"]))
  graph = g.h.make_graph(
      g.nodes, f"lqjax_{cfg.model}",
      [g.h.make_tensor_value_info("image", g.onnx.TensorProto.UINT8, ["N", h, w, c])],
      [g.h.make_tensor_value_info("logits", g.onnx.TensorProto.FLOAT, ["N", num_classes])],
      g.inits)
  model = g.h.make_model(graph, opset_imports=[g.h.make_opsetid("", 21)],
                         producer_name="lqjax")
  model.ir_version = 10
  g.onnx.checker.check_model(model)
  return model


IMAGE_SHAPES = {"mnist": (28, 28, 1), "fashion_mnist": (28, 28, 1), "cifar10": (32, 32, 3),
                "imagenette": (64, 64, 3)}


def export_onnx(path, cfg, num_classes, ds_stats, params, batch_stats) -> int:
  """Writes the ONNX model; returns its size in bytes."""
  model = build(cfg, num_classes, ds_stats, params, batch_stats, IMAGE_SHAPES[cfg.dataset])
  blob = model.SerializeToString()
  from lqjax import compress
  return compress.write_atomic(path, blob)


def run_onnx(path_or_bytes, images: np.ndarray, batch_size: int = 1000,
             optimization: str = "basic") -> np.ndarray:
  """Logits from onnxruntime on uint8 NHWC images.

  ``optimization="basic"`` (default) keeps onnxruntime's graph rewrites to the
  exact ones: at the extended level it fuses DequantizeLinear -> MatMul into an
  integer-weight kernel whose float numerics differ (logits moved by ~0.1 on a
  trained LeNet-300-100, same argmax there). Pass ``"all"`` to measure that.
  """
  import onnxruntime as ort
  src = path_or_bytes if isinstance(path_or_bytes, (bytes, bytearray)) else str(path_or_bytes)
  so = ort.SessionOptions()
  so.graph_optimization_level = {
      "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
      "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
      "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[optimization]
  sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
  return np.concatenate([sess.run(["logits"], {"image": images[i:i + batch_size]})[0]
                         for i in range(0, images.shape[0], batch_size)])
