"""The run: its cells' code by runtime and place (``host``: GGUF on this host, ``onnx_rungs``: the ONNX rungs,
``device_run`` / ``device_quality``: phones, ``calibrate``: the imatrix and tune's loop)."""
