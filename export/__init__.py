"""Export of a model bundle to deployable graphs.

``export/specs.py`` declares, in one place, the I/O contract of every exported graph (names,
dtypes, dynamic axes, TensorRT min/opt/max shapes, sample inputs); ``export/onnx.py`` exports
those graphs with ``torch.onnx.export`` and validates each file against PyTorch with ONNX
Runtime, raising a distinct error for each kind of failure.

Only the networks are exported. The DDIM loop (``engine/sampling``) stays in Python and calls
the exported denoiser once per step.
"""
