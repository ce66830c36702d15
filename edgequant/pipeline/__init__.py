"""The run: a plan of cells (``plan``: rung x place x stage) run by one executor (``executor``) through a
registry per axis (``registry``: runtimes by artifact format, places by kind), writing through the run's
scope (``scope``).  The runtimes (``runtime_llamacpp``, ``runtime_onnx``) call the cells' code, which is
split by runtime and place: ``host`` (GGUF on this host; resolving the model, building the ladder),
``onnx_rungs`` (the ONNX rungs), ``device_run`` / ``device_quality`` (phones), ``calibrate`` (the imatrix and
tune's loop); ``places`` holds this host and a phone."""
